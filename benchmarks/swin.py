"""The whole method on the shipped Swin teacher: exact KL and hybrid scores, two pruned shapes, distillation.

Shapes (timm keeps Swin's stage widths at 1:2:4:8, so a shape is one width C plus per-stage heads):

* ``half``: C = 22 (22/44/88/176), heads kept (2/4/8/16, head dim 11), FFN ratio 4: 0.49 of the MACs;
* ``quarter``: C = 16 (16/32/64/128), heads merged pairwise (1/2/4/8, head dim 16), FFN ratio 4: 0.27.

Students at each shape: UP-ViT (exact KL scores), magnitude (L2) selection, and the same architecture
from scratch, each fine-tuned with soft distillation from the teacher (alpha 1) with one budget. Every
finished piece is written under ``--work`` and skipped when run again (resumable); the report goes to
``benchmarks/results/swin.md`` and ``swin.json``.

    python benchmarks/swin.py                      # everything (about an hour on 2 shared CPU cores)
    python benchmarks/swin.py --smoke              # seconds: a tiny random Swin, a temporary folder
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import upvit  # noqa: E402
from upvit.bench import count_macs, count_params, throughput  # noqa: E402
from upvit.data import load_data, sample_proxy  # noqa: E402
from upvit.demo import SharedTeacher, machine_description  # noqa: E402
from upvit.distill import finetune  # noqa: E402
from upvit.evaluation import evaluate  # noqa: E402
from upvit.importance.api import proxy_tensor  # noqa: E402
from upvit.io import atomic_write_json  # noqa: E402
from upvit.models import build_model  # noqa: E402
from upvit.train import TrainConfig  # noqa: E402

TEACHER = os.path.join(os.path.dirname(HERE), "upvit", "assets", "swin_teacher")
RESULTS = os.path.join(HERE, "results")
SHAPES = {
    "half": dict(embed_dim=[22, 44, 88, 176], num_heads=[2, 4, 8, 16], mlp_hidden=[88, 176, 352, 704]),
    "quarter": dict(embed_dim=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], mlp_hidden=[64, 128, 256, 512]),
}
SMOKE_SHAPES = {  # of the tiny stand-in in _smoke.py (8/16/32/64 wide, heads 2/2/4/8)
    "half": dict(embed_dim=[4, 8, 16, 32], num_heads=[2, 2, 4, 8], mlp_hidden=[16, 32, 64, 128]),
    "quarter": dict(embed_dim=[4, 8, 16, 32], num_heads=[1, 1, 2, 4], mlp_hidden=[8, 16, 32, 64]),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=TEACHER)
    ap.add_argument("--work", default="runs/swin_bench", help="where pieces are kept between runs")
    ap.add_argument("--proxy-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny random Swin, 4 images, 1 epoch of 1 batch, "
                    "results to a temporary folder (checks that the script runs, its numbers mean nothing)")
    ap.add_argument("--reading", help="a Markdown file with the hand-written reading, appended to swin.md")
    args = ap.parse_args()
    global SHAPES, RESULTS
    if args.smoke:
        from _smoke import smoke_dir, tiny_teacher

        RESULTS = args.work = smoke_dir("swin")
        args.teacher, args.proxy_size, args.epochs, SHAPES = tiny_teacher("swin", args.work), 4, 1, SMOKE_SHAPES
    os.makedirs(args.work, exist_ok=True)
    teacher = upvit.load(args.teacher)
    data_config = teacher.upvit_config.data_config
    train_eval = load_data("animal-mnist:train", data_config=data_config)[0]
    train = load_data("animal-mnist:train", data_config=data_config, train=True, seed=0)[0]
    val = load_data("animal-mnist:val", data_config=data_config)[0]
    if args.smoke:
        val = torch.utils.data.Subset(val, list(range(64)))
    subset, record = sample_proxy(train_eval, size=args.proxy_size, seed=0)
    proxy = proxy_tensor(subset)
    report: dict = {"teacher": args.teacher, "proxy": record, "machine": machine_description(), "shapes": SHAPES,
                    "epochs": args.epochs}

    # 1. scores: exact KL (persisted site by site, resumable) and hybrid at both shapes
    exact_path = os.path.join(args.work, f"kl_p{args.proxy_size}.safetensors")
    t0 = time.time()
    exact = upvit.score(teacher, proxy, method="kl", out=exact_path, resume=os.path.exists(exact_path + ".partial")
                        or os.path.exists(exact_path), proxy_meta=record, progress=False)
    exact_seconds = exact.meta.get("wall_time_total_s", time.time() - t0)
    t0 = time.time()
    hybrid = upvit.score(teacher, proxy, method="hybrid", targets=list(SHAPES.values()))
    hybrid_seconds = time.time() - t0
    agree = {}
    for name, shape in SHAPES.items():
        a, b = upvit.make_plan(teacher, exact, **shape), upvit.make_plan(teacher, hybrid, **shape)
        agree[name] = {k: a.keep[k] == b.keep[k] for k in a.keep}
    report["scoring"] = {"exact_seconds": exact_seconds, "hybrid_seconds": round(hybrid_seconds, 1),
                         "hybrid_exact_fraction": hybrid.meta["exact_fraction"],
                         "keep_sets_equal": {n: all(v.values()) for n, v in agree.items()},
                         "sites": len(exact.keys()), "channels": sum(t.numel() for _, t in exact.items())}
    log(f"scores: exact {exact_seconds:.0f} s, hybrid {hybrid_seconds:.0f} s "
        f"({100 * hybrid.meta['exact_fraction']:.1f}% of channels scored exactly), keep sets equal: "
        f"{report['scoring']['keep_sets_equal']}")
    magnitude = upvit.score(teacher, proxy, method="magnitude")

    # 2. students and fine-tuning
    teacher_top1 = evaluate(teacher, val, desc="eval teacher")["top1"]
    rows = [{"model": "teacher", "selection": "-", "shape": "full", "top1_before": teacher_top1, "top1": teacher_top1,
             "params": count_params(teacher), "macs": count_macs(teacher)}]  # images/s: one sitting at the end
    shared = SharedTeacher(teacher)
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=0.5, seed=0,
                      max_steps_per_epoch=1 if args.smoke else None)
    for shape_name, shape in SHAPES.items():
        plans = {"upvit": upvit.make_plan(teacher, exact, **shape),
                 "magnitude": upvit.make_plan(teacher, magnitude, **shape)}
        for selection in ("upvit", "magnitude", "scratch"):
            name = f"{selection}-{shape_name}"
            done = os.path.join(args.work, name + ".json")
            if os.path.exists(done):
                with open(done) as f:
                    rows.append(json.load(f))
                log(f"{name}: done before, {rows[-1]['top1']:.2f}%")
                continue
            if selection == "scratch":
                torch.manual_seed(0)
                student = build_model(copy.deepcopy(upvit.prune(teacher, plans["upvit"]).upvit_config))
                student.upvit_config.extra = {"init": "random (timm default)"}
            else:
                student = upvit.prune(teacher, plans[selection])
            before = evaluate(student, val, desc=f"eval {name}")["top1"]
            run_dir = os.path.join(args.work, name)
            t0 = time.time()
            resume = os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
            result = finetune(student, shared, train, cfg, run_dir, alpha=1.0, val_data=val, resume=resume,
                              teacher_name=args.teacher)
            row = {"model": name, "selection": selection, "shape": shape_name, "top1_before": before,
                   "top1": result["val_top1"], "params": count_params(student), "macs": count_macs(student),
                   "finetune_seconds": round(time.time() - t0, 1),
                   "kwargs": {k: student.upvit_config.timm_kwargs[k]
                              for k in ("embed_dim", "num_heads", "head_dim", "mlp_ratio")}}
            atomic_write_json(done, row)
            rows.append(row)
            log(f"{name}: {before:.2f}% -> {row['top1']:.2f}% ({row['finetune_seconds']:.0f} s)")
    # 3. throughput of every model in one sitting (interleaved rounds, best of 3), so the ratios compare
    #    like with like on a shared machine; the per-run numbers above were taken whenever each run ended
    models = {"teacher": teacher}
    models.update({r["model"]: upvit.load(os.path.join(args.work, r["model"])) for r in rows[1:]})
    best = {name: 0.0 for name in models}
    for _ in range(1 if args.smoke else 3):
        for name, model in models.items():
            best[name] = max(best[name], throughput(model, batch_size=4 if args.smoke else 256,
                                                    runs=1 if args.smoke else 5)["images_per_second"])
    for r in rows:
        r["images_per_second"] = best[r["model"]]
    report["rows"] = rows
    write(report, args.reading)


def write(report: dict, reading: str | None = None) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    atomic_write_json(os.path.join(RESULTS, "swin.json"), report)
    rows = report["rows"]
    t = rows[0]
    lines = ["# UP-ViT on the shipped Swin teacher", "",
             f"Teacher `upvit/assets/swin_teacher` ({t['top1']:.2f}% on the 2,000 validation images); proxy: "
             f"{report['proxy']['num_images']} random training images (seed 0); fine-tuning: "
             f"{report['epochs']} epochs, "
             f"batch 128, lr 1e-3, distillation alpha 1, identical for every student; throughput at batch 256, best "
             f"of 3 interleaved rounds after every run had finished, on {report['machine']} (shared with other jobs: "
             f"ratios within one table only).", "",
             "| model | shape | top-1 before FT | top-1 after FT | params (M) | MMACs (share) | images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape']} | {r['top1_before']:.2f} | {r['top1']:.2f} | "
                     f"{r['params'] / 1e6:.3f} | "
                     f"{r['macs'] / 1e6:.1f} ({r['macs'] / t['macs']:.2f}) | {r['images_per_second']:.0f} |")
    s = report["scoring"]
    lines += ["", f"Scoring: exact KL of all {s['channels']} channels ({s['sites']} sites) took "
              f"{s['exact_seconds']:.0f} s; hybrid scoring {s['hybrid_seconds']:.0f} s with "
              f"{100 * s['hybrid_exact_fraction']:.1f}% of the channels scored exactly; hybrid keep sets equal "
              f"exact's at both shapes: {s['keep_sets_equal']}.", ""]
    if reading:
        with open(reading) as f:
            lines += [f.read().strip(), ""]
    with open(os.path.join(RESULTS, "swin.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
