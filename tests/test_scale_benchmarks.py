"""benchmarks/scale.py and benchmarks/gpu.py in their --smoke modes (tiny shapes, CPU): they run, write
the documented files, and their derived numbers follow from their measured ones."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, out: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UPVIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke", "--out", out],
                       capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]


def test_scale_smoke(tmp_path):
    out = str(tmp_path / "scale")
    run("scale.py", out)
    with open(out + ".json") as f:
        r = json.load(f)
    assert os.path.getsize(out + ".md") > 0
    assert set(r) >= {"machine", "rates", "memory", "bf16", "fast", "projection"}
    for name, shape in r["rates"].items():
        assert set(shape["sites"]) == {"residual", "attn", "ffn"}
        for s in shape["sites"].values():
            assert s["flop_per_candidate_image"] > 0
            for d in ("fp32", "bf16"):
                m = s[d]
                rate = m["candidate_images_per_s"]
                if rate is not None:  # candidate-images/s = images * k / (t(k+1) - t(1))
                    expect = shape["images"] * shape["candidates_per_site"] / (m["seconds_k_plus_1"] - m["seconds_1"])
                    assert math.isclose(rate, expect, rel_tol=1e-9)
                    assert math.isclose(m["fraction_of_matmul"], rate * s["flop_per_candidate_image"] /
                                        m["matmul_flop_per_s"], rel_tol=1e-9)
        # projection: every site's channels x 2,000 images / its kind's rate, scaled by its share of the model
        p = r["projection"][name]
        total = 0.0
        for site in shape["sites_all"]:
            m = shape["sites"][site["kind"]]
            ref = next(x["cost"] for x in shape["sites_all"] if x["key"] == m["site"])
            rate = m["fp32"]["candidate_images_per_s"]
            total += site["size"] * 2000 * site["cost"] / ref / rate if rate else math.nan
        assert math.isclose(p["exact_fp32_hours"], total / 3600, rel_tol=1e-9) or (math.isnan(total) and
                                                                                   math.isnan(p["exact_fp32_hours"]))
        assert math.isclose(p["fisher_hours"], shape["fisher_s_per_image"] * 2000 / 3600, rel_tol=1e-9)
    mem = r["memory"]["default"]
    assert mem["peak_rss_bytes"] >= mem["rss_after_load_bytes"] > 0 and mem["stacked_images"] == \
        mem["candidate_batch"] * mem["images"]
    for kind in ("residual", "attn", "ffn"):
        e = r["bf16"]["error_by_kind"][kind]
        assert 0 <= e["max_abs_err_over_site_max"] < 0.2 and e["min_spearman"] > 0.5  # bf16, not garbage
    f = r["fast"]
    assert math.isclose(f["exact_cpu_s"], sum(s["cpu_s"] for s in f["exact_timing"]["sites"].values()), rel_tol=1e-9)
    assert math.isclose(f["fisher_speedup_vs_exact"], f["exact_cpu_s"] / f["fisher_cpu_s"], rel_tol=1e-9)
    assert math.isclose(sum(k["exact_cpu_s"] for k in f["kinds"].values()), f["exact_cpu_s"], rel_tol=1e-9)
    for t in ("Ti-like", "mild"):
        h = f["hybrid"][t]
        assert 0 < h["exact_fraction"] <= 1
        assert h["keep_set_differences_vs_exact"] == {"embed": 0, "attn": 0, "ffn": 0}  # hybrid's contract
        assert h["diagnosis"]["swaps"] == [] and 0 <= h["diagnosis"]["engine_rel_err"]["max"] < 1e-3
        # the channels per kind it scored exactly, as a share of the kind's channels, average to the overall share
        total = sum(k["channels"] for k in f["kinds"].values())
        assert math.isclose(sum(h["exact_fraction_by_kind"][k] * f["kinds"][k]["channels"] for k in f["kinds"]) / total,
                            h["exact_fraction"], rel_tol=1e-9)
    for row in f["tail_sweep"]:  # the replay at hybrid's default margin reproduces the measured run
        if row["tail"] == 1.6:
            h = f["hybrid"][row["target"]]
            assert row["exact_fraction"] == h["exact_fraction"]
            assert row["keep_set_differences_vs_exact"] == h["keep_set_differences_vs_exact"]
    for name, shape in r["rates"].items():  # hybrid: its screen + per kind, the larger measured fraction x exact's time
        p = r["projection"][name]
        frac = {k: max(h["exact_fraction_by_kind"][k] for h in f["hybrid"].values()) for k in f["kinds"]}
        expect = shape["fisher_local_attn_s_per_image"] * 2000 / 3600 + sum(
            frac[k] * p["exact_fp32_hours_by_kind"][k] for k in frac)
        assert math.isclose(p["hybrid_hours"], expect, rel_tol=1e-9) or math.isnan(expect)
        assert math.isclose(sum(p["exact_fp32_hours_by_kind"].values()), p["exact_fp32_hours"], rel_tol=1e-9) or \
            math.isnan(p["exact_fp32_hours"])


def test_gpu_smoke(tmp_path):
    out = str(tmp_path / "gpu")
    run("gpu.py", out)
    with open(out + ".json") as f:
        r = json.load(f)
    assert r["format"] == "upvit-gpu-bench/1" and r["smoke"] is True and r["device"]["type"] == "cpu"
    assert set(r["parts"]) == {"exact", "fast", "finetune", "inference"}
    assert all("skipped" not in p for p in r["parts"].values())
    assert set(next(iter(r["parts"]["exact"]["sites"].values()))) == {"site", "fp32", "bf16"}  # no fp16 on CPU
    inf = r["parts"]["inference"]["models"]
    for v in inf.values():
        assert math.isclose(v["speedup_vs_B"], v["images_per_s"] / inf["DeiT-B shape"]["images_per_s"], rel_tol=1e-9)
    assert r["parts"]["finetune"]["images_per_s"] > 0 and 0 < r["parts"]["fast"]["hybrid_exact_fraction"] <= 1
    assert os.path.getsize(out + ".md") > 0
