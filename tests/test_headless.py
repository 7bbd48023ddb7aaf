"""A headless timm backbone (``num_classes=0``: the forward gives the pooled embedding), task-agnostic path of
issue 23 item 5: scored by 1 - cos of the embedding (not KL of a softmax over features), pruned (with
compensation), distilled label-free on its embedding, and evaluated by kNN top-1."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import upvit
from helpers import tiny_images, tiny_swin, tiny_vit
from importance.naive_vit import functional_vit, sliced_params
from upvit.adapters import get_adapter
from upvit.errors import UpvitError


def naive_cos_score(model: torch.nn.Module, images: torch.Tensor, key: str, channel: int) -> float:
    """sum over images of 1 - cos(e, e'), e the original's embedding and e' the embedding of the model with
    ``channel`` of ``key`` genuinely sliced out (hand-written functional ViT, float64, no masks, no engine).
    A removed residual channel is absent from e': it enters the cosine as 0 at its place."""
    patch, scale = model.patch_embed.patch_size[0], model.blocks[0].attn.head_dim ** -0.5
    with torch.no_grad():
        e = functional_vit(*sliced_params(model), images, patch, scale)
        e1 = functional_vit(*sliced_params(model, key, channel), images, patch, scale)
    if key == "res.0":
        e1 = torch.cat([e1[:, :channel], torch.zeros_like(e1[:, :1]), e1[:, channel:]], 1)
    return float((1 - F.cosine_similarity(e, e1, dim=-1)).sum())


CHANNELS = [("res.0", 3), ("res.0", 17), ("attn.0", 5), ("attn.1", 22), ("ffn.0", 7), ("ffn.1", 40)]


def test_headless_vit_is_scored_by_one_minus_cos_of_its_embedding():
    """The defect: a headless ViT's exact scores were the KL of a softmax over its raw features. Now the
    exact engine and the shared reference engine (greedy's first round) give sum of 1 - cos == naive."""
    model = tiny_vit(num_classes=0)
    images = tiny_images(6)
    adapter = get_adapter(model)
    assert adapter.divergence == "cosine" and get_adapter(tiny_vit()).divergence == "kl"
    scores = upvit.score(model, images, method="kl")
    assert scores.meta["criterion"] == "1 - cos" and scores.meta["divergence"] == "cosine"
    for key, c in CHANNELS:
        ref = naive_cos_score(model, images, key, c)
        assert ref > 1e-4  # the removal matters: the comparison can fail
        assert float(scores[key][c]) == pytest.approx(ref, rel=1e-4, abs=1e-7), (key, c)
    from upvit.importance.greedy import JointKL

    joint = JointKL(adapter, images, "res.0")
    first = joint.removals(torch.ones(24, dtype=torch.float64), torch.tensor([3, 17]))
    torch.testing.assert_close(first, scores["res.0"][[3, 17]], rtol=1e-5, atol=1e-9)


def test_headless_estimates_refuse_in_one_line():
    model, images = tiny_vit(num_classes=0), tiny_images(4)
    for method, options in (("fisher", {}), ("hybrid", {"ratios": [0.5]})):
        with pytest.raises(UpvitError, match="cosine divergence of its embeddings: use method 'kl'"):
            upvit.score(model, images, method=method, **options)
    with pytest.raises(UpvitError, match="needs a classifier's logits and labels"):
        upvit.score(model, images, method="taylor", labels=[0, 1, 0, 1])
    with pytest.raises(UpvitError, match="global_pool='token' or 'avg'"):
        get_adapter(tiny_vit(num_classes=0, global_pool=""))  # per-token output: no one embedding


def _zero_hidden(model: torch.nn.Module, block: torch.nn.Module, kind: str, j: int) -> torch.nn.Module:
    """A copy of ``model`` in which ``block``'s FFN hidden unit j (its fc1 row and bias: GELU(0) = 0) or
    attention dim j (its q, k and v rows and biases) is zeroed by hand."""
    new = copy.deepcopy(model)
    name = next(n for n, m in model.named_modules() if m is block)
    blk = new.get_submodule(name)
    with torch.no_grad():
        if kind == "ffn":
            blk.mlp.fc1.weight[j] = 0
            blk.mlp.fc1.bias[j] = 0
        else:
            a = blk.attn.qkv.out_features // 3
            for r in (j, a + j, 2 * a + j):
                blk.attn.qkv.weight[r] = 0
                blk.attn.qkv.bias[r] = 0
    return new


def test_headless_swin_is_scored_by_one_minus_cos_too():
    """Same rule for timm Swin: exact scores == 1 - cos of the model's own forward with the unit's weights
    zeroed by hand."""
    model = tiny_swin(num_classes=0)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert get_adapter(model).divergence == "cosine"
    scores = upvit.score(model, images, method="kl")
    blocks = [blk for layer in model.layers for blk in layer.blocks]
    with torch.no_grad():
        e = model(images).double()
        for key, j in (("ffn.0", 3), ("ffn.2", 10), ("attn.1", 2), ("attn.3", 5)):
            kind, b = key.split(".")
            e1 = _zero_hidden(model, blocks[int(b)], kind, j)(images).double()
            ref = float((1 - F.cosine_similarity(e, e1, dim=-1)).sum())
            assert ref > 1e-6
            assert float(scores[key][j]) == pytest.approx(ref, rel=1e-3, abs=1e-8), key
