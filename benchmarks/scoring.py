"""Exact KL scoring: the engine against the naive slice-and-rerun reference, in one run.

    .venv/bin/python benchmarks/scoring.py                 # comparison (+ the teacher's 256-image scores
                                                           #   when upvit/assets/teacher exists)
    .venv/bin/python benchmarks/scoring.py --skip-full     # comparison only
    .venv/bin/python benchmarks/scoring.py --smoke         # seconds: a tiny random ViT, to a temporary folder

Both scorers get the same proxy images (animal-mnist:train, seeded) and the same candidates: a seeded
sample of ``--fraction`` of the channels of every site (every component, every block), so the mix of
candidates is the mix of a full run. The naive reference (tests/importance/naive_vit.py) slices the
channel out of the weights and re-runs teacher and student (float32 forward, float64 KL) for every
candidate. Reported: seconds per candidate-image of each, their ratio, candidates/s, the engine's
FLOP/s (FLOPs counted by torch's FlopCounterMode) beside the machine's measured matmul FLOP/s, the
largest disagreement between the two, and the machine. Writes benchmarks/results/scoring.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "importance"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _machine import machine  # noqa: E402 (benchmarks/ is on sys.path)
from naive_vit import naive_score  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from _smoke import smoke_dir, tiny_teacher  # noqa: E402
from upvit.adapters import get_adapter  # noqa: E402
from upvit.data import load_data, sample_proxy  # noqa: E402
from upvit.importance.api import proxy_tensor  # noqa: E402
from upvit.importance.kl import kl_scores  # noqa: E402
from upvit.models import load_model  # noqa: E402

TEACHER = os.path.join(ROOT, "upvit", "assets", "teacher")
STAND_IN = ("timm:vit_base_patch16_224,img_size=28,patch_size=4,in_chans=1,num_classes=10,embed_dim=192,depth=6,"
            "num_heads=12,mlp_ratio=4.0")
RESULTS = os.path.join(ROOT, "benchmarks", "results")




def matmul_flops(n: int = 1024, m: int = 12800, k: int = 192, seconds: float = 3.0) -> dict:
    """Measured float32 matmul FLOP/s: a square n^3 product, and an engine-shaped [m, k] @ [k, 4k]."""
    out = {}
    for name, (a, b) in {"square_1024": (torch.randn(n, n), torch.randn(n, n)),
                         "engine_shape": (torch.randn(m, k), torch.randn(k, 4 * k))}.items():
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        dt = (time.perf_counter() - t0) / reps
        out[name] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / dt
    return out


def sample_candidates(adapter, fraction: float, seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for site in adapter.topology().sites:
        k = max(1, round(site.size * fraction))
        out[site.key] = sorted(torch.randperm(site.size, generator=g)[:k].tolist())
    return out


def compare(model, images, cands, batch_size: int) -> dict:
    adapter = get_adapter(model)
    n_cand = sum(len(v) for v in cands.values())
    n_img = len(images)

    t0 = time.perf_counter()
    engine = kl_scores(adapter, images, batch_size=batch_size, candidates=cands, progress=False)
    t_engine = time.perf_counter() - t0

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        kl_scores(adapter, images, batch_size=batch_size, candidates=cands, progress=False)
    engine_flops = counter.get_total_flops()

    naive = {}
    t0 = time.perf_counter()
    for key, idx in cands.items():
        naive[key] = [naive_score(model, images, key, c, dtype=torch.float32) for c in idx]
    t_naive = time.perf_counter() - t0

    # one naive candidate under the FLOP counter (teacher + student), for the naive FLOP/s
    counter = FlopCounterMode(display=False)
    with counter:
        naive_score(model, images, "ffn.0", 0, dtype=torch.float32)
    naive_flops_per_cand = counter.get_total_flops()

    top = max(max(v) for v in naive.values())
    worst, worst_at = 0.0, None
    for key, idx in cands.items():
        for c, ref in zip(idx, naive[key]):
            err = abs(float(engine[key][c]) - ref) / max(abs(ref), 1e-2 * top)
            if err > worst:
                worst, worst_at = err, f"{key}[{c}]"
    per_ci = lambda t: t / (n_cand * n_img)  # noqa: E731
    kinds = {s.key: s.kind for s in adapter.topology().sites}
    by_component = {kind: sum(len(v) for k, v in cands.items() if kinds[k] == kind)
                    for kind in ("residual", "attn", "ffn")}
    return {
        "candidates": n_cand, "candidates_by_component": by_component, "proxy_images": n_img, "batch_size": batch_size,
        "naive_s": round(t_naive, 3), "engine_s": round(t_engine, 3),
        "naive_s_per_candidate_image": per_ci(t_naive), "engine_s_per_candidate_image": per_ci(t_engine),
        "speed_ratio": t_naive / t_engine,
        "engine_candidates_per_s": n_cand / t_engine, "naive_candidates_per_s": n_cand / t_naive,
        "engine_flops": engine_flops, "engine_flop_per_s": engine_flops / t_engine,
        "naive_flops": naive_flops_per_cand * n_cand, "naive_flop_per_s": naive_flops_per_cand * n_cand / t_naive,
        "flop_ratio_naive_over_engine": naive_flops_per_cand * n_cand / engine_flops,
        "max_rel_err_vs_naive": worst, "max_rel_err_at": worst_at,
    }


def full_scores(model, batch_size: int, out: str) -> dict:
    dataset, _ = load_data("animal-mnist:train", data_config=model.upvit_config.data_config or None)
    subset, record = sample_proxy(dataset, size=256, seed=0)
    record["data"] = "animal-mnist:train"
    images = proxy_tensor(subset)
    t0 = time.perf_counter()
    scores = kl_scores(get_adapter(model), images, batch_size=batch_size, out=out, resume=True, proxy_meta=record,
                       meta={"model_spec": os.path.relpath(TEACHER, ROOT), "seed": 0,
                             "command": "benchmarks/scoring.py"})
    return {"path": os.path.relpath(out, ROOT), "wall_time_s_this_call": round(time.perf_counter() - t0, 1),
            "wall_time_s_total": scores.meta.get("wall_time_total_s"), "proxy": record,
            "channels": sum(t.numel() for _, t in scores.items())}


def full_only(batch_size: int) -> None:
    """Compute or resume the 256-image scores and record them in the existing scoring.json/md."""
    model = load_model(TEACHER).eval()
    full = full_scores(model, batch_size, os.path.join(RESULTS, "teacher_scores_p256_seed0.safetensors"))
    path = os.path.join(RESULTS, "scoring.json")
    with open(path) as f:
        report = json.load(f)
    report["teacher_scores_p256_seed0"] = full
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(RESULTS, "scoring.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the shipped teacher, else a random model of its shape")
    ap.add_argument("--proxy-size", type=int, default=32, help="proxy images for the engine/naive comparison")
    ap.add_argument("--fraction", type=float, default=0.05,
                    help="fraction of each site's channels compared "
                         "(small fractions under-fill the engine's candidate stacks)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-full", action="store_true", help="do not compute the teacher's 256-image scores")
    ap.add_argument("--full-only", action="store_true",
                    help="only compute (or resume) the teacher's 256-image scores and update the existing report")
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny random ViT, 4 images, no full scores; "
                    "results to a temporary folder (checks that the script runs, its numbers mean nothing)")
    args = ap.parse_args()
    global RESULTS
    matmul_seconds = 3.0
    if args.smoke:
        RESULTS = smoke_dir("scoring")
        args.model = args.model or tiny_teacher("vit", RESULTS)
        args.proxy_size, args.fraction, args.skip_full, matmul_seconds = 4, 0.1, True, 0.05
    if args.full_only:
        full_only(args.batch_size)
        return

    have_teacher = os.path.isfile(os.path.join(TEACHER, "config.json"))
    spec = args.model or (TEACHER if have_teacher else STAND_IN)
    torch.manual_seed(0)
    model = load_model(spec).eval()
    dataset, _ = load_data("animal-mnist:train", data_config=model.upvit_config.data_config or None)
    subset, record = sample_proxy(dataset, size=args.proxy_size, seed=args.seed)
    images = proxy_tensor(subset)
    cands = sample_candidates(get_adapter(model), args.fraction, args.seed)

    info = machine()
    cmp = compare(model, images, cands, args.batch_size)
    mm = matmul_flops(seconds=matmul_seconds)
    report = {"model": os.path.relpath(spec, ROOT) if os.path.isdir(spec) else spec,
              "model_is_trained_teacher": spec == TEACHER, "machine": info, "proxy": record,
              "comparison": cmp, "matmul_flop_per_s": mm, "machine_after": machine()}
    full = None
    if have_teacher and spec == TEACHER and not args.skip_full:
        full = full_scores(model, args.batch_size, os.path.join(RESULTS, "teacher_scores_p256_seed0.safetensors"))
    if full is None:
        why = "skipped (--skip-full)" if have_teacher else "no teacher at upvit/assets/teacher"
        full = (f"not computed in this run: {why}. It resumes from the partial file if one exists; "
                "run `.venv/bin/python benchmarks/scoring.py` to compute or continue it.")
    report["teacher_scores_p256_seed0"] = full

    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "scoring.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(RESULTS, "scoring.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    c, m, mm = r["comparison"], r["machine"], r["matmul_flop_per_s"]
    g = lambda x: f"{x / 1e9:.1f} GFLOP/s"  # noqa: E731
    lines = [
        "# Exact KL scoring: engine vs naive slice-and-rerun", "",
        f"Model: `{r['model']}`"
        + ("" if r["model_is_trained_teacher"] else " (random weights, stand-in of the teacher's shape)"),
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads; "
        f"load average before/after {m['loadavg_1_5_15']} / {r['machine_after']['loadavg_1_5_15']} (shared machine).",
        f"Proxy: {c['proxy_images']} images of animal-mnist:train (seed {r['proxy']['seed']}); candidates: "
        f"{c['candidates']} ({c['candidates_by_component']}), the same seeded fraction of every site.", "",
        "| | naive | engine |", "|---|---|---|",
        f"| wall time | {c['naive_s']:.1f} s | {c['engine_s']:.1f} s |",
        f"| s per candidate-image | {c['naive_s_per_candidate_image']:.3e} | {c['engine_s_per_candidate_image']:.3e} |",
        f"| candidates/s ({c['proxy_images']} images each) | {c['naive_candidates_per_s']:.2f} | "
        f"{c['engine_candidates_per_s']:.2f} |",
        f"| FLOPs | {c['naive_flops']:.3e} | {c['engine_flops']:.3e} |",
        f"| achieved | {g(c['naive_flop_per_s'])} | {g(c['engine_flop_per_s'])} |", "",
        f"**Speed ratio per candidate-image: {c['speed_ratio']:.2f}x** (FLOP ratio "
        f"{c['flop_ratio_naive_over_engine']:.2f}x).",
        f"Machine matmul (float32): {g(mm['square_1024'])} (1024^3), {g(mm['engine_shape'])} ([12800,192]@[192,768]).",
        f"Largest disagreement with the naive reference: {c['max_rel_err_vs_naive']:.2e} relative "
        f"({c['max_rel_err_at']}; "
        "relative to max(|naive|, 1% of the largest score)).",
        "Wall-clock ratios on a shared, loaded machine move with the load (both scorers run one after the other); "
        "the FLOP ratio is the load-independent figure.", "",
        "## Teacher's exact scores, 256-image proxy (animal-mnist:train, seed 0)", "",
    ]
    full = r["teacher_scores_p256_seed0"]
    if isinstance(full, dict):
        lines.append(f"`{full['path']}`: {full['channels']} channels, wall time {full['wall_time_s_total']} s "
                     f"on this machine (this call {full['wall_time_s_this_call']} s).")
    else:
        lines.append(full)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
