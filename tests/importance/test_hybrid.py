"""Screen-then-verify scoring: its keep sets equal those of exact scoring."""
from __future__ import annotations

import pytest
import torch

import upvit
from helpers import tiny_images, tiny_vit
from plan_helpers import scrambled
from upvit.adapters import Masks, get_adapter
from upvit.errors import UpvitError
from upvit.importance import hybrid as hybrid_module
from upvit.importance.scores import Scores
from upvit.plan import make_plan

SHAPE = dict(embed_dim=48, num_heads=4, mlp_ratio=4.0)


def reference_exact(model, images) -> Scores:
    """Naive exact KL: one masked forward of the whole proxy set per channel (independent of kl.py)."""
    adapter = get_adapter(model)
    with torch.no_grad():
        logq = torch.log_softmax(adapter.forward(images).double(), -1)
        out = {}
        for site in adapter.topology().sites:
            vals = []
            for chunk in torch.arange(site.size).split(32):  # 32 removals side by side, one per sample row
                masks = torch.ones(len(chunk), site.size)
                masks[torch.arange(len(chunk)), chunk] = 0
                rows = masks.repeat_interleave(len(images), 0)
                logp = torch.log_softmax(adapter.forward(images.repeat(len(chunk), 1, 1, 1),
                                                         Masks({site.key: rows})).double(), -1)
                kl = (logq.exp() * (logq - logp.view(len(chunk), *logq.shape))).sum((1, 2))
                vals.append(kl)
            out[site.key] = torch.cat(vals)
    return Scores.from_sites(adapter.topology(), out)


def keep_sets(model, scores, target):
    plan = make_plan(model, scores, **target)
    return plan.keep_embed, plan.keep_attn, plan.keep_ffn


@pytest.fixture(scope="module")
def setup():
    model = tiny_vit(distilled=True, std=0.25, **SHAPE)
    images = tiny_images(8)
    return model, images, reference_exact(model, images)


TARGETS = [dict(embed_dim=24, num_heads=2, mlp_hidden=96), dict(embed_dim=12, num_heads=1, mlp_hidden=48),
           dict(embed_dim=32, num_heads=4, mlp_hidden=150)]


def test_hybrid_keep_sets_equal_exact_keep_sets(setup):
    model, images, ref = setup
    s = upvit.score(model, images, method="hybrid", targets=TARGETS, band=0.02, min_band=2)
    assert s.meta["method"] == "hybrid" and 0 < s.meta["exact_fraction"] < 0.8
    for target in TARGETS:
        assert keep_sets(model, s, target) == keep_sets(model, ref, target), target
    # exactly scored channels carry the exact KL; the others are finite
    for key, idx in s.meta["exact_channels"].items():
        if idx:
            torch.testing.assert_close(s[key][idx], ref[key][idx], rtol=1e-4, atol=1e-9)
    assert all(torch.isfinite(t).all() for _, t in s.items())


def test_hybrid_with_ratios(setup):
    model, images, ref = setup
    s = upvit.score(model, images, method="hybrid", ratios=[0.5, 0.25])
    assert [t["stages"][0]["heads"] for t in s.meta["targets"]] == [2, 1]
    for ratio in (0.5, 0.25):
        assert make_plan(model, s, ratio=ratio).keep_ffn == make_plan(model, ref, ratio=ratio).keep_ffn
        assert make_plan(model, s, ratio=ratio).keep_attn == make_plan(model, ref, ratio=ratio).keep_attn
        assert make_plan(model, s, ratio=ratio).keep_embed == make_plan(model, ref, ratio=ratio).keep_embed


def test_hybrid_recovers_from_a_misleading_estimate(setup, monkeypatch):
    """With a scrambled estimate the bands must widen until the decisions are still exact."""
    model, images, ref = setup
    monkeypatch.setattr(hybrid_module, "fisher_scores", scrambled(hybrid_module.fisher_scores))
    target = TARGETS[0]
    s = upvit.score(model, images, method="hybrid", targets=[target], band=0.02, min_band=1)
    assert s.meta["rounds"] > 1
    assert keep_sets(model, s, target) == keep_sets(model, ref, target)


