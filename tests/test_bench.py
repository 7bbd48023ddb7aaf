import json

import numpy as np
import pytest

from helpers import tiny_vit
from upvit import bench
from upvit.bench import count_macs, count_params, format_table, run_statistics, throughput
from upvit.cli import main
from upvit.io import save
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
    assert r["images_per_second_min"] <= r["images_per_second_q1"] <= r["images_per_second"]
    assert r["images_per_second"] <= r["images_per_second_q3"] <= r["images_per_second_max"] and r["spread"] >= 0
    assert "| tiny |" in format_table([{"model": "tiny", "params": 1, "macs": 2, **r}])


class FakeClock:
    """Stands in for bench.clock: every timed run takes the next of ``durations`` seconds."""

    def __init__(self, durations):
        self.durations, self.now, self.calls = list(durations), 100.0, 0

    def __call__(self):
        self.calls += 1
        if self.calls % 2 == 0:  # the second call of a run: its end
            self.now += self.durations.pop(0)
        return self.now


def test_run_statistics_match_numpy_percentiles():
    seconds = [0.5, 0.25, 0.4, 1.0, 0.2, 0.8, 0.3]
    r = run_statistics(seconds, batch_size=8)
    rates = 8 / np.array(seconds)
    q1, med, q3 = np.percentile(rates, [25, 50, 75])  # numpy's default: linear interpolation between runs
    assert r["images_per_second"] == pytest.approx(med) == 8 / 0.4
    assert (r["images_per_second_q1"], r["images_per_second_q3"]) == (pytest.approx(q1), pytest.approx(q3))
    assert (r["images_per_second_min"], r["images_per_second_max"]) == (8.0, 40.0)
    assert r["spread"] == pytest.approx((q3 - q1) / med)
    assert r["median_batch_seconds"] == 0.4
    one = run_statistics([0.5], batch_size=4)
    assert one["images_per_second"] == one["images_per_second_q1"] == one["images_per_second_max"] == 8.0
    assert one["spread"] == 0.0


def test_time_runs_warms_up_then_takes_turns(monkeypatch):
    calls = []
    clock = FakeClock([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    monkeypatch.setattr(bench, "clock", clock)
    times = bench.time_runs([lambda: calls.append("a"), lambda: calls.append("b")], warmup=2, runs=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up untimed, then one run of each in turn
    assert times == [pytest.approx([0.1, 0.3, 0.5]), pytest.approx([0.2, 0.4, 0.6])]
    assert clock.calls == 12


def test_cli_bench_reports_spread_in_table_and_json_and_warns_once(tmp_path, monkeypatch, capsys):
    steady, noisy = [0.1] * 5, [0.1, 0.3, 0.1, 0.3, 0.2]
    monkeypatch.setattr(bench, "clock", FakeClock([x for pair in zip(steady, noisy) for x in pair]))
    save(tiny_vit(), str(tmp_path / "a"))
    save(tiny_vit(seed=1), str(tmp_path / "b"))
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "a"), str(tmp_path / "b"), "--batch-size", "2", "--runs", "5",
                 "--device", "cpu", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    rows = json.loads(out.read_text())
    for row, seconds in zip(rows, (steady, noisy)):
        expected = run_statistics(seconds, 2)
        assert {k: row[k] for k in expected} == pytest.approx(expected)
    assert rows[0]["spread"] == 0 and rows[1]["spread"] == pytest.approx((20 - 2 / 0.3) / 10)
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("upvit: warning: throughput varied"), captured.err
    assert str(tmp_path / "b") in warnings[0] and f"{tmp_path / 'a'} " not in warnings[0]
    assert ("| 10.0 | 6.7-20.0 | 6.7-20.0 | 133% | 2 |" in captured.out
            and "| 20.0 | 20.0-20.0 | 20.0-20.0 | 0% | 2 |" in captured.out)


def test_cli_bench_is_quiet_when_runs_agree(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "clock", FakeClock([0.1, 0.1, 0.105, 0.1]))
    save(tiny_vit(), str(tmp_path / "a"))
    assert main(["bench", str(tmp_path / "a"), "--batch-size", "2", "--runs", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().err.strip() == ""


def test_the_table_names_the_unit_of_the_models_samples():
    """A text model's sample is a sequence (issue 21 item 10): the header says sequences/s for text rows, images/s
    for image rows and samples/s for a mix; a text row's JSON carries sequences_per_second too."""
    stats = {"images_per_second": 10.0, "images_per_second_q1": 9.0, "images_per_second_q3": 11.0,
             "images_per_second_min": 8.0, "images_per_second_max": 12.0, "spread": 0.2, "batch_size": 4}
    image = {"model": "vit", "params": 1, "macs": 2, "input_size": [3, 16, 16], **stats}
    text = {"model": "lm", "params": 1, "macs": 2, "input_size": [32], **stats}
    assert "| images/s (median) |" in format_table([image])
    assert "| sequences/s (median) |" in format_table([text])
    assert "| samples/s (median) |" in format_table([image, text])
    from hf_helpers import tiny_gpt2
    from upvit.bench import describe

    row = describe(tiny_gpt2(), "lm", batch_size=2, runs=2)
    assert row["sequences_per_second"] == row["images_per_second"]
    assert row["tokens_per_second"] == pytest.approx(row["sequences_per_second"] * row["input_size"][0])
