"""upvit.prune: a genuine smaller timm model equal to the masked original; DeiT-B -> DeiT-S/T."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import upvit
from helpers import TINY, tiny_images, tiny_vit
from plan_helpers import plan_masks, random_scores, vit_param_count
from upvit.adapters import get_adapter
from upvit.errors import UpvitError
from upvit.models import ModelConfig, create_timm_model
from upvit.plan import Plan, make_plan


def set_fused(model, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


# embed_dim, num_heads: (16, 4) and (12, 4) change the head dim (6 -> 4, 6 -> 3): the original attention
# scale must be kept (folded into q). That the pruned model equals the masked original (ViT and DeiT, FFN,
# residual and attention, keep-everything) is tested for every family in tests/contract; here the attention
# timm builds.
@pytest.mark.parametrize("embed_dim, num_heads", [(16, 4), (12, 4), (24, 4)])
def test_embed_and_attn_pruning_build_timms_attention(embed_dim, num_heads):
    model = tiny_vit(distilled=True)
    plan = make_plan(model, random_scores(model, seed=2), embed_dim=embed_dim, num_heads=num_heads, mlp_hidden=30)
    pruned = upvit.prune(model, plan)
    attn = pruned.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (num_heads, embed_dim // num_heads, embed_dim)
    assert attn.scale == (embed_dim // num_heads) ** -0.5 and pruned.embed_dim == embed_dim
    assert pruned.blocks[1].mlp.fc1.out_features == 30


def reference_merged_attention(attn, h, keep, heads, scale):
    """Hand-written multi-head attention on the original weights: q/k/v rows ``keep`` grouped into
    ``heads`` heads, softmax(q k^T * scale) v, then proj restricted to the kept columns."""
    a = attn.attn_dim
    W, bias = attn.qkv.weight, attn.qkv.bias
    idx = torch.tensor(keep)
    q, k, v = (h @ W[idx + i * a].T + bias[idx + i * a] for i in range(3))
    B, N, _ = h.shape
    split = lambda t: t.view(B, N, heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    out = (w @ v).transpose(1, 2).reshape(B, N, -1)
    return out @ attn.proj.weight[:, idx].T + attn.proj.bias


@pytest.mark.parametrize("num_heads", [2, 1])
def test_merged_heads_match_hand_written_attention(num_heads):
    model = tiny_vit()
    plan = make_plan(model, random_scores(model, seed=4), num_heads=num_heads)  # embed 24: all dims kept
    pruned = upvit.prune(model, plan)
    h = torch.randn(3, 17, 24, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        assert pruned.blocks[b].attn.head_dim == 24 // num_heads
        for fused in (True, False):
            set_fused(pruned, fused)
            with torch.no_grad():
                got = pruned.blocks[b].attn(h)
                ref = reference_merged_attention(model.blocks[b].attn, h, plan.keep_attn[b], num_heads, 6 ** -0.5)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("embed_dim, num_heads", [(12, 4), (12, 2), (8, 1)])
def test_fused_equals_unfused_after_surgery(embed_dim, num_heads):
    model, x = tiny_vit(), tiny_images()
    pruned = upvit.prune(model, make_plan(model, random_scores(model), embed_dim=embed_dim, num_heads=num_heads))
    with torch.no_grad():
        set_fused(pruned, True)
        fused = pruned(x)
        set_fused(pruned, False)
        unfused = pruned(x)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)


def test_original_model_is_untouched():
    model, x = tiny_vit(distilled=True), tiny_images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = model(x)
    pruned = upvit.prune(model, make_plan(model, random_scores(model), embed_dim=8, num_heads=2, mlp_hidden=5))
    with torch.no_grad():
        pruned(x)
        assert torch.equal(model(x), y0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.blocks[0].attn.num_heads == 4 and model.upvit_config.timm_kwargs["embed_dim"] == 24
    assert "plan" not in model.upvit_config.extra
    assert all(not m._forward_hooks for m in model.modules())


def test_config_and_save_load_round_trip(tmp_path):
    model, x = tiny_vit(distilled=True), tiny_images()
    plan = make_plan(model, random_scores(model), embed_dim=12, num_heads=2, mlp_hidden=20)
    pruned = upvit.prune(model, plan)
    cfg = pruned.upvit_config
    assert cfg.timm_name == model.upvit_config.timm_name
    assert (cfg.timm_kwargs["embed_dim"], cfg.timm_kwargs["num_heads"]) == (12, 2)
    assert int(12 * cfg.timm_kwargs["mlp_ratio"]) == 20
    assert cfg.timm_equivalent is None  # 16px, patch 4: no registered timm architecture has this shape
    assert Plan.from_dict(cfg.extra["plan"]) == plan
    upvit.save(pruned, str(tmp_path / "m"))
    loaded = upvit.load(str(tmp_path / "m"))
    assert loaded.upvit_config == cfg
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    for (k, a), (k2, b) in zip(pruned.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_awkward_mlp_ratio_is_exact(tmp_path):
    # 7 hidden units at width 3: 7/3 is not exact in floating point; timm computes int(dim * mlp_ratio)
    model = tiny_vit(embed_dim=6, num_heads=3, mlp_ratio=4.0)
    pruned = upvit.prune(model, make_plan(model, random_scores(model), embed_dim=3, num_heads=3, mlp_hidden=7))
    assert pruned.blocks[0].mlp.fc1.out_features == 7
    upvit.save(pruned, str(tmp_path / "m"))
    assert upvit.load(str(tmp_path / "m")).blocks[1].mlp.fc1.out_features == 7


def test_plan_for_another_model_is_refused():
    model = tiny_vit()
    plan = make_plan(model, random_scores(model), ratio=0.5)
    other = tiny_vit(mlp_ratio=3.0)
    with pytest.raises(UpvitError, match=r"plan was made for a model with ffn=\[48, 48\], this model has \[72, 72\]"):
        upvit.prune(other, plan)
    hand = Plan.from_v1(dict(keep_embed=list(range(12)), keep_attn=[list(range(12))] * 2, keep_ffn=[[0, 99]] * 2,
                             num_heads=2))
    with pytest.raises(UpvitError, match=r"keep\[ffn.0\] has index 99 out of range: indices must be in 0..47"):
        upvit.prune(model, hand)
    uneven = Plan.from_v1(dict(keep_embed=list(range(12)), keep_attn=[list(range(12)), list(range(8))],
                               keep_ffn=[[0]] * 2, num_heads=2))
    with pytest.raises(UpvitError, match="same attention width in every block"):
        upvit.prune(model, uneven)
    with pytest.raises(UpvitError, match="prune needs a upvit.Plan"):
        upvit.prune(model, {"keep_embed": [0]})


def test_hand_written_plan_with_permuted_heads_runs():
    model, x = tiny_vit(), tiny_images()
    # heads listed in another order: a permutation of heads gives the same function
    keep_attn = [list(range(18, 24)) + list(range(0, 18))] * 2
    plan = Plan.from_v1(dict(keep_embed=list(range(24)), keep_attn=keep_attn, keep_ffn=[list(range(48))] * 2,
                             num_heads=4))
    with torch.no_grad():
        torch.testing.assert_close(upvit.prune(model, plan)(x), model(x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ DeiT-B -> DeiT-S / DeiT-T
@pytest.fixture(scope="module")
def deit_base():
    """DeiT-B and distilled DeiT-B with random N(0, 0.02) weights, built once for the module."""
    models = {}
    for name in ("deit_base_patch16_224", "deit_base_distilled_patch16_224"):
        torch.manual_seed(0)
        m = create_timm_model(name, {"weight_init": "skip"})  # random weights set below, cheaper than timm's init
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
        m.upvit_config = ModelConfig(timm_name=name)
        models[name] = m.eval()
    return models


@pytest.mark.parametrize("source, dims, params, target", [
    ("deit_base_patch16_224", (384, 6, 1536), 22_050_664, "deit_small_patch16_224"),
    ("deit_base_patch16_224", (192, 3, 768), 5_717_416, "deit_tiny_patch16_224"),
    ("deit_base_distilled_patch16_224", (384, 6, 1536), 22_436_432, "deit_small_distilled_patch16_224"),
    ("deit_base_distilled_patch16_224", (192, 3, 768), 5_910_800, "deit_tiny_distilled_patch16_224"),
])
def test_deit_base_prunes_to_standard_deit(deit_base, source, dims, params, target):
    model = deit_base[source]
    D, h, H = dims
    pruned = upvit.prune(model, make_plan(model, random_scores(model, seed=5), embed_dim=D, num_heads=h, mlp_hidden=H))
    n = sum(p.numel() for p in pruned.parameters())
    assert n == params == vit_param_count(D, H, 12, 224, 16, 3, 1000, distilled="distilled" in source)
    assert pruned.upvit_config.timm_equivalent == target
    assert "timm_equivalent_kwargs" not in pruned.upvit_config.extra
    reference = create_timm_model(target, {"weight_init": "skip"}).eval()
    reference.load_state_dict(pruned.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reference(x), pruned(x))


# ------------------------------------------------------------------------------ property tests
@st.composite
def shapes_and_targets(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    head_dim = draw(st.integers(1, 3))
    D = heads * head_dim
    mlp_ratio = draw(st.sampled_from([1.0, 2.0]))
    H = int(D * mlp_ratio)
    depth = draw(st.integers(1, 2))
    distilled = draw(st.booleans())
    h_t = draw(st.integers(0, heads + 1))
    embed_t = draw(st.integers(0, D + 1))
    attn_t = draw(st.one_of(st.none(), st.integers(1, D)))
    mlp_t = draw(st.integers(0, H + 1))
    return dict(heads=heads, D=D, H=H, mlp_ratio=mlp_ratio, depth=depth, distilled=distilled,
                h_t=h_t, embed_t=embed_t, attn_t=attn_t, mlp_t=mlp_t, seed=draw(st.integers(0, 3)))


def is_valid(c) -> bool:
    """Validity of targets for a timm ViT, written from the rules (not from upvit's code)."""
    attn = c["embed_t"] if c["attn_t"] is None else c["attn_t"]
    return (1 <= c["h_t"] <= c["heads"] and c["heads"] % c["h_t"] == 0 and 1 <= c["embed_t"] <= c["D"]
            and attn == c["embed_t"] and attn % c["h_t"] == 0 and 1 <= c["mlp_t"] <= c["H"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes_and_targets())
def test_property_valid_targets_prune_and_invalid_ones_are_refused(c):
    model = tiny_vit(distilled=c["distilled"], seed=c["seed"], embed_dim=c["D"], num_heads=c["heads"],
                     depth=c["depth"], mlp_ratio=c["mlp_ratio"])
    scores = random_scores(model, seed=c["seed"])
    targets = dict(embed_dim=c["embed_t"], num_heads=c["h_t"], mlp_hidden=c["mlp_t"], attn_dim=c["attn_t"])
    if not is_valid(c):
        with pytest.raises(UpvitError) as info:
            upvit.prune(model, make_plan(model, scores, **targets))
        assert "\n" not in str(info.value) and ":" in str(info.value)
        return
    plan = make_plan(model, scores, **targets)
    pruned = upvit.prune(model, plan)
    x = tiny_images(n=2)
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (2, TINY["num_classes"]) and torch.isfinite(out).all()
    expected = vit_param_count(c["embed_t"], c["mlp_t"], c["depth"], TINY["img_size"], TINY["patch_size"],
                               TINY["in_chans"], TINY["num_classes"], c["distilled"])
    assert sum(p.numel() for p in pruned.parameters()) == expected
    if c["h_t"] == c["heads"]:  # no head merging: the pruned model equals the masked original
        with torch.no_grad():
            ref = get_adapter(model).forward(x, plan_masks(model, plan))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