@pytest.mark.parametrize("options, match", [
    ({}, "needs exactly one of targets"),
    ({"targets": [dict(embed_dim=24)], "ratios": [0.5]}, "needs exactly one of targets"),
    ({"ratios": [0.75]}, "does not divide"),
    ({"ratios": []}, "non-empty"),
    ({"targets": [dict(embed_dim=24, heads=2)]}, "unknown target key"),
    ({"targets": [dict(embed_dim=24, num_heads=3)]}, "does not divide"),
    ({"targets": [dict(embed_dim=100)]}, "impossible"),
    ({"targets": ["S"]}, "must be a dict"),
    ({"ratios": [0.5], "band": 0}, "band must be"),
    ({"ratios": [0.5], "min_band": 0}, "min_band"),
    ({"ratios": [0.5], "z": -1}, "z must be"),
])
def test_bad_options_give_clear_errors(options, match):
    with pytest.raises(UpvitError, match=match):
        upvit.score(tiny_vit(**SHAPE), tiny_images(2), method="hybrid", **options)


def test_band_grows_by_exactly_the_channels_too_close_to_call():
    # 10 channels, estimate = exact except where set; keep 5; band ranks 4..5 scored exactly
    est = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.5, 3.0, 2.0, 1.0], dtype=torch.float64)
    exact = torch.full((10,), float("nan"), dtype=torch.float64)
    known = torch.zeros(10, dtype=torch.bool)
    exact[[4, 5]] = torch.tensor([6.0, 5.0], dtype=torch.float64)
    known[[4, 5]] = True
    p = hybrid_module.Problem("ffn.0", torch.arange(10), 5, torch.arange(10), up=1, down=1)
    d = hybrid_module._decide(p, exact, known)
    assert d["keep"] == {0, 1, 2, 3, 4} and d["t_keep"] == 6.0 and d["t_drop"] == 5.0
    # sigma 0.2, z 2 (a factor e^0.4 = 1.49): unscored channels above must exceed 5 * 1.49 = 7.46, so
    # channel 3 (7) fails and 8, 9, 10 clear; below they must stay under 6 / 1.49 = 4.02, so channel 6
    # (4.5) fails and 3, 2, 1 clear: each side grows by one
    assert hybrid_module._widen(p, d, est, mu=0.0, sigma=0.2, z=2.0)
    assert (p.up, p.down) == (2, 2) and p.band == (3, 7)
    # with those two scored, nothing is left too close: stable
    exact[[3, 6]] = torch.tensor([7.0, 4.5], dtype=torch.float64)
    known[[3, 6]] = True
    d = hybrid_module._decide(p, exact, known)
    assert d["keep"] == {0, 1, 2, 3, 4}
    assert not hybrid_module._widen(p, d, est, mu=0.0, sigma=0.2, z=2.0)
    # an uncalibrated site doubles both sides
    assert hybrid_module._widen(p, d, est, mu=0.0, sigma=float("inf"), z=2.0)
    assert (p.up, p.down) == (4, 4)


def test_tail_margin_catches_an_outlier_the_sigmas_miss():
    # the same problem with channels 3 and 6 scored: with sigma 0.1 and z 2 (a factor e^0.2 = 1.22) channel 2
    # (estimate 8) clears the dropped 5.0 (5 * 1.22 = 6.1) and nothing widens; but an error as large as the
    # largest one seen (0.6) times tail 1.6 (a factor e^0.96 = 2.61, 5 * 2.61 = 13.1) could put it below
    # 5.0, so the band grows over channels 2, 1, 0 above, and over 7 (3.0 > 6 / 2.61 = 2.30) below
    est = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.5, 3.0, 2.0, 1.0], dtype=torch.float64)
    exact = torch.full((10,), float("nan"), dtype=torch.float64)
    known = torch.zeros(10, dtype=torch.bool)
    exact[[3, 4, 5, 6]] = torch.tensor([7.0, 6.0, 5.0, 4.5], dtype=torch.float64)
    known[[3, 4, 5, 6]] = True
    p = hybrid_module.Problem("ffn.0", torch.arange(10), 5, torch.arange(10), up=2, down=2)
    d = hybrid_module._decide(p, exact, known)
    assert not hybrid_module._widen(p, d, est, mu=0.0, sigma=0.1, z=2.0, max_dev=0.6, tail=0.0)
    assert hybrid_module._widen(p, d, est, mu=0.0, sigma=0.1, z=2.0, max_dev=0.6, tail=1.6)
    assert (p.up, p.down) == (5, 3)
