"""UP-PVTv2 on the embedded data: the shipped PVTv2 teacher pruned to the B0 shape, four ways of getting there.

From ``upvit/assets/pvt_teacher`` (timm ``pvt_v2_b1`` at 1x28x28, sr ratios 4/2/1/1, 10 classes):

1. exact KL scores (the paper's criterion) on a seeded proxy of training images, and the hybrid scorer
   verifying the keep sets at the B0 target (heads kept, widths halved), with its keep sets compared
   to exact's;
2. the B0 shape (embed_dims 32/64/160/256, heads 1/2/5/8, FFN 256/512/640/1024: what timm calls
   ``pvt_v2_b0``) selected by exact KL and by L2 weight magnitude, and the same shape from scratch;
3. fine-tuning with the identical budget (same epochs, batches, seed, schedule): the KL student with
   logit-KL distillation (alpha 1, the upvit default) and with penultimate-feature MSE (alpha 20, what
   the paper reportedly used for PVTv2; the teacher's features read at the student's kept final-stage
   channels), the magnitude and scratch students with logit-KL;
4. params, MACs and measured throughput of every model.

Resumable: every finished step is recorded in ``<work>/state.json``; the exact scores resume site by
site and fine-tuning from its per-epoch checkpoint, so re-running the same command continues.

    HF_HUB_OFFLINE=1 nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pvtv2.py
    .venv/bin/python benchmarks/pvtv2.py --smoke   # seconds: a tiny random PVTv2 (or --teacher DIR), a temporary folder
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from typing import Any

import torch

import upvit
from upvit.bench import count_macs, count_params, throughput
from upvit.data import load_data, sample_proxy
from upvit.demo import machine_description
from upvit.evaluation import evaluate
from upvit.importance.scores import Scores
from upvit.io import atomic_write_json
from upvit.models import build_model
from upvit.targets import Targets
from upvit.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "upvit", "assets", "pvt_teacher")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "pvtv2")
# (run name, selection, distillation, alpha)
RUNS = [("upvit-logits", "kl", "logits", 1.0), ("upvit-features", "kl", "features", 20.0),
        ("magnitude-logits", "magnitude", "logits", 1.0), ("scratch-logits", "scratch", "logits", 1.0)]


class State:
    """Finished steps, persisted after each one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        atomic_write_json(self.path, self.data)
        return value


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=None, help="default: upvit/assets/pvt_teacher")
    ap.add_argument("--work", default=None, help="scores, students, state (resumable; default runs/pvtv2)")
    ap.add_argument("--results", default=None,
                    help="prefix of the .json/.md results (default benchmarks/results/pvtv2)")
    ap.add_argument("--proxy-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny settings and (unless --teacher) a tiny random "
                    "PVTv2, results to a temporary folder (checks that the script runs, its numbers mean nothing)")
    ap.add_argument("--reading", help="a Markdown file with the hand-written reading, appended to the .md")
    args = ap.parse_args()
    smoke = dict(proxy=4, steps=1, val=64, bench_batch=4, bench_runs=1) if args.smoke else {}
    if args.smoke:
        from _smoke import smoke_dir, tiny_teacher

        where = smoke_dir("pvtv2")
        args.teacher = args.teacher or tiny_teacher("pvt", where)
        args.work = args.work or os.path.join(where, "work")
        args.results = args.results or os.path.join(where, "pvtv2")
    args.teacher = args.teacher or TEACHER
    args.work = args.work or os.path.join(ROOT, "runs", "pvtv2")
    args.results = args.results or RESULTS
    os.makedirs(args.work, exist_ok=True)
    state = State(os.path.join(args.work, "state.json"))
    t_all = time.time()

    teacher = upvit.load(args.teacher)
    dc = teacher.upvit_config.data_config
    val = load_data("animal-mnist:val", data_config=dc)[0]
    if smoke:
        val = torch.utils.data.Subset(val, list(range(smoke["val"])))
    train_eval = load_data("animal-mnist:train", data_config=dc)[0]
    train = load_data("animal-mnist:train", data_config=dc, train=True, seed=0)[0]
    proxy_size = smoke.get("proxy", args.proxy_size)
    proxy, proxy_record = sample_proxy(train_eval, size=proxy_size, seed=0)
    topo = upvit.get_adapter(teacher).topology()
    target = Targets.from_ratio(topo, 0.5, keep_heads=True)  # B1 -> B0: heads kept, widths and FFN halved

    if state.get("teacher") is None:
        m = evaluate(teacher, val, desc="eval teacher")
        state.put("teacher", {"top1": m["top1"], "loss": m["loss"]})
    log(f"teacher: {state.get('teacher')}")

    # 1. scores ---------------------------------------------------------------------------------------------
    kl_path = os.path.join(args.work, "kl.safetensors")
    if state.get("kl") is None:
        log(f"exact KL on {proxy_size} proxy images (resumable)")
        t0 = time.time()
        resume = os.path.exists(kl_path) or os.path.exists(kl_path + ".partial")
        scores = upvit.score(teacher, proxy, method="kl", out=kl_path, resume=resume, proxy_meta=proxy_record,
                             progress=False)
        state.put("kl", {"seconds_this_process": round(time.time() - t0, 1),
                         "wall_time_total_s": scores.meta.get("wall_time_total_s")})
    exact = Scores.load(kl_path)
    hybrid_path = os.path.join(args.work, "hybrid.safetensors")
    if state.get("hybrid") is None:
        log("hybrid scores verifying the B0 target")
        t0 = time.time()
        hybrid = upvit.score(teacher, proxy, method="hybrid", targets=[target], proxy_meta=proxy_record)
        hybrid.save(hybrid_path)
        seconds = time.time() - t0
        exact_plan = upvit.make_plan(teacher, exact, targets=target)
        hybrid_plan = upvit.make_plan(teacher, hybrid, targets=target)
        differ = sorted(k for k in exact_plan.keep if exact_plan.keep[k] != hybrid_plan.keep[k])
        state.put("hybrid", {"seconds": round(seconds, 1), "exact_fraction": hybrid.meta["exact_fraction"],
                             "keep_sets_equal": not differ, "sites_differing": differ,
                             "fisher_seconds": round(hybrid.meta["fisher_time_s"], 1),
                             "exact_seconds": round(hybrid.meta["exact_time_s"], 1)})
    log(f"hybrid: {state.get('hybrid')}")
    selections = {"kl": exact, "magnitude": upvit.score(teacher, proxy, method="magnitude")}

    # 2-3. students and fine-tuning ---------------------------------------------------------------------------
    cfg = TrainConfig(epochs=1 if smoke else args.epochs, batch_size=32 if smoke else 128, lr=1e-3,
                      weight_decay=0.05, warmup_epochs=0.5, seed=0, max_steps_per_epoch=smoke.get("steps"))
    plans = {sel: upvit.make_plan(teacher, s, targets=target) for sel, s in selections.items()}
    overlap = {k: len(set(plans["kl"].keep[k]) & set(plans["magnitude"].keep[k])) / len(plans["kl"].keep[k])
               for k in plans["kl"].keep}
    state.put("kl_vs_magnitude_overlap", overlap)
    for name, selection, distill, alpha in RUNS:
        if state.get(f"run:{name}") is not None:
            continue
        if selection == "scratch":
            torch.manual_seed(0)
            config = copy.deepcopy(upvit.prune(teacher, plans["kl"]).upvit_config)
            config.extra = {"init": "random (timm default), seed 0", "shape_of": "upvit B0 student"}
            student = build_model(config)
        else:
            student = upvit.prune(teacher, plans[selection])
        before = evaluate(student, val, desc=f"eval {name}")["top1"]
        run_dir = os.path.join(args.work, name)
        resume = os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
        if not resume and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        log(f"fine-tuning {name} ({distill}, alpha {alpha}, {cfg.epochs} epochs){' resumed' if resume else ''}")
        t0 = time.time()
        record = upvit.finetune(student, teacher, train, cfg, run_dir, alpha=alpha, val_data=val, resume=resume,
                                teacher_name="upvit/assets/pvt_teacher", distill=distill,
                                extra_config={"benchmark": f"pvtv2 {name}"})
        state.put(f"run:{name}", {"model": name, "selection": selection, "distill": distill, "alpha": alpha,
                                  "top1_before": before, "top1": record["val_top1"], "val_loss": record["val_loss"],
                                  "epochs": cfg.epochs, "finetune_seconds_this_process": round(time.time() - t0, 1),
                                  "history": [r.get("val_top1") for r in _history(run_dir)]})
        log(f"{name}: {before:.2f}% -> {record['val_top1']:.2f}%")

    # 4. bench ---------------------------------------------------------------------------------------------------
    if state.get("bench") is None:
        rows = {}
        for name, model in [("teacher", teacher)] + [(n, upvit.load(os.path.join(args.work, n))) for n, *_ in RUNS]:
            tp = throughput(model, batch_size=smoke.get("bench_batch", 256), runs=smoke.get("bench_runs", 10))
            rows[name] = {"params": count_params(model), "macs": count_macs(model),
                          "images_per_second": round(tp["images_per_second"], 1),
                          "timm_equivalent": model.upvit_config.timm_equivalent}
        state.put("bench", rows)
    report = {"teacher_dir": os.path.relpath(os.path.abspath(args.teacher), ROOT), "proxy": proxy_record,
              "target": target.to_dict(),
              "train_config": {k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "weight_decay",
                                                            "warmup_epochs", "seed", "max_steps_per_epoch")},
              "machine": machine_description(), "smoke": bool(smoke), "val_images": len(val),
              "bench_batch": smoke.get("bench_batch", 256), **state.data,
              "seconds_this_process": round(time.time() - t_all, 1)}
    atomic_write_json(args.results + ".json", report)
    text = markdown(report)
    if args.reading:
        with open(args.reading) as f:
            text += "\n" + f.read().strip() + "\n"
    with open(args.results + ".md", "w") as f:
        f.write(text)
    log(f"wrote {args.results}.json/.md")


