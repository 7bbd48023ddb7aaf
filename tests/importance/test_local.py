"""The attention estimate that is exact inside the block and second order after it."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_images, tiny_vit
from upvit.adapters import get_adapter
from upvit.adapters.base import Adapter, forward_from
from upvit.errors import UpvitError
from upvit.importance.fisher import fisher_scores
from upvit.importance.kl import kl_scores
from upvit.importance.local import local_attention_sums


@pytest.mark.parametrize("options", [dict(), dict(distilled=True), dict(init_values=0.5), dict(qkv_bias=False)])
def test_fast_attention_deltas_equal_the_masked_forward(options):
    model = tiny_vit(**options)
    adapter = get_adapter(model)
    with torch.no_grad():
        h = adapter.run("ffn.0", adapter.run("attn.0", adapter.begin(tiny_images(3))))
        idx = torch.tensor([0, 3, 6, 11, 23])  # dims in several heads, first and last of a head
        fast = adapter.attn_removal_deltas("attn.1", h, idx)
        generic = Adapter.attn_removal_deltas(adapter, "attn.1", h, idx)
    assert fast.shape == (5, *h.x.shape)
    assert torch.allclose(fast, generic, atol=1e-5, rtol=1e-4)
    assert generic.abs().amax() > 1e-2  # the removals do change the stream


def reference_local_kl(model, images, block: int, channel: int, eps: float = 1e-4) -> float:
    """1/2 sum_i dz_i^T (diag q_i - q_i q_i^T) dz_i, with the delta from the masked forward and the
    logit change dz = J delta by a central difference along delta, in float64."""
    adapter = get_adapter(model)
    with torch.no_grad():
        h = adapter.begin(images)
        for b in range(block):
            h = adapter.run(f"ffn.{b}", adapter.run(f"attn.{b}", h))
        mid = adapter.run(f"attn.{block}", h)
        delta = Adapter.attn_removal_deltas(adapter, f"attn.{block}", h, torch.tensor([channel]))[0]
        after = 2 * block + 1  # the units after attn.{block}: from ffn.{block} on
        up = forward_from(adapter, mid.replace(mid.x + eps * delta), after)[:, 0]
        down = forward_from(adapter, mid.replace(mid.x - eps * delta), after)[:, 0]
        dz = (up - down) / (2 * eps)
        q = torch.softmax(adapter.forward(images), -1)
    cov = torch.diag_embed(q) - q.unsqueeze(2) * q.unsqueeze(1)
    return float(0.5 * torch.einsum("bk,bkl,bl->", dz, cov, dz))


@pytest.mark.parametrize("distilled", [False, True])
def test_local_estimate_equals_a_directional_derivative_reference(distilled):
    model = tiny_vit(distilled=distilled).double()
    images = tiny_images(4).double()
    sums = local_attention_sums(get_adapter(model), images, batch_size=3)
    for block, channel in [(0, 0), (0, 13), (1, 5), (1, 23)]:
        ref = reference_local_kl(model, images, block, channel)
        assert 0.5 * float(sums[f"attn.{block}"][channel]) == pytest.approx(ref, rel=1e-6)


def test_local_estimate_is_closer_to_exact_than_fisher_for_attention():
    # small weights: removals are small perturbations, where both estimates should be good, the local
    # one (exact inside the block) better than the fully linearised one
    model = tiny_vit(std=0.15).double()
    images = tiny_images(6).double()
    adapter = get_adapter(model)
    exact = kl_scores(adapter, images, progress=False)
    fisher = fisher_scores(adapter, images, attention="fisher")
    local = fisher_scores(adapter, images, attention="local")
    assert local.meta["attention"] == "local"
    for b in range(adapter.topology().num_blocks):
        e = exact.attn[b].double()
        err_local = ((local.attn[b].double() - e).abs() / e).median()
        err_fisher = ((fisher.attn[b].double() - e).abs() / e).median()
        assert err_local < err_fisher
        assert err_local < 0.05
    assert torch.equal(local.embed, fisher.embed) and all(torch.equal(a, b) for a, b in zip(local.ffn, fisher.ffn))


def test_unknown_attention_option_is_refused():
    model = tiny_vit()
    with pytest.raises(UpvitError, match="attention must be"):
        fisher_scores(get_adapter(model), tiny_images(2), attention="exact")


def test_per_block_gradients_equal_the_one_pass_gradients(monkeypatch):
    # above GRADIENT_BYTES the stream gradients are taken block by block: same sums
    import upvit.importance.local as local

    model = tiny_vit(distilled=True)
    images = tiny_images(5)
    one_pass = local.local_attention_sums(get_adapter(model), images, batch_size=4)
    monkeypatch.setattr(local, "GRADIENT_BYTES", 0)
    per_block = local.local_attention_sums(get_adapter(model), images, batch_size=4)
    for key in one_pass:
        assert torch.allclose(one_pass[key], per_block[key], rtol=1e-5, atol=1e-12)


def test_single_class_model_scores_zero():
    # one class: p = q whatever is removed, so there is no direction to differentiate and every score is 0
    model = tiny_vit(num_classes=1)
    sums = local_attention_sums(get_adapter(model), tiny_images(3))
    assert all(v.shape == (24,) and not v.any() for v in sums.values())
