"""timm Swin beyond the contract suite (tests/contract): bias-column merging, fused == unfused, Swin-T to a stated
shape, the rank-1 fast path, hybrid scores, magnitude, CLI."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import upvit
from helpers import SWIN_NAME, TINY_SWIN, run_cli, run_main, tiny_swin
from plan_helpers import random_scores
from upvit.adapters import get_adapter
from upvit.adapters.timm_swin import TimmSwinAdapter
from upvit.errors import UpvitError
from upvit.importance.kl import kl_scores
from upvit.models import ModelConfig, create_timm_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)


def images(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, TINY_SWIN["img_size"], TINY_SWIN["img_size"], generator=g)


def set_fused(model, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def test_topology_rules_and_shifted_windows():
    # the shape, the staged forward, exact KL, masked == pruned, keep-everything and the bad targets are in
    # tests/contract (family "timm-swin")
    model = tiny_swin()
    topo = get_adapter(model).topology()
    assert topo.rules.residual_ratios == (1.0, 2.0, 4.0) and topo.rules.head_bias and topo.head_tokens is None
    assert [topo.start_unit(k) for k in ("res.0", "res.1", "res.2", "attn.2", "ffn.5")] == [-1, 4, 8, 4, 11]
    # shifted windows really run in stages 0 and 1 (the contract suite's naive reference must handle them)
    assert [blk.shift_size for layer in model.layers for blk in layer.blocks][:4] == [(0, 0), (2, 2), (0, 0), (2, 2)]


class PlainSwin(TimmSwinAdapter):
    def ffn_rank1(self, unit, stream):
        return None


def test_rank1_fast_path_equals_the_masked_forward():
    model, x = tiny_swin(seed=2), images(2)
    fast = kl_scores(get_adapter(model), x, candidates={"ffn.1": range(16), "ffn.5": range(0, 64, 7)}, progress=False)
    plain = kl_scores(PlainSwin(model), x, candidates={"ffn.1": range(16), "ffn.5": range(0, 64, 7)}, progress=False)
    for key in ("ffn.1", "ffn.5"):
        ok = ~torch.isnan(plain[key])
        torch.testing.assert_close(fast[key][ok], plain[key][ok], rtol=1e-4, atol=1e-9)


def test_merged_heads_average_or_select_bias_columns():
    model = tiny_swin(seed=5)
    scores = random_scores(model, seed=6)
    mean_plan = upvit.make_plan(model, scores, ratio=0.5)
    best_plan = upvit.make_plan(model, scores, ratio=0.5, head_bias="best")
    assert mean_plan.heads["attn.2"] == [[0, 1], [2, 3]] and mean_plan.bias_heads is None
    mean, best = upvit.prune(model, mean_plan), upvit.prune(model, best_plan)
    for b, (s, i) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]):
        src = model.layers[s].blocks[i].attn.relative_position_bias_table
        hd = model.layers[s].blocks[i].attn.qkv.out_features // 3 // model.layers[s].blocks[i].attn.num_heads
        got_mean = mean.layers[s].blocks[i].attn.relative_position_bias_table
        got_best = best.layers[s].blocks[i].attn.relative_position_bias_table
        kept = best_plan.keep[f"attn.{b}"]
        for j, group in enumerate(mean_plan.heads[f"attn.{b}"]):
            torch.testing.assert_close(got_mean[:, j], src[:, group].mean(1))
            # the best head: the one whose kept dims carry the largest summed score (ties: lower head)
            sums = [sum(float(scores[f"attn.{b}"][d]) for d in kept if d // hd == h) for h in group]
            winner = group[max(range(len(group)), key=lambda n: (sums[n], -n))]
            assert best_plan.bias_heads[f"attn.{b}"][j] == [winner]
            torch.testing.assert_close(got_best[:, j], src[:, winner])


def test_merged_heads_fused_equals_unfused():
    model, x = tiny_swin(seed=7), images()
    pruned = upvit.prune(model, upvit.make_plan(model, random_scores(model), ratio=0.5))
    with torch.no_grad():
        set_fused(pruned, True)
        fused = pruned(x)
        set_fused(pruned, False)
        unfused = pruned(x)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)


def test_swin_t_prunes_to_a_stated_shape_that_timm_builds_from_kwargs(tmp_path):
    torch.manual_seed(0)
    model = create_timm_model(SWIN_NAME, {"weight_init": "skip"}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.upvit_config = ModelConfig(timm_name=SWIN_NAME)
    # Swin-T (96, heads 3/6/12/24 of 32 dims, FFN ratio 4) -> width 48: heads 3/6/12/24 of 16 dims, FFN
    # ratio 4; and, merging heads, width 64: heads 1/2/4/8 of 64 dims
    plan = upvit.make_plan(model, random_scores(model), embed_dim=[48, 96, 192, 384], mlp_hidden=[192, 384, 768, 1536])
    pruned = upvit.prune(model, plan)
    upvit.save(pruned, str(tmp_path / "m"))
    kwargs = json.loads((tmp_path / "m" / "config.json").read_text())["timm_kwargs"]
    assert kwargs["embed_dim"] == 48 and kwargs["num_heads"] == [3, 6, 12, 24] and kwargs["head_dim"] == [16] * 4
    reference = create_timm_model(SWIN_NAME, kwargs).eval()
    reference.load_state_dict(pruned.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reference(x), pruned(x))
    assert sum(p.numel() for p in pruned.parameters()) < 0.3 * sum(p.numel() for p in model.parameters())
    merged = upvit.prune(model, upvit.make_plan(model, random_scores(model), embed_dim=[64, 128, 256, 512],
                                                num_heads=[1, 2, 4, 8], mlp_hidden=[256, 512, 1024, 2048]))
    kwargs = merged.upvit_config.timm_kwargs
    assert (kwargs["embed_dim"], kwargs["num_heads"], kwargs["head_dim"]) == (64, [1, 2, 4, 8], [64] * 4)
    reference = create_timm_model(SWIN_NAME, kwargs).eval()
    reference.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(reference(x), merged(x))


def test_hybrid_refuses_bad_targets_before_scoring(monkeypatch):
    import upvit.importance.hybrid as hybrid

    monkeypatch.setattr(hybrid, "fisher_scores", lambda *a, **k: pytest.fail("scored before checking the targets"))
    with pytest.raises(UpvitError, match="ratio 1:2:4"):
        upvit.score(tiny_swin(), images(2), method="hybrid", targets=[dict(embed_dim=[4, 12, 16])])


def test_hybrid_keep_sets_equal_exact_on_swin():
    model, x = tiny_swin(seed=8), images(3)
    exact = kl_scores(get_adapter(model), x, progress=False)
    hybrid = upvit.score(model, x, method="hybrid", ratios=[0.5])
    assert upvit.make_plan(model, hybrid, ratio=0.5).keep == upvit.make_plan(model, exact, ratio=0.5).keep
    assert hybrid.meta["exact_fraction"] < 1


def test_magnitude_covers_every_residual_parameter():
    model = tiny_swin()
    adapter = get_adapter(model)
    listed = {t.data_ptr() for s in range(3) for t, _ in adapter.channel_weights(f"res.{s}")}
    residual = [n for n, p in model.named_parameters()
                if "relative_position" not in n and ("norm" in n or "reduction" in n or "proj" in n or "fc" in n
                                                     or "qkv.weight" in n)]
    missing = [n for n, p in model.named_parameters() if n in residual and p.data_ptr() not in listed
               and not n.endswith(("qkv.bias", "fc1.bias", "head.fc.bias", "attn.proj.weight"))]
    assert missing == []
    scores = upvit.score(model, images(1), method="magnitude")
    assert all(torch.isfinite(t).all() and (t > 0).all() for _, t in scores.items())


def test_cli_score_prune_finetune_bench_on_a_swin_directory(tmp_path):
    model = tiny_swin(img_size=28, window_size=7, in_chans=1, num_classes=10, depths=[2, 2], num_heads=[2, 4])
    model.upvit_config.data_config.update({"mean": [0.2725], "std": [0.4056]})
    upvit.save(model, str(tmp_path / "swin"))
    scores, pruned, tuned = (str(tmp_path / n) for n in ("s.safetensors", "pruned", "tuned"))
    r = run_main("score", str(tmp_path / "swin"), "--data", "animal-mnist:train", "--proxy-size", "4", "--out", scores)
    assert r.returncode == 0, r.stderr
    r = run_main("prune", str(tmp_path / "swin"), "--scores", scores, "--ratio", "0.5", "--out", pruned)
    assert r.returncode == 0, r.stderr
    assert "stage widths [4, 8]" in r.stdout
    small = upvit.load(pruned)
    assert small.layers[1].blocks[0].attn.num_heads == 2 and small.embed_dim == 4
    r = run_main("finetune", pruned, "--teacher", str(tmp_path / "swin"), "--data", "animal-mnist:train",
                 "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "8", "--out", tuned)
    assert r.returncode == 0, r.stderr
    r = run_cli("bench", str(tmp_path / "swin"), tuned, "--batch-size", "2", "--runs", "1",
                "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "b.json").read_text())
    assert rows[1]["params"] == sum(p.numel() for p in small.parameters()) and rows[1]["macs"] < rows[0]["macs"]
    assert math.isfinite(rows[1]["images_per_second"])
    assert dataclasses.is_dataclass(upvit.load(tuned).upvit_config)
