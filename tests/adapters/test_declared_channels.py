"""A channel's weights declared once (Adapter.channel_slices), for every family: every state-dict key is claimed
by a site or declared untouched, slicing derived from the declaration equals an independent slice-by-hand
reference (the naive references' sliced weights), magnitude scores equal the L2 norm of what that reference
removes, producers/consumers name the layers that write/read a site's channels, and magnitude, Taylor and
surgery all read the same declaration."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

import upvit
from helpers import tiny_images, tiny_swin, tiny_vit
from hf_helpers import tiny_bert, tiny_gpt2, tiny_hf_vit
from naive_hf import sliced_bert, sliced_gpt2, sliced_vit
from naive_pvt import sliced_pvt_params
from naive_swin import sliced_swin_params
from plan_helpers import random_scores
from pvt_helpers import tiny_pvt
from upvit.adapters import get_adapter
from upvit.adapters.slicing import apply_rules, declared_weights
from upvit.importance.baselines import magnitude_scores

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "importance"))
from naive_vit import sliced_params  # noqa: E402


def _bert_by_hand(model, key, channel, dtype):
    """naive_hf's BERT slicing (which leaves out the pooler, unused by its forward) plus the pooler by hand:
    residual to residual, so residual channel c is its row c, column c and bias c."""
    p, heads = sliced_bert(model, key, channel, dtype)
    if key == "res.0" and "pooler.dense.weight" in p:
        D = model.config.hidden_size
        keep = torch.tensor([i for i in range(D) if i != channel])
        p["pooler.dense.weight"] = p["pooler.dense.weight"][keep][:, keep]
        p["pooler.dense.bias"] = p["pooler.dense.bias"][keep]
    return p, heads


# name -> (tiny model, slice-by-hand reference(model, site key, channel, dtype) -> (state dict, heads) or None)
DECLARED = {
    "vit": (lambda: tiny_vit(), sliced_params),
    "deit-distilled": (lambda: tiny_vit(distilled=True), sliced_params),
    "vit-layerscale-regs": (lambda: tiny_vit(init_values=0.5, reg_tokens=2, class_token=True), None),
    "swin": (lambda: tiny_swin(), sliced_swin_params),
    "pvt": (lambda: tiny_pvt(), sliced_pvt_params),
    "pvt-linear": (lambda: tiny_pvt(linear=True), sliced_pvt_params),
    "hf-vit": (lambda: tiny_hf_vit(), sliced_vit),
    "hf-deit": (lambda: tiny_hf_vit("DeiTForImageClassification"), sliced_vit),
    "hf-deit-teacher": (lambda: tiny_hf_vit("DeiTForImageClassificationWithTeacher"), sliced_vit),
    "bert": (lambda: tiny_bert(), _bert_by_hand),
    "bert-mlm": (lambda: tiny_bert(mlm=True), _bert_by_hand),
    "gpt2": (lambda: tiny_gpt2(), sliced_gpt2),
}
BY_HAND = sorted(name for name, (_, ref) in DECLARED.items() if ref is not None)


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_every_state_dict_key_is_claimed_or_declared_untouched(name):
    adapter = get_adapter(DECLARED[name][0]())
    declared = adapter.channel_slices()
    assert set(declared) == {s.key for s in adapter.topology().sites}
    claimed = {sl.key for slices in declared.values() for sl in slices}
    untouched = adapter.untouched_keys()
    assert not claimed & untouched
    assert claimed | untouched == set(adapter.model.state_dict())
    state = adapter.model.state_dict()
    for site in adapter.topology().sites:  # each slice's index map stays inside its tensor
        assert declared[site.key], site.key
        for sl in declared[site.key]:
            span = state[sl.key].shape[sl.dim]
            assert sl.index(torch.arange(site.size)).max() < span and sl.copies * site.size <= span


@pytest.mark.parametrize("name", BY_HAND)
def test_derived_slicing_equals_slicing_by_hand(name):
    """Removing channel c of a site through the declaration gives the tensors of the naive slice-by-hand."""
    build, by_hand = DECLARED[name]
    model = build()
    adapter = get_adapter(model)
    full = {s.key: list(range(s.size)) for s in adapter.topology().sites}
    for site in adapter.topology().sites:
        for c in (0, site.size - 1):
            keep = {**full, site.key: [i for i in range(site.size) if i != c]}
            got = apply_rules(model, adapter.declared_slice_rules(keep))
            want, _ = by_hand(model, site.key, c, dtype=torch.float32)
            assert set(got) == set(want)
            for key in want:
                assert torch.equal(got[key], want[key]), (site.key, c, key)


BASE = 1000  # larger than every axis of the tiny models: a probe value encodes its multi-index exactly


def _removed_by_hand(model, by_hand, key, channel) -> dict[tuple[str, int], list[int]]:
    """(state key, dim) -> the indices along dim that the slice-by-hand reference removes for channel c of
    site ``key``, read off by slicing a probe copy of the model whose every tensor holds its own
    multi-index (i0 + BASE * i1 + BASE^2 * i2 ...)."""
    probe = copy.deepcopy(model).double()
    state = probe.state_dict()
    codes = {}
    for k, t in state.items():
        code = torch.zeros(t.shape, dtype=torch.float64)
        for d, n in enumerate(t.shape):
            shape = [n if e == d else 1 for e in range(t.dim())]
            code += (torch.arange(n, dtype=torch.float64) * BASE ** d).view(shape)
        codes[k] = code
    probe.load_state_dict(codes)
    sliced, _ = by_hand(probe, key, channel, dtype=torch.float64)
    removed = {}
    for k, t in state.items():
        for d, n in enumerate(t.shape):
            kept = set(((sliced[k].long() // BASE ** d) % BASE).flatten().tolist()) if sliced[k].numel() else set()
            gone = [i for i in range(n) if i not in kept]
            if gone:
                removed[k, d] = gone
    return removed


@pytest.mark.parametrize("name", BY_HAND)
def test_magnitude_is_the_norm_of_what_slicing_by_hand_removes(name):
    """Magnitude of channel c = sqrt of the summed squares of every weight the slice-by-hand reference removes
    with it, per axis (a square layer's row and column both count, as they always have), a tied tensor (LM
    head = word embedding) once."""
    build, by_hand = DECLARED[name]
    model = build()
    adapter = get_adapter(model)
    scores = magnitude_scores(adapter)
    state = model.state_dict(keep_vars=True)
    seen, aliases = set(), set()
    for k, t in state.items():  # keys whose tensor is an earlier key's (tied weights)
        if id(t) in seen:
            aliases.add(k)
        seen.add(id(t))
    for site in adapter.topology().sites:
        for c in (0, site.size - 1):
            total = torch.zeros((), dtype=torch.float64)
            for (k, d), gone in _removed_by_hand(model, by_hand, site.key, c).items():
                if k not in aliases:
                    total += state[k].detach().double().index_select(d, torch.tensor(gone)).pow(2).sum()
            torch.testing.assert_close(scores[site.key][c], total.sqrt(), msg=f"{name} {site.key} {c}")


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_roles_follow_the_layer_a_slice_belongs_to(name):
    """"out": a Linear/conv/Conv1D's output axis (or its bias); "in": its input axis; "param": everything else
    (LayerNorms, tables, tokens, depthwise convs), so producers()/consumers() name exactly the layers that
    write/read a site's channels."""
    from transformers.pytorch_utils import Conv1D

    model = DECLARED[name][0]()
    adapter = get_adapter(model)
    for site, slices in adapter.channel_slices().items():
        for sl in slices:
            prefix, _, leaf = sl.key.rpartition(".")
            module = model.get_submodule(prefix) if prefix else model
            dim = sl.dim % model.state_dict()[sl.key].dim()
            depthwise = isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.out_channels
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not depthwise:
                want = "out" if leaf == "bias" or dim == 0 else "in"
            elif isinstance(module, Conv1D):
                want = "out" if leaf == "bias" or dim == 1 else "in"
            else:
                want = "param"
            assert sl.role == want, (site, sl)


