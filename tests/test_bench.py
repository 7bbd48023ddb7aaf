import pytest

from helpers import tiny_vit
from upvit.bench import count_macs, count_params, format_table, throughput
from upvit.models import create_timm_model


def hand_macs(img, patch, chans, dim, depth, mlp, classes, tokens_extra=1):
    """Multiply-accumulates of a ViT written out term by term."""
    patches = (img // patch) ** 2
    n = patches + tokens_extra
    embed = patches * (patch * patch * chans) * dim
    block = (n * dim * 3 * dim  # qkv
             + n * n * dim       # q k^T over all heads
             + n * n * dim       # attn v
             + n * dim * dim     # proj
             + 2 * n * dim * mlp)  # fc1 + fc2
    return embed + depth * block + dim * classes


def test_macs_of_tiny_vit_match_hand_count():
    model = tiny_vit()  # img 16, patch 4, 3 chans, dim 24, depth 2, mlp 48, 5 classes
    assert count_macs(model) == hand_macs(16, 4, 3, 24, 2, 48, 5) == 202968


def test_macs_of_distilled_vit_count_both_heads_and_tokens():
    model = tiny_vit(distilled=True)
    assert count_macs(model) == hand_macs(16, 4, 3, 24, 2, 48, 5, tokens_extra=2) + 24 * 5


def test_fused_attention_flag_is_restored_after_counting():
    model = tiny_vit()
    before = [b.attn.fused_attn for b in model.blocks]
    count_macs(model)
    assert [b.attn.fused_attn for b in model.blocks] == before


def test_deit_small_matches_published_size():
    model = create_timm_model("deit_small_patch16_224")
    assert count_params(model) == 22_050_664
    assert count_macs(model) / 1e9 == pytest.approx(4.6, abs=0.02)  # DeiT paper: 4.6 GFLOPs (MACs)


def test_throughput_reports_median():
    r = throughput(tiny_vit(), batch_size=4, runs=3, warmup=1)
    assert r["images_per_second"] > 0 and r["batch_size"] == 4
    assert "| tiny |" in format_table([{"model": "tiny", "params": 1, "macs": 2, **r}])
