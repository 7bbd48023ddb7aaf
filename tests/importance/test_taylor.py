"""First-order Taylor scorer: against an independent gradient computation, a finite-difference check,
labels from a labelled dataset, the CLI, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import upvit
from helpers import TINY, run_main, tiny_images, tiny_vit
from upvit.io import save

LABELS = torch.tensor([0, 3, 1, 4, 2, 3])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)


def _reference(model, images, labels, reduction):
    """From state-dict names and a plain autograd pass over the model's own forward (no adapter):
    which axis of each parameter belongs to which channel, and |w * g| (or w * g) summed there."""
    m = copy.deepcopy(model).double().requires_grad_(True)
    loss = F.cross_entropy(m(images.double()), labels, reduction="sum")
    loss.backward()
    d = m.embed_dim
    per = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
    emb = per(d)
    attn = {b: per(d) for b in range(len(m.blocks))}
    ffn = {b: per(m.blocks[b].mlp.fc1.out_features) for b in range(len(m.blocks))}
    for name, p in m.named_parameters():
        wg = (p * p.grad).detach()
        t = wg.abs() if reduction == "weight" else wg
        if name in ("cls_token", "pos_embed", "dist_token"):
            emb += t.sum((0, 1))
        elif name.startswith("patch_embed.proj"):
            emb += t.reshape(d, -1).sum(1)
        elif name.startswith(("norm.", "fc_norm.")) or ".norm1." in name or ".norm2." in name:
            emb += t
        elif name.startswith("head") and name.endswith("weight"):
            emb += t.sum(0)
        elif name.startswith("blocks."):
            b = int(name.split(".")[1])
            if name.endswith("attn.qkv.weight"):
                emb += t.sum(0)
                attn[b] += t[:d].sum(1) + t[d:2 * d].sum(1) + t[2 * d:].sum(1)
            elif name.endswith("attn.qkv.bias"):
                attn[b] += t[:d] + t[d:2 * d] + t[2 * d:]
            elif name.endswith("attn.proj.weight"):
                emb += t.sum(1)
                attn[b] += t.sum(0)
            elif name.endswith("attn.proj.bias") or name.endswith("mlp.fc2.bias"):
                emb += t
            elif name.endswith("mlp.fc1.weight"):
                emb += t.sum(0)
                ffn[b] += t.sum(1)
            elif name.endswith("mlp.fc1.bias"):
                ffn[b] += t
            elif name.endswith("mlp.fc2.weight"):
                emb += t.sum(1)
                ffn[b] += t.sum(0)
    out = {"res.0": emb}
    for b in attn:
        out[f"attn.{b}"], out[f"ffn.{b}"] = attn[b], ffn[b]
    if reduction == "channel":
        out = {k: v.abs() for k, v in out.items()}
    return out


@pytest.mark.parametrize("reduction", ["weight", "channel"])
@pytest.mark.parametrize("distilled", [False, True])
def test_taylor_matches_independent_reference(reduction, distilled):
    model = tiny_vit(distilled=distilled, std=0.2).double()
    images = tiny_images(6)  # float32 values (upvit.score hands the scorer float32 images), run in float64
    s = upvit.score(model, images, method="taylor", labels=LABELS, reduction=reduction, batch_size=4)
    ref = _reference(model, images, LABELS, reduction)
    for key, value in s.items():
        torch.testing.assert_close(value, ref[key], rtol=1e-9, atol=1e-12)
        assert (value > 0).any(), key
    assert s.meta["criterion"] == "taylor" and s.meta["reduction"] == reduction and s.meta["num_images"] == 6


def _loss(model, images, labels):
    with torch.no_grad():
        return F.cross_entropy(model(images), labels, reduction="sum").item()


def test_channel_reduction_is_the_derivative_of_scaling_the_channel():
    """|sum of w * dL/dw| over a channel's weights = |d/dt L(channel's weights times t)| at t = 1, here
    by a central finite difference of the model's own forward (the slices written out by hand)."""
    model = tiny_vit(std=0.2).double()
    images, d = tiny_images(6).double(), TINY["embed_dim"]  # float32 values, exact in float64
    s = upvit.score(model, images, method="taylor", labels=LABELS, reduction="channel")
    blk = 1

    def scaled(t, site, c):
        m = copy.deepcopy(model)
        b = m.blocks[blk]
        with torch.no_grad():
            if site == "ffn":
                b.mlp.fc1.weight[c] *= t
                b.mlp.fc1.bias[c] *= t
                b.mlp.fc2.weight[:, c] *= t
            else:
                for r in (c, d + c, 2 * d + c):
                    b.attn.qkv.weight[r] *= t
                    b.attn.qkv.bias[r] *= t
                b.attn.proj.weight[:, c] *= t
        return m

    h = 1e-5
    for site, c in [("ffn", 0), ("ffn", 7), ("attn", 3), ("attn", 20)]:
        fd = (_loss(scaled(1 + h, site, c), images, LABELS) - _loss(scaled(1 - h, site, c), images, LABELS)) / (2 * h)
        assert s[f"{site}.{blk}"][c].item() == pytest.approx(abs(fd), rel=1e-6, abs=1e-9), (site, c)


def test_labels_come_from_a_labelled_dataset_and_frozen_models_are_left_alone():
    model = tiny_vit(std=0.2)
    model.requires_grad_(False)  # e.g. a distillation teacher
    images = tiny_images(6)
    explicit = upvit.score(model, images, method="taylor", labels=LABELS)
    from_dataset = upvit.score(model, TensorDataset(images, LABELS), method="taylor")
    for (key, a), (_, b) in zip(explicit.items(), from_dataset.items()):
        assert torch.equal(a, b), key
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    # other labels, other scores
    other = upvit.score(model, images, method="taylor", labels=(LABELS + 1) % 5)
    assert not torch.equal(other["ffn.0"], explicit["ffn.0"])


@pytest.mark.parametrize("options, match", [
    ({}, "needs the proxy images' labels"),
    ({"labels": [0, 1]}, "got 2 labels for 6"),
    ({"labels": [0, 1, 2, 3, 4, 5]}, "label 5 is not a class"),
    ({"labels": [0.0] * 6}, "integer class indices"),
    ({"labels": LABELS, "reduction": "mean"}, "reduction must be"),
])
def test_bad_input_is_one_clear_error(options, match):
    with pytest.raises(upvit.UpvitError, match=match):
        upvit.score(tiny_vit(), tiny_images(6), method="taylor", **options)


def test_cli_score_taylor_uses_the_proxy_labels(tmp_path):
    from upvit.data import load_data, sample_proxy

    model = tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10, std=0.2)
    model.upvit_config.data_config.update({"mean": [0.2725], "std": [0.4056]})
    save(model, str(tmp_path / "m"))
    out = str(tmp_path / "t.safetensors")
    r = run_main("score", tmp_path / "m", "--data", "animal-mnist:train", "--proxy-size", "6", "--seed", "2",
                 "--method", "taylor", "--out", out)
    assert r.returncode == 0, r.stderr
    got = upvit.Scores.load(out)
    subset, _ = sample_proxy(load_data("animal-mnist:train")[0], size=6, seed=2)
    want = upvit.score(upvit.load(str(tmp_path / "m")), subset, method="taylor")
    for key, t in want.items():
        torch.testing.assert_close(got[key], t, rtol=1e-6, atol=1e-9)
    assert got.meta["criterion"] == "taylor" and got.meta["proxy"]["seed"] == 2