# name -> (attn.0 producers, attn.0 consumers, ffn.0 producers, ffn.0 consumers, some res.0 consumers) as layer
# names (the weight and bias keys of a layer share its name)
LAYERS = {
    "vit": (["blocks.0.attn.qkv"], ["blocks.0.attn.proj"], ["blocks.0.mlp.fc1"], ["blocks.0.mlp.fc2"],
            ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "head"]),
    "swin": (["layers.0.blocks.0.attn.qkv"], ["layers.0.blocks.0.attn.proj"], ["layers.0.blocks.0.mlp.fc1"],
             ["layers.0.blocks.0.mlp.fc2"], ["layers.0.blocks.0.attn.qkv", "layers.0.blocks.1.mlp.fc1",
                                             "layers.1.downsample.reduction"]),
    "pvt": (["stages.0.blocks.0.attn.q", "stages.0.blocks.0.attn.kv"], ["stages.0.blocks.0.attn.proj"],
            ["stages.0.blocks.0.mlp.fc1"], ["stages.0.blocks.0.mlp.fc2"],
            ["stages.0.blocks.0.attn.q", "stages.0.blocks.0.attn.kv", "stages.0.blocks.0.attn.sr",
             "stages.0.blocks.0.mlp.fc1", "stages.1.downsample.proj"]),
    "hf-deit-teacher": ([f"deit.layers.0.attention.{n}" for n in ("q_proj", "k_proj", "v_proj")],
                        ["deit.layers.0.attention.o_proj"], ["deit.layers.0.mlp.fc1"], ["deit.layers.0.mlp.fc2"],
                        ["deit.layers.0.attention.q_proj", "deit.layers.0.mlp.fc1", "cls_classifier",
                         "distillation_classifier"]),
    "bert-mlm": ([f"bert.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")],
                 ["bert.encoder.layer.0.attention.output.dense"], ["bert.encoder.layer.0.intermediate.dense"],
                 ["bert.encoder.layer.0.output.dense"],
                 ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.intermediate.dense",
                  "cls.predictions.transform.dense", "cls.predictions.decoder"]),
    "gpt2": (["transformer.h.0.attn.c_attn"], ["transformer.h.0.attn.c_proj"], ["transformer.h.0.mlp.c_fc"],
             ["transformer.h.0.mlp.c_proj"], ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "lm_head"]),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_producers_and_consumers_name_the_layers_to_refit(name):
    """What a compensation step (issue 26) asks: for site s, the layers that write and that read channel c."""
    adapter = get_adapter(DECLARED[name][0]())
    attn_out, attn_in, ffn_out, ffn_in, res_in = LAYERS[name]

    def layers(slices):
        return sorted({sl.key.rpartition(".")[0] for sl in slices})

    assert layers(adapter.producers("attn.0")) == sorted(attn_out)
    assert layers(adapter.consumers("attn.0")) == sorted(attn_in)
    assert layers(adapter.producers("ffn.0")) == sorted(ffn_out)
    assert layers(adapter.consumers("ffn.0")) == sorted(ffn_in)
    assert set(res_in) <= set(layers(adapter.consumers("res.0")))
    assert not set(layers(adapter.producers("res.0"))) & set(attn_out + ffn_out)


def test_producers_and_consumers_of_a_vit_site():
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


def test_a_tied_tensor_counts_once():
    """GPT-2's LM head is its word embedding: declared under both keys (surgery slices both), weighed once."""
    model = tiny_gpt2()
    adapter = get_adapter(model)
    keys = [sl.key for sl in adapter.channel_slices()["res.0"]]
    assert "lm_head.weight" in keys and "transformer.wte.weight" in keys
    weights = adapter.channel_weights("res.0")
    wte = model.transformer.wte.weight
    assert sum(t.untyped_storage().data_ptr() == wte.untyped_storage().data_ptr() for t, _ in weights) == 1
    assert len(weights) == len(keys) - 1


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
