"""Greedy residual selection under the joint removal: against a brute-force greedy reference."""
from __future__ import annotations

import pytest
import torch

import upvit
from helpers import run_main, tiny_images, tiny_swin, tiny_vit
from upvit.adapters import Masks, get_adapter
from upvit.importance.greedy import JointKL, greedy_path
from upvit.importance.kl import kl_scores

SHAPE = dict(embed_dim=48, num_heads=4, mlp_ratio=4.0)
TARGETS = [dict(embed_dim=24, num_heads=2, mlp_hidden=96), dict(embed_dim=12, num_heads=1, mlp_hidden=48)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)


def brute_force_greedy(model, images, key, widths, batch):
    """The definition, naively: every round, one masked forward of the whole proxy set per surviving
    channel (the removed ones and it zeroed in a [size] keep-mask), KL against the intact model."""
    adapter = get_adapter(model)
    size = adapter.topology().site(key).size
    with torch.no_grad():
        logq = torch.log_softmax(adapter.forward(images).double(), -1)
        alive, rounds, after = list(range(size)), [], {}
        while len(alive) > min(widths):
            nxt = max(w for w in widths if w < len(alive))
            b = min(batch, len(alive) - nxt)
            values = {}
            for c in alive:
                keep = torch.zeros(size)
                keep[[i for i in alive if i != c]] = 1
                logp = torch.log_softmax(adapter.forward(images, Masks({key: keep})).double(), -1)
                values[c] = float((logq.exp() * (logq - logp)).sum())
            chosen = sorted(alive, key=lambda c: (values[c], c))[:b]
            rounds.append({c: values[c] for c in chosen})
            alive = [c for c in alive if c not in chosen]
            after[len(alive)] = sorted(alive)
    return rounds, after


@pytest.fixture(scope="module")
def setup():
    model = tiny_vit(distilled=True, std=0.25, **SHAPE)
    images = tiny_images(8)
    return model, images, brute_force_greedy(model, images, "res.0", [24, 12], batch=5)


def _check_rounds(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g["removed"]) == sorted(w)
        for c, s in zip(g["removed"], g["scores"]):
            assert s == pytest.approx(w[c], rel=1e-5, abs=1e-10)


def test_exact_rounds_equal_brute_force(setup):
    model, images, (rounds, after) = setup
    s = upvit.score(model, images, method="greedy", targets=TARGETS, batch=5, screen=False)
    path = s.meta["greedy"]["res.0"]
    _check_rounds(path["rounds"], rounds)
    assert [r["alive_before"] for r in path["rounds"]] == [48, 43, 38, 33, 28, 24, 19, 14]  # lands on 24, then 12
    for target in TARGETS:  # make_plan keeps the greedy set at every width of the path
        assert upvit.make_plan(model, s, **target).keep_embed == after[target["embed_dim"]]
    # the other sites carry the exact one-shot scores
    one_shot = kl_scores(get_adapter(model), images, progress=False)
    for key in one_shot.keys():
        if key != "res.0":
            torch.testing.assert_close(s[key], one_shot[key], rtol=1e-6, atol=1e-12)


def test_given_initial_scores_save_the_first_round_only_when_they_are_exact(setup):
    model, images, (rounds, after) = setup
    initial = kl_scores(get_adapter(model), images, progress=False)
    s = upvit.score(model, images, method="greedy", targets=TARGETS, batch=5, initial=initial)
    path = s.meta["greedy"]["res.0"]
    _check_rounds(path["rounds"], rounds)
    assert path["initial_exact"] and path["rounds"][0]["scored"] == 0 and path["rounds"][1]["scored"] == 43
    assert torch.equal(s["ffn.1"], initial["ffn.1"].double())
    # scores that are not this model's exact ones are only a starting point: every round is scored
    g = torch.Generator().manual_seed(0)
    initial.values["res.0"] = initial["res.0"][torch.randperm(48, generator=g)]
    s = upvit.score(model, images, method="greedy", targets=TARGETS, batch=5, initial=initial)
    path = s.meta["greedy"]["res.0"]
    assert not path["initial_exact"] and path["rounds"][0]["scored"] == 48
    _check_rounds(path["rounds"], rounds)


