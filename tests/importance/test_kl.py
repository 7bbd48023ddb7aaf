"""The exact KL engine: the generic path without fast paths against a naive slice-and-rerun reference (every
family's engine against its naive reference is in tests/contract), candidates, batching, persistence, resume,
bad input."""
from __future__ import annotations

import math
import os

import pytest
import torch

import upvit
from helpers import tiny_images, tiny_vit
from naive_vit import naive_score
from upvit.adapters import get_adapter
from upvit.adapters.timm_vit import TimmViTAdapter
from upvit.errors import UpvitError
from upvit.importance.kl import kl_scores, partial_path

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)


def assert_matches_naive(model, images, scores, keys=None) -> None:
    """Every scored channel equals the naive reference: relative error < 1e-4 on channels that matter
    (score >= 1% of the largest), absolute error < 1e-6 x the largest elsewhere."""
    top = max(float(t[torch.isfinite(t)].abs().max()) for _, t in scores.items() if torch.isfinite(t).any())
    assert top > 1e-3, "the tiny model should react to removals"
    worst = 0.0
    for key, t in scores.items():
        if keys is not None and key not in keys:
            continue
        for c in range(t.numel()):
            ref = naive_score(model, images, key, c)
            err = abs(float(t[c]) - ref) / max(abs(ref), 1e-2 * top)
            worst = max(worst, err)
            assert err < 1e-4, f"{key}[{c}]: engine {float(t[c])!r} vs naive {ref!r}"
    assert worst >= 0.0


class PlainAdapter(TimmViTAdapter):
    """The same model without the adapter's optional fast paths (rank-1 FFN, head tokens)."""

    def build_topology(self):
        import dataclasses

        return dataclasses.replace(super().build_topology(), head_tokens=None)

    def ffn_rank1(self, unit, stream):
        return None


def test_generic_path_without_fast_paths_equals_naive():
    model = tiny_vit(seed=3, depth=3)
    images = tiny_images(5, seed=4)
    plain = kl_scores(PlainAdapter(model), images, batch_size=3, candidate_batch=7, progress=False)
    fast = kl_scores(get_adapter(model), images, batch_size=3, candidate_batch=7, progress=False)
    for key, t in plain.items():
        torch.testing.assert_close(fast[key], t, rtol=1e-4, atol=1e-9 * float(t.max()))
    assert_matches_naive(model, images, plain, keys={"res.0", "attn.2", "ffn.1", "ffn.2"})


def test_candidates_only_scores_those_and_batching_does_not_matter():
    model = tiny_vit(seed=5)
    images = tiny_images(5, seed=6)
    full = kl_scores(get_adapter(model), images, batch_size=2, candidate_batch=3, progress=False)
    chosen = {"res.0": [3, 0, 3], "ffn.1": [47, 5], "attn.0": [11]}
    part = kl_scores(get_adapter(model), images, batch_size=5, candidate_batch=16, candidates=chosen, progress=False)
    for key, t in part.items():
        picked = sorted(set(chosen.get(key, [])))
        rest = [i for i in range(t.numel()) if i not in picked]
        assert torch.isnan(t[rest]).all()
        top = float(full[key].max())
        torch.testing.assert_close(t[picked], full[key][picked], rtol=1e-5, atol=1e-6 * top)
        for c in picked:
            assert math.isclose(float(t[c]), naive_score(model, images, key, c), rel_tol=1e-4)
    with pytest.raises(UpvitError, match="ffn.9"):
        kl_scores(get_adapter(model), images, candidates={"ffn.9": [0]}, progress=False)
    with pytest.raises(UpvitError, match="out of range"):
        kl_scores(get_adapter(model), images, candidates={"ffn.0": [48]}, progress=False)


def test_saved_scores_round_trip_with_metadata(tmp_path):
    model = tiny_vit(distilled=True)
    images = tiny_images(4)
    out = str(tmp_path / "s.safetensors")
    scores = kl_scores(get_adapter(model), images, out=out, progress=False,
                       proxy_meta={"sampling": "random", "seed": 7, "num_images": 4})
    loaded = upvit.Scores.load(out)
    for key, t in scores.items():
        assert torch.equal(loaded[key], t)
    assert loaded.meta["criterion"] == "kl" and loaded.meta["proxy"]["seed"] == 7
    assert loaded.meta["model"]["residual"] == [24] and loaded.meta["num_images"] == 4
    assert loaded.meta["wall_time_s"] > 0
    assert not os.path.exists(partial_path(out))


class Interrupt(Exception):
    pass


def test_kill_and_resume_gives_identical_scores(tmp_path):
    model = tiny_vit(seed=2, depth=3)
    images = tiny_images(5, seed=3)
    reference = kl_scores(get_adapter(model), images, batch_size=2, candidate_batch=4, progress=False)

    out = str(tmp_path / "scores.safetensors")
    seen = []

    def die_after_three(key):
        seen.append(key)
        if len(seen) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        kl_scores(get_adapter(model), images, batch_size=2, candidate_batch=4, out=out, progress=False,
                  callback=die_after_three)
    assert seen == ["res.0", "attn.0", "ffn.0"]
    assert os.path.exists(partial_path(out)) and not os.path.exists(out)
    with pytest.raises(UpvitError):  # a partial state is never taken for a scores file
        upvit.Scores.load(partial_path(out))

    other = tiny_vit(seed=9, depth=3)
    with pytest.raises(UpvitError, match="the model's weights differ"):  # says which part differs (issue 21)
        kl_scores(get_adapter(other), images, batch_size=2, candidate_batch=4, out=out, resume=True, progress=False)
    with pytest.raises(UpvitError, match="the proxy set differs"):
        kl_scores(get_adapter(model), images[:4], batch_size=2, candidate_batch=4, out=out, resume=True, progress=False)

    resumed_sites = []
    resumed = kl_scores(get_adapter(model), images, batch_size=2, candidate_batch=4, out=out, resume=True,
                        progress=False, callback=resumed_sites.append)
    assert resumed_sites == ["attn.1", "ffn.1", "attn.2", "ffn.2"]
    assert resumed.meta["resumed"] is True
    final = upvit.Scores.load(out)
    for key, t in reference.items():
        assert torch.equal(resumed[key], t), key
        assert torch.equal(final[key], t), key
    assert not os.path.exists(partial_path(out))


def test_nan_logits_give_one_clear_error():
    model = tiny_vit()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(UpvitError, match="NaN or inf"):
        upvit.score(model, tiny_images(3))


def test_bad_inputs_give_clear_errors():
    with pytest.raises(UpvitError, match="no adapter"):
        upvit.score(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 5)), tiny_images(2))
    model = tiny_vit()
    with pytest.raises(UpvitError, match="empty"):
        upvit.score(model, torch.empty(0, 3, 16, 16))
    with pytest.raises(UpvitError, match="expects"):
        upvit.score(model, torch.randn(2, 3, 20, 20))
    with pytest.raises(UpvitError, match="non-empty"):
        kl_scores(get_adapter(model), torch.randn(3, 16, 16))
    with pytest.raises(UpvitError, match="resume needs"):
        kl_scores(get_adapter(model), tiny_images(2), resume=True)
