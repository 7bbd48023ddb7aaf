"""timm PVTv2 beyond the contract suite (tests/contract: exact KL against a naive reference through the conv patch
embeddings, sr convs and depthwise FFN convs, masked == pruned, keep-everything, rules): stage transitions, the
rank-1 fast path, merged heads, B1 -> B0 as a pure width prune, the attention-width tie in a plan, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

import upvit
from helpers import run_main
from plan_helpers import plan_masks, random_scores
from pvt_helpers import PVT_IMG, tiny_pvt
from upvit.adapters import get_adapter
from upvit.adapters.timm_pvt import TimmPVTv2Adapter
from upvit.errors import UpvitError
from upvit.importance.kl import kl_scores
from upvit.models import ModelConfig, create_timm_model
from upvit.plan import Plan
from upvit.targets import Targets

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)


def images(n=3, seed=1, size=PVT_IMG):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def set_fused(model, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


@pytest.mark.parametrize("linear", [False, True])
def test_topology_rules_and_stage_transitions(linear):
    # the shape, the staged forward against the model's own, exact KL, masked == pruned, keep-everything and
    # the bad targets are in tests/contract (families "timm-pvt", "timm-pvt-linear")
    model, x = tiny_pvt(linear=linear), images()
    adapter = get_adapter(model)
    topo = adapter.topology()
    assert topo.rules.attn_tied_to_residual and topo.rules.residual_ratios is None and topo.head_tokens is None
    assert [topo.start_unit(k) for k in ("res.0", "res.1", "res.2", "attn.2", "ffn.5")] == [-1, 4, 8, 4, 11]
    # the sr convs really reduce: stage 0 (8x8 map, sr 4) and stage 1 (4x4, sr 2) attend to 2x2 keys
    srs = [blk.attn.sr for stage in model.stages for blk in stage.blocks]
    assert [None if c is None else c.stride[0] for c in srs] == (
        [1, 1, 1, 1, 1, 1] if linear else [4, 4, 2, 2, None, None])
    stream = adapter.begin(x)
    assert stream.x.shape == (3, 64, 8) and stream.info["feat_size"] == (8, 8)
    for unit in topo.units[:5]:
        stream = adapter.run(unit.key, stream)
    assert stream.x.shape == (3, 16, 16) and stream.info["feat_size"] == (4, 4)


def test_attention_dims_are_chosen_by_their_own_scores():
    # timm ties the attention width to the residual width, not the attention dims to the residual channels
    model = tiny_pvt(seed=3)
    plan = upvit.make_plan(model, random_scores(model, seed=4), embed_dim=[4, 8, 12])
    assert len(plan.keep["attn.2"]) == len(plan.keep["res.1"]) == 8 and plan.keep["attn.2"] != plan.keep["res.1"]


class PlainPVT(TimmPVTv2Adapter):
    def ffn_rank1(self, unit, stream):
        return None


def test_rank1_fast_path_equals_the_masked_forward():
    model, x = tiny_pvt(seed=2), images(2)
    cands = {"ffn.1": range(16), "ffn.3": range(0, 32, 3), "ffn.5": range(0, 64, 7)}
    fast = kl_scores(get_adapter(model), x, candidates=cands, progress=False)
    plain = kl_scores(PlainPVT(model), x, candidates=cands, progress=False)
    for key in cands:
        ok = ~torch.isnan(plain[key])
        assert ok.sum() == len(cands[key])
        torch.testing.assert_close(fast[key][ok], plain[key][ok], rtol=1e-4, atol=1e-9)


def test_merged_heads_fused_equals_unfused():
    model, x = tiny_pvt(seed=7), images()
    pruned = upvit.prune(model, upvit.make_plan(model, random_scores(model), ratio=0.5))
    assert [blk.attn.num_heads for stage in pruned.stages for blk in stage.blocks] == [1, 1, 1, 1, 2, 2]
    with torch.no_grad():
        set_fused(pruned, True)
        fused = pruned(x)
        set_fused(pruned, False)
        unfused = pruned(x)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)


def test_b1_pruned_to_b0_shape_is_a_timm_pvt_v2_b0():
    # timm's pvt_v2_b0 is pvt_v2_b1 at half width with the same heads (1, 2, 5, 8) and FFN ratios (8, 8, 4, 4)
    torch.manual_seed(0)
    b1 = create_timm_model("pvt_v2_b1", {"device": "meta"})
    b1 = b1.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in b1.parameters():
            p.normal_(0, 0.02)
    b1.upvit_config = ModelConfig(timm_name="pvt_v2_b1")
    topo = get_adapter(b1).topology()
    targets = Targets.from_ratio(topo, 0.5, keep_heads=True)
    assert targets.per_stage("residual") == [32, 64, 160, 256] and targets.per_stage("heads") == [1, 2, 5, 8]
    assert targets.per_stage("ffn") == [256, 512, 640, 1024]
    plan = upvit.make_plan(b1, random_scores(b1), targets=targets)
    pruned = upvit.prune(b1, plan)
    assert pruned.upvit_config.timm_equivalent == "pvt_v2_b0"
    b0 = create_timm_model("pvt_v2_b0", {"device": "meta"})
    b0.load_state_dict(pruned.state_dict(), strict=True, assign=True)
    b0.eval()
    x = images(2, size=64)
    with torch.no_grad():
        out = pruned(x)
        assert torch.equal(b0(x), out)
        # and it is the masked B1 (every residual and attention width halved, FFN halved)
        ref = get_adapter(b1).forward(x, plan_masks(b1, plan))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    reference = create_timm_model("pvt_v2_b0", {"device": "meta"})
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in reference.parameters())


def test_plan_validation_states_the_attention_width_tie():
    model = tiny_pvt()
    plan = upvit.make_plan(model, random_scores(model), embed_dim=[8, 8, 32])
    keep = dict(plan.keep)
    keep["attn.2"] = keep["attn.2"] + [i for i in range(16) if i not in keep["attn.2"]][:4]  # 12 dims, residual 8
    bad = Plan(keep=keep, heads=plan.heads, source=plan.source)
    with pytest.raises(UpvitError, match=r"count of kept attention dims follows the residual width: plan keeps 12 "
                                         r"dims of attn.2 but 8 channels of res.1") as info:
        upvit.prune(model, bad)
    assert "\n" not in str(info.value)


def test_hybrid_keep_sets_equal_exact_on_pvt():
    model, x = tiny_pvt(seed=8), images(3)
    exact = kl_scores(get_adapter(model), x, progress=False)
    target = Targets.from_ratio(get_adapter(model).topology(), 0.5, keep_heads=True)  # heads kept (B1 -> B0 style)
    hybrid = upvit.score(model, x, method="hybrid", targets=[target])
    want = upvit.make_plan(model, exact, targets=target).keep
    assert upvit.make_plan(model, hybrid, targets=target).keep == want
    assert hybrid.meta["exact_fraction"] < 1


def test_magnitude_covers_every_parameter():
    model = tiny_pvt()
    adapter = get_adapter(model)
    listed = {}
    for site in adapter.topology().sites:
        for t, dim in adapter.channel_weights(site.key):
            listed.setdefault(t.data_ptr(), set()).add(site.kind)
    # every parameter carries some site's channels, except the head bias (no prunable axis)
    missing = [n for n, p in model.named_parameters() if p.data_ptr() not in listed and n != "head.bias"]
    assert missing == []
    # the FFN's depthwise conv carries FFN units, the sr conv residual channels
    assert listed[model.stages[0].blocks[0].mlp.dwconv.weight.data_ptr()] == {"ffn"}
    assert listed[model.stages[0].blocks[0].attn.sr.weight.data_ptr()] == {"residual"}
    scores = upvit.score(model, images(1), method="magnitude")
    assert all(torch.isfinite(t).all() and (t > 0).all() for _, t in scores.items())


def test_cli_score_prune_finetune_bench_on_a_pvt_directory(tmp_path):
    # the embedded data's 28 px: maps 7, 4, 2 with sr (4, 2, 1) (timm's default ratios would not fit)
    model = tiny_pvt(img_size=28, in_chans=1, num_classes=10)
    model.upvit_config.data_config.update({"mean": [0.2725], "std": [0.4056]})
    upvit.save(model, str(tmp_path / "pvt"))
    scores, pruned, tuned = (str(tmp_path / n) for n in ("s.safetensors", "pruned", "tuned"))
    r = run_main("score", str(tmp_path / "pvt"), "--data", "animal-mnist:train", "--proxy-size", "4", "--out", scores)
    assert r.returncode == 0, r.stderr
    r = run_main("prune", str(tmp_path / "pvt"), "--scores", scores, "--ratio", "0.5", "--keep-heads", "--out", pruned)
    assert r.returncode == 0, r.stderr
    assert "stage widths [4, 8, 16]" in r.stdout
    small = upvit.load(pruned)
    assert [s.blocks[0].attn.num_heads for s in small.stages] == [1, 2, 4]
    r = run_main("finetune", pruned, "--teacher", str(tmp_path / "pvt"), "--data", "animal-mnist:train",
                 "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "8", "--out", tuned)
    assert r.returncode == 0, r.stderr
    r = run_main("bench", str(tmp_path / "pvt"), tuned, "--batch-size", "2", "--runs", "1",
                 "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "b.json").read_text())
    assert rows[1]["params"] == sum(p.numel() for p in small.parameters()) and rows[1]["macs"] < rows[0]["macs"]
    assert math.isfinite(rows[1]["images_per_second"])
