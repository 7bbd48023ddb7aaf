"""Magnitude and random baseline scorers."""
from __future__ import annotations

import math

import pytest
import torch

import upvit
from helpers import TINY, tiny_images, tiny_vit
from upvit.adapters import get_adapter


def _zeroed_tiny():
    model = tiny_vit()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_magnitude_hand_computed_ffn_and_attn():
    model = _zeroed_tiny()
    blk = model.blocks[1]
    with torch.no_grad():
        blk.mlp.fc1.weight[2, 0] = 3.0      # unit 2 in, residual channel 0
        blk.mlp.fc2.weight[1, 2] = 4.0      # unit 2 out, residual channel 1
        blk.mlp.fc1.bias[5] = 12.0          # unit 5 bias only
        # attention dim 3: q row 3, k row 3 (= qkv row 24 + 3), v bias 3, proj column 3
        blk.attn.qkv.weight[3, 7] = 1.0
        blk.attn.qkv.weight[TINY["embed_dim"] + 3, 8] = 2.0
        blk.attn.qkv.bias[2 * TINY["embed_dim"] + 3] = 2.0
        blk.attn.proj.weight[9, 3] = 4.0
    s = upvit.score(model, tiny_images(2), method="magnitude")
    ffn = torch.zeros(48, dtype=torch.float64)
    ffn[2], ffn[5] = 5.0, 12.0              # sqrt(9 + 16), |12|
    assert torch.equal(s.ffn[1], ffn)
    assert torch.count_nonzero(s.ffn[0]) == 0
    attn = torch.zeros(24, dtype=torch.float64)
    attn[3] = 5.0                           # sqrt(1 + 4 + 4 + 16)
    assert torch.equal(s.attn[1], attn)
    embed = torch.zeros(24, dtype=torch.float64)
    embed[0], embed[1], embed[7], embed[8], embed[9] = 3.0, 4.0, 1.0, 2.0, 4.0
    assert torch.equal(s.embed, embed)
    assert s.meta["criterion"] == "magnitude"


def _reference_magnitude(model) -> dict[str, torch.Tensor]:
    """Independent reference from state-dict names: which axis of each tensor is which channel."""
    d = model.embed_dim
    emb = torch.zeros(d, dtype=torch.float64)
    attn = {b: torch.zeros(d, dtype=torch.float64) for b in range(len(model.blocks))}
    ffn = {b: torch.zeros(model.blocks[b].mlp.fc1.out_features, dtype=torch.float64) for b in range(len(model.blocks))}
    for name, t in model.state_dict().items():
        t = t.double()
        sq = t.pow(2)
        if name in ("cls_token", "pos_embed", "dist_token"):
            emb += sq.sum((0, 1))
        elif name.startswith("patch_embed.proj"):
            emb += sq.reshape(d, -1).sum(1)
        elif name.startswith(("norm.", "fc_norm.")) or ".norm1." in name or ".norm2." in name:
            emb += sq
        elif name.startswith("head") and name.endswith("weight"):
            emb += sq.sum(0)
        elif name.startswith("blocks."):
            b = int(name.split(".")[1])
            if name.endswith("attn.qkv.weight"):
                emb += sq.sum(0)
                attn[b] += sq[:d].sum(1) + sq[d:2 * d].sum(1) + sq[2 * d:].sum(1)
            elif name.endswith("attn.qkv.bias"):
                attn[b] += sq[:d] + sq[d:2 * d] + sq[2 * d:]
            elif name.endswith("attn.proj.weight"):
                emb += sq.sum(1)
                attn[b] += sq.sum(0)
            elif name.endswith("attn.proj.bias") or name.endswith("mlp.fc2.bias"):
                emb += sq
            elif name.endswith("mlp.fc1.weight"):
                emb += sq.sum(0)
                ffn[b] += sq.sum(1)
            elif name.endswith("mlp.fc1.bias"):
                ffn[b] += sq
            elif name.endswith("mlp.fc2.weight"):
                emb += sq.sum(1)
                ffn[b] += sq.sum(0)
    out = {"res.0": emb.sqrt()}
    for b in attn:
        out[f"attn.{b}"], out[f"ffn.{b}"] = attn[b].sqrt(), ffn[b].sqrt()
    return out


@pytest.mark.parametrize("distilled", [False, True])
def test_magnitude_matches_state_dict_reference(distilled):
    model = tiny_vit(distilled=distilled)
    s = upvit.score(model, tiny_images(2), method="magnitude")
    ref = _reference_magnitude(model)
    for key, value in s.items():
        torch.testing.assert_close(value, ref[key], rtol=1e-12, atol=0)


def test_magnitude_covers_every_residual_parameter():
    """Each parameter with a residual-width axis contributes to the embed score: perturbing any one
    of them changes it."""
    model = tiny_vit()
    adapter = get_adapter(model)
    listed = {t.data_ptr() for t, _ in adapter.channel_weights("res.0")}
    width = {n for n, p in model.named_parameters() if TINY["embed_dim"] in p.shape}
    missing = [n for n, p in model.named_parameters() if n in width and p.data_ptr() not in listed]
    assert missing == []


def test_random_is_seeded_and_uniform():
    model = tiny_vit()
    a = upvit.score(model, tiny_images(2), method="random", seed=3)
    b = upvit.score(model, tiny_images(2), method="random", seed=3)
    c = upvit.score(model, tiny_images(2), method="random", seed=4)
    g = torch.Generator().manual_seed(3)
    expected = torch.rand(24, generator=g, dtype=torch.float64)  # the first site drawn is res.0
    assert torch.equal(a.embed, expected)
    for (key, x), (_, y), (_, z) in zip(a.items(), b.items(), c.items()):
        assert torch.equal(x, y), key
        assert not torch.equal(x, z), key
        assert x.dtype == torch.float64 and ((x >= 0) & (x < 1)).all()
    assert a.meta["seed"] == 3 and a.meta["criterion"] == "random"
    all_scores = torch.cat([x for _, x in a.items()])
    assert math.isclose(all_scores.mean().item(), 0.5, abs_tol=0.1)


def test_unknown_site_is_one_clear_error():
    with pytest.raises(upvit.UpvitError, match="no site"):
        get_adapter(tiny_vit()).channel_weights("ffn.9")