class SmoothJoint:
    """A stand-in for JointKL whose scores drift smoothly as channels go: value_c(R) =
    base_c * (1 + 0.1 |R|) + |R| / 100 + a small deterministic wobble; counts evaluations."""

    def __init__(self, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.rand(size, generator=g, dtype=torch.float64)
        self.site = type("Site", (), {"size": size})()
        self.evaluations = 0

    def removals(self, keep, idx):
        removed = float((1 - keep).sum())
        idx = torch.as_tensor(idx)
        self.evaluations += idx.numel()
        wobble = 1e-3 * torch.sin(idx.double() * 1.7 + removed)
        return self.base[idx] * (1 + 0.1 * removed) + removed / 100 + wobble

    def current(self, keep):
        return float((1 - keep).sum())


def test_screening_equals_exact_greedy_when_scores_drift_smoothly_and_scores_fewer():
    exact_joint, screened_joint = SmoothJoint(200), SmoothJoint(200)
    exact = greedy_path(exact_joint, [100, 50], exact_joint.base, batch=10, screen=False, exact_initial=True)
    screened = greedy_path(screened_joint, [100, 50], screened_joint.base, batch=10, screen=True, exact_initial=True)
    assert [sorted(r["removed"]) for r in screened["rounds"]] == [sorted(r["removed"]) for r in exact["rounds"]]
    assert screened["survivors"] == exact["survivors"]
    assert screened_joint.evaluations < 0.6 * exact_joint.evaluations, (screened_joint.evaluations,
                                                                        exact_joint.evaluations)
    # a larger wobble than the margin allows is caught by re-scoring, not missed
    loud = SmoothJoint(200)
    loud.removals = lambda keep, idx, f=loud.removals: f(keep, idx) + 0.2 * torch.cos(
        torch.as_tensor(idx).double() * 3.1 + float((1 - keep).sum()))
    ref = SmoothJoint(200)
    ref.removals = lambda keep, idx, f=ref.removals: f(keep, idx) + 0.2 * torch.cos(
        torch.as_tensor(idx).double() * 3.1 + float((1 - keep).sum()))
    a = greedy_path(loud, [100, 50], loud.base, batch=10, screen=True, exact_initial=False)
    b = greedy_path(ref, [100, 50], ref.base, batch=10, screen=False, exact_initial=False)
    assert [sorted(r["removed"]) for r in a["rounds"]] == [sorted(r["removed"]) for r in b["rounds"]]


def test_screening_on_a_model_with_an_unbounded_margin_is_exact(setup):
    """Wiring check on a real model: with z so large that no screen value is trusted, every survivor
    is re-scored and the result is the brute-force greedy one."""
    model, images, (rounds, after) = setup
    s = upvit.score(model, images, method="greedy", targets=TARGETS, batch=5, screen=True, z=1e9)
    _check_rounds(s.meta["greedy"]["res.0"]["rounds"], rounds)
    assert s.meta["screen"] is True


def test_joint_kl_of_the_one_shot_choice(setup):
    model, images, _ = setup
    s = upvit.score(model, images, method="greedy", targets=[TARGETS[1]], batch=12, screen=False)
    one_shot = upvit.make_plan(model, kl_scores(get_adapter(model), images, progress=False), **TARGETS[1]).keep_embed
    keep = torch.zeros(48)
    keep[one_shot] = 1
    adapter = get_adapter(model)
    with torch.no_grad():
        logq = torch.log_softmax(adapter.forward(images).double(), -1)
        logp = torch.log_softmax(adapter.forward(images, Masks({"res.0": keep})).double(), -1)
    want = float((logq.exp() * (logq - logp)).sum())
    assert s.meta["greedy"]["res.0"]["one_shot_joint_kl"][12] == pytest.approx(want, rel=1e-6)
    # the joint divergence after the last round is the greedy set's
    keep = torch.zeros(48)
    keep[s.meta["greedy"]["res.0"]["survivors"]] = 1
    with torch.no_grad():
        logp = torch.log_softmax(adapter.forward(images, Masks({"res.0": keep})).double(), -1)
    assert s.meta["greedy"]["res.0"]["rounds"][-1]["joint_kl"] == pytest.approx(
        float((logq.exp() * (logq - logp)).sum()), rel=1e-6)


def test_multi_stage_residual_sites_start_from_their_stage():
    model, images = tiny_swin(std=0.2), tiny_images(4, img_size=32)
    s = upvit.score(model, images, method="greedy", ratios=[0.5], batch=3, screen=False)
    for key, width in (("res.1", 8), ("res.2", 16)):
        rounds, after = brute_force_greedy(model, images, key, [width], batch=3)
        _check_rounds(s.meta["greedy"][key]["rounds"], rounds)
        assert sorted(s.meta["greedy"][key]["survivors"]) == after[width]
    joint = JointKL(get_adapter(model), images, "res.2")
    assert joint.start == get_adapter(model).topology().start_unit("res.2") > 0


@pytest.mark.parametrize("options, match", [
    ({"targets": TARGETS, "batch": 0}, "batch"),
    ({"targets": TARGETS, "initial": {"res.0": 1}}, "initial must be upvit Scores"),
    ({}, "needs exactly one of targets"),
    ({"targets": TARGETS, "z": -1}, "z must be"),
])
def test_bad_input_is_one_clear_error(options, match):
    with pytest.raises(upvit.UpvitError, match=match):
        upvit.score(tiny_vit(**SHAPE), tiny_images(2), method="greedy", **options)


def test_cli_score_greedy(tmp_path):
    from upvit.data import load_data, sample_proxy
    from upvit.io import save

    model = tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10, std=0.25)
    model.upvit_config.data_config.update({"mean": [0.2725], "std": [0.4056]})
    save(model, str(tmp_path / "m"))
    out = str(tmp_path / "g.safetensors")
    cmd = ["score", str(tmp_path / "m"), "--data", "animal-mnist:train", "--proxy-size", "4",
           "--method", "greedy", "--target", "12,2,24", "--out", out]
    r = run_main(*cmd, "--batch-size", "4")  # in-process: one thread, as the reference
    assert r.returncode == 0, r.stderr
    got = upvit.Scores.load(out)
    subset, _ = sample_proxy(load_data("animal-mnist:train")[0], size=4, seed=0)
    images = torch.stack([subset[i][0] for i in range(4)])
    rounds, after = brute_force_greedy(upvit.load(str(tmp_path / "m")), images, "res.0", [12], batch=16)
    assert upvit.make_plan(model, got, embed_dim=12, num_heads=2, mlp_hidden=24).keep_embed == after[12]
    r = run_main(*cmd[:-6], "--method", "greedy", "--out", out)
    assert r.returncode != 0 and "--method greedy needs the target shapes" in r.stderr


def test_an_interrupted_run_resumes_from_its_rounds(setup, tmp_path):
    model, images, (rounds, after) = setup
    import upvit.importance.greedy as greedy_module

    state = str(tmp_path / "greedy.json")
    real = greedy_module.JointKL.removals
    calls = {"n": 0}

    def dying(self, keep, idx):
        calls["n"] += 1
        if float((1 - keep).sum()) >= 15:  # killed in the fourth round
            raise KeyboardInterrupt
        return real(self, keep, idx)

    greedy_module.JointKL.removals = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            upvit.score(model, images, method="greedy", targets=TARGETS, batch=5, state_path=state)
    finally:
        greedy_module.JointKL.removals = real
    import json

    with open(state) as f:
        assert len(json.load(f)["sites"]["res.0"]) == 3
    s = upvit.score(model, images, method="greedy", targets=TARGETS, batch=5, state_path=state)
    path = s.meta["greedy"]["res.0"]
    _check_rounds(path["rounds"], rounds)
    assert [r["scored"] for r in path["rounds"][3:5]] == [33, 28]
    with pytest.raises(upvit.UpvitError, match="another model"):
        upvit.score(model, images, method="greedy", targets=TARGETS, batch=6, state_path=state)