def _history(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown(r: dict[str, Any]) -> str:
    """The result table (the reading is written by hand under it)."""
    b = r["bench"]
    lines = ["| model | selection | distillation | top-1 before FT | top-1 after FT | params (M) | MMACs | images/s |",
             "|---|---|---|---:|---:|---:|---:|---:|",
             f"| teacher (pvt_v2_b1 shape) | - | - | {r['teacher']['top1']:.2f} | {r['teacher']['top1']:.2f} | "
             f"{b['teacher']['params'] / 1e6:.3f} | {b['teacher']['macs'] / 1e6:.1f} | "
             f"{b['teacher']['images_per_second']:.0f} |"]
    for name, *_ in RUNS:
        run = r[f"run:{name}"]
        dist = "logit KL, alpha 1" if run["distill"] == "logits" else f"feature MSE, alpha {run['alpha']:g}"
        lines.append(f"| {name} | {run['selection']} | {dist} | {run['top1_before']:.2f} | {run['top1']:.2f} | "
                     f"{b[name]['params'] / 1e6:.3f} | {b[name]['macs'] / 1e6:.1f} | "
                     f"{b[name]['images_per_second']:.0f} |")
    h = r["hybrid"]
    return "\n".join([
        "# UP-PVTv2 on the embedded data", "",
        f"Teacher `{r['teacher_dir']}`; "
        f"exact KL scores on {r['proxy']['num_images']} training images (seed {r['proxy']['seed']}); target: "
        "the B0 shape "
        f"(residual {[s['residual'] for s in r['target']['stages']]}, heads "
        f"{[s['heads'] for s in r['target']['stages']]}, "
        f"FFN {[s['ffn'] for s in r['target']['stages']]}); fine-tuning {r['train_config']['epochs']} epoch(s), batch "
        f"{r['train_config']['batch_size']}, lr {r['train_config']['lr']}, weight decay "
        f"{r['train_config']['weight_decay']}, "
        f"warm-up {r['train_config']['warmup_epochs']} epoch, seed 0, identical for every student; accuracy on the "
        f"{r['val_images']:,} validation images; throughput at batch {r['bench_batch']} on {r['machine']}.", "",
        *lines, "",
        f"Hybrid scoring at the B0 target: keep sets equal to exact's: **{h['keep_sets_equal']}** "
        f"({h['exact_fraction']:.1%} of channels scored exactly, {h['seconds']:.0f} s; exact scoring took "
        f"{r['kl']['wall_time_total_s']:.0f} s).", ""])


if __name__ == "__main__":
    main()
