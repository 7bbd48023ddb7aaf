"""A channel's weights declared once (Adapter.channel_slices): every state-dict key is claimed by a site or
declared untouched, slicing derived from the declaration equals an independent slice-by-hand reference,
and magnitude, Taylor and surgery all read the same declaration.

Families that declare their channels so far: timm ViT/DeiT. (The other families still list
``channel_weights`` and write their surgery slicing by hand; their test rows join ``DECLARED`` as they
move over.)"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import upvit
from helpers import tiny_images, tiny_vit
from plan_helpers import random_scores
from upvit.adapters import get_adapter
from upvit.adapters.slicing import apply_rules, declared_weights

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "importance"))
from naive_vit import sliced_params  # noqa: E402

DECLARED = {
    "vit": lambda: tiny_vit(),
    "deit-distilled": lambda: tiny_vit(distilled=True),
    "vit-layerscale-regs": lambda: tiny_vit(init_values=0.5, reg_tokens=2, class_token=True),
}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_every_state_dict_key_is_claimed_or_declared_untouched(name):
    adapter = get_adapter(DECLARED[name]())
    declared = adapter.channel_slices()
    assert set(declared) == {s.key for s in adapter.topology().sites}
    claimed = {sl.key for slices in declared.values() for sl in slices}
    untouched = adapter.untouched_keys()
    assert not claimed & untouched
    assert claimed | untouched == set(adapter.model.state_dict())
    state = adapter.model.state_dict()
    for site in adapter.topology().sites:  # each slice's index map stays inside its tensor
        for sl in declared[site.key]:
            span = state[sl.key].shape[sl.dim]
            assert sl.index(torch.arange(site.size)).max() < span and sl.copies * site.size <= span


@pytest.mark.parametrize("name", ["vit", "deit-distilled"])
def test_derived_slicing_equals_slicing_by_hand(name):
    """Removing channel c of a site through the declaration gives the tensors of naive_vit's slice-by-hand."""
    model = DECLARED[name]()
    adapter = get_adapter(model)
    full = {s.key: list(range(s.size)) for s in adapter.topology().sites}
    for site in adapter.topology().sites:
        for c in (0, site.size - 1):
            keep = {**full, site.key: [i for i in range(site.size) if i != c]}
            got = apply_rules(model, adapter.declared_slice_rules(keep))
            want, _ = sliced_params(model, site.key, c, dtype=torch.float32)
            assert set(got) == set(want)
            for key in want:
                assert torch.equal(got[key], want[key]), (site.key, c, key)


def test_producers_and_consumers_of_a_site():
    """What a compensation step (issue 26) asks: for site s, the slices that write and that read channel c."""
    adapter = get_adapter(tiny_vit())
    assert [(sl.key, sl.dim, sl.copies) for sl in adapter.producers("ffn.1")] == [
        ("blocks.1.mlp.fc1.weight", 0, 1), ("blocks.1.mlp.fc1.bias", 0, 1)]
    assert [(sl.key, sl.dim) for sl in adapter.consumers("ffn.1")] == [("blocks.1.mlp.fc2.weight", 1)]
    assert [(sl.key, sl.copies) for sl in adapter.producers("attn.0")] == [("blocks.0.attn.qkv.weight", 3),
                                                                           ("blocks.0.attn.qkv.bias", 3)]
    consumers = {sl.key for sl in adapter.consumers("res.0")}
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "head.weight"} <= consumers


def test_magnitude_reads_the_declaration():
    """Magnitude scores = the L2 norm over the declared slices, computed here by hand from the state dict."""
    model = tiny_vit()
    adapter = get_adapter(model)
    scores = upvit.score(model, tiny_images(1), method="magnitude")
    state = {k: v.double() for k, v in model.state_dict().items()}
    a = model.blocks[0].attn.attn_dim
    by_hand = (state["blocks.0.attn.qkv.weight"].view(3, a, -1).pow(2).sum((0, 2))
               + state["blocks.0.attn.qkv.bias"].view(3, a).pow(2).sum(0)
               + state["blocks.0.attn.proj.weight"].pow(2).sum(0)).sqrt()
    torch.testing.assert_close(scores["attn.0"], by_hand)
    weights = declared_weights(model.state_dict(keep_vars=True), adapter.channel_slices()["attn.0"])
    assert all(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for (t, _), p in
               zip(weights, [model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias,
                             model.blocks[0].attn.proj.weight]))  # views: Taylor matches gradients to them


def test_surgery_from_the_declaration_keeps_masked_equal_pruned():
    """Surgery slices by the declaration (and folds the attention scale: head dim 6 -> 3)."""
    from plan_helpers import plan_masks

    model, images = tiny_vit(distilled=True), tiny_images(3)
    plan = upvit.make_plan(model, random_scores(model), embed_dim=12, num_heads=4, mlp_hidden=12)
    pruned = upvit.prune(model, plan)
    with torch.no_grad():
        out, ref = pruned(images), get_adapter(model).forward(images, plan_masks(model, plan))
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
