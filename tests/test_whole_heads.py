"""Whole-head selection (issue 26, item 0): exact whole-head scores against a naive reference, the plan
keeps whole source heads, and the pruned model equals the masked original."""
from __future__ import annotations

import pytest
import torch

import upvit
from helpers import tiny_images, tiny_vit
from plan_helpers import random_scores
from upvit.adapters.base import Masks
from upvit.errors import UpvitError
from upvit.importance.heads import head_scores
from upvit.plan import summed_head_scores


def _naive_head_kl(model, images, site, head, head_dim, size):
    """KL(original || head removed), the head's q/k/v dims zeroed through a plain [size] mask."""
    adapter = upvit.get_adapter(model)
    with torch.no_grad():
        ref = torch.log_softmax(model(images).double(), -1)
        mask = torch.ones(size)
        mask[head * head_dim:(head + 1) * head_dim] = 0
        with adapter.masking(Masks({site: mask})):
            out = torch.log_softmax(model(images).double(), -1)
    return float((ref.exp() * (ref - out)).sum())


def test_head_scores_equal_the_naive_removal_of_each_head(one_thread):
    model, images = tiny_vit(), tiny_images(7)
    got = head_scores(model, images, batch_size=3)  # batches of 3, 3, 1 rows
    topo = upvit.get_adapter(model).topology()
    for site in (s for s in topo.sites if s.kind == "attn"):
        want = [_naive_head_kl(model, images, site.key, h, site.head_dim, site.size) for h in range(site.heads)]
        assert torch.allclose(got[site.key], torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-7)


def test_whole_head_plan_keeps_the_best_whole_heads_and_equals_the_masked_model(one_thread):
    model, images = tiny_vit(), tiny_images(6)
    topo = upvit.get_adapter(model).topology()
    scores = random_scores(model, seed=3)
    values = {"attn.0": torch.tensor([0.1, 0.9, 0.2, 0.8]), "attn.1": torch.tensor([0.5, 0.5, 0.7, 0.1])}
    plan = upvit.make_plan(model, scores, embed_dim=12, num_heads=2, mlp_hidden=24, heads="whole",
                           head_scores=values)
    assert plan.heads == {"attn.0": [[1], [3]], "attn.1": [[0], [2]]}  # ties (0.5, 0.5) keep the lower head
    assert plan.keep["attn.0"] == list(range(6, 12)) + list(range(18, 24))
    assert plan.keep["attn.1"] == list(range(0, 6)) + list(range(12, 18))
    assert plan.meta["heads"] == "whole"
    pruned = upvit.prune(model, plan)
    keep = {s.key: torch.zeros(s.size) for s in topo.sites}
    for key, idx in plan.keep.items():
        keep[key][idx] = 1
    with torch.no_grad(), upvit.get_adapter(model).masking(Masks(keep)):
        masked = model(images)
    with torch.no_grad():
        assert torch.allclose(pruned(images), masked, atol=1e-5, rtol=1e-5)


def test_whole_heads_with_fewer_dims_keep_the_best_dims_inside_each_kept_head():
    model = tiny_vit()
    topo = upvit.get_adapter(model).topology()
    scores = random_scores(model, seed=5)
    plan = upvit.make_plan(model, scores, embed_dim=8, num_heads=2, mlp_hidden=24, heads="whole")
    sums = summed_head_scores(topo, scores)
    for site in ("attn.0", "attn.1"):
        kept_heads = sorted(torch.argsort(-sums[site], stable=True)[:2].tolist())
        assert plan.heads[site] == [[h] for h in kept_heads]
        for j, h in enumerate(kept_heads):
            dims = plan.keep[site][4 * j:4 * (j + 1)]
            values = scores[site][h * 6:(h + 1) * 6]
            assert dims == sorted((h * 6 + torch.argsort(-values.double(), stable=True)[:4]).tolist())


def test_unknown_heads_mode_is_one_clear_error():
    model = tiny_vit()
    scores = random_scores(model, seed=0)
    with pytest.raises(UpvitError, match="heads must be one of merge, whole"):
        upvit.make_plan(model, scores, embed_dim=12, num_heads=2, mlp_hidden=24, heads="split")
