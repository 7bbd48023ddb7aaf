"""Where the pruned model runs: MACs ratio vs measured speed-up, in PyTorch eager and ONNX Runtime, batch 1 and 64.

Groups (teacher + students, measured in the same sitting, interleaved in rounds so that the load of other jobs
falls on all of them alike):

* ``vit``: the shipped ViT teacher (upvit/assets/teacher) and its S (96/6/384) and T (48/3/192) students, pruned
  with benchmarks/results/teacher60_scores_p256_seed0.safetensors (the exact KL scores);
* ``swin``: the shipped Swin teacher and the half / quarter shapes of benchmarks/swin.py;
* ``pvt``: the shipped PVTv2-B1 teacher and its B0 shape (heads kept, widths halved) as in benchmarks/pvtv2.py;
* ``lm``: the shipped GPT-2-shaped LM teacher and its 64/2/256 student (benchmarks/nlp.py, its KL scores);
* ``minilm``: all-MiniLM-L6-v2 and its 192/6/768 student (benchmarks/nlp.py, its scores).

Speed does not depend on which channels are kept, only on the shape: where no scores file is shipped (Swin,
PVTv2) the students are pruned with L2-magnitude scores. Students are not fine-tuned (weights do not change
the time). For each (runtime, batch), the models of a group are called in turns (teacher, student, student,
teacher, ...; at least ``--repeats`` calls each, more while the group's time stays under ``--seconds``) after
two warm-up calls each. The CPU is shared with other jobs (load averages of 10-18 on 2 cores were seen while
this ran), so wall-clock time would measure the scheduler: with one thread for torch (``OMP_NUM_THREADS=1``)
and for ONNX Runtime (intra-op threads = torch's), a call's *process CPU time* (``time.process_time``) is its
compute, and that is what is timed; the minimum over the calls is reported (contention still adds cache misses,
never removes work), the median is kept in deploy.json. Speed-up = teacher time / student time. ``why``: each group
also times a *floor* model, the teacher's architecture at width 1 (same operator graph, almost no MACs): its time is
what width pruning cannot remove at this depth, so teacher / floor is the ceiling of any student's speed-up; the
achieved GMAC/s at batch 64 shows where a student's kernels run less efficiently than the teacher's (odd widths
such as Swin's head dim 11); a PyTorch profile counts the operator calls per forward (the same in a teacher and
its width-pruned students).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/deploy.py [--groups vit swin ...]
    .venv/bin/python benchmarks/deploy.py --report     # rewrite deploy.md from deploy.json
    .venv/bin/python benchmarks/deploy.py --smoke      # seconds: tiny random teachers, one call per model

Resumable: finished groups are kept in deploy.json and skipped.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import upvit  # noqa: E402
from upvit.bench import count_macs, count_params, example_batch, make_runner  # noqa: E402
from upvit.importance.scores import Scores  # noqa: E402
from upvit.io import atomic_write_bytes, atomic_write_json  # noqa: E402

RESULTS = os.path.join(HERE, "results")
STATE = os.path.join(RESULTS, "deploy.json")
ASSETS = os.path.join(ROOT, "upvit", "assets")
BATCHES = (1, 64)
RUNTIMES = ("torch", "onnxruntime")
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::mkldnn_convolution", "aten::_convolution", "aten::convolution",
              "aten::_scaled_dot_product_attention_math",
              "aten::matmul", "aten::linear")
SMOKE = None  # --smoke: the folder of the tiny teachers (see smoke_setup)
SMOKE_VIT_SHAPES = {"S 12/2/24": dict(embed_dim=12, num_heads=2, mlp_hidden=24),  # of _smoke.py's tiny ViT (24/4/48)
                    "T 8/1/12": dict(embed_dim=8, num_heads=1, mlp_hidden=12)}
SWIN_SHAPES = {
    "half": dict(embed_dim=[22, 44, 88, 176], num_heads=[2, 4, 8, 16], mlp_hidden=[88, 176, 352, 704]),
    "quarter": dict(embed_dim=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], mlp_hidden=[64, 128, 256, 512]),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def magnitude(model):
    x = example_batch(model, 2, None, "cpu", random=True)
    return upvit.score(model, x, method="magnitude")


def group_models(name: str) -> dict[str, torch.nn.Module]:
    """teacher first, then the students (pruned, not fine-tuned), then the floor (see :func:`floor_model`)."""
    models = _group_models(name)
    floor = floor_model(models["teacher"])
    if floor is not None:
        models["floor (width 1)"] = floor
    return models


def floor_model(teacher):
    """The teacher's architecture at width 1 everywhere (1 residual channel, 1 head of width 1, 1 FFN unit per
    stage): the same operator graph with almost no multiply-accumulates. Its time is what no width pruning can
    remove at this depth (Python and operator dispatch, per-call overheads, token-count-bound work such as
    softmax over the attention map and reshapes): the ceiling of the speed-up is teacher time / floor time."""
    from upvit.adapters import get_adapter
    from upvit.targets import StageTarget, Targets

    topo = get_adapter(teacher).topology()
    ratios = topo.rules.residual_ratios
    stages = []
    for s in range(topo.num_stages):
        r = int(ratios[s] / ratios[0]) if ratios else 1
        stages.append(StageTarget(r, 1, r, 1))
    targets = Targets(tuple(stages))
    try:
        targets.check(topo)
        return upvit.prune(teacher, upvit.make_plan(teacher, magnitude(teacher), targets=targets))
    except Exception as e:  # a family whose rules refuse width 1: no floor row
        log(f"no floor model: {e}")
        return None


def _smoke_group_models(name: str) -> dict[str, torch.nn.Module]:
    """A smoke run's groups: _smoke.py's tiny random teachers, students pruned the way the real groups' are
    (the ViT's at fixed shapes, the PVTv2's at half width with its heads kept), magnitude scores."""
    from _smoke import tiny_teacher

    if name == "vit":
        teacher = upvit.load(tiny_teacher("vit", SMOKE))
        scores = magnitude(teacher)
        return {"teacher": teacher, **{k: upvit.prune(teacher, upvit.make_plan(teacher, scores, **v))
                                       for k, v in SMOKE_VIT_SHAPES.items()}}
    if name == "pvt":
        from upvit.adapters import get_adapter
        from upvit.targets import Targets

        teacher = upvit.load(tiny_teacher("pvt", SMOKE))
        target = Targets.from_ratio(get_adapter(teacher).topology(), 0.5, keep_heads=True)
        return {"teacher": teacher,
                "half": upvit.prune(teacher, upvit.make_plan(teacher, magnitude(teacher), targets=target))}
    raise SystemExit(f"--smoke runs the groups vit and pvt, not {name}")


def _group_models(name: str) -> dict[str, torch.nn.Module]:
    if SMOKE:
        return _smoke_group_models(name)
    if name == "vit":
        teacher = upvit.load(os.path.join(ASSETS, "teacher"))
        scores = Scores.load(os.path.join(RESULTS, "teacher60_scores_p256_seed0.safetensors"))
        return {"teacher": teacher,
                "S 96/6/384": upvit.prune(teacher, upvit.make_plan(teacher, scores, embed_dim=96, num_heads=6,
                                                                   mlp_hidden=384)),
                "T 48/3/192": upvit.prune(teacher, upvit.make_plan(teacher, scores, embed_dim=48, num_heads=3,
                                                                   mlp_hidden=192))}
    if name == "swin":
        teacher = upvit.load(os.path.join(ASSETS, "swin_teacher"))
        scores = magnitude(teacher)
        return {"teacher": teacher,
                **{f"{k} {'/'.join(map(str, v['embed_dim']))}": upvit.prune(teacher,
                                                                             upvit.make_plan(teacher, scores, **v))
                   for k, v in SWIN_SHAPES.items()}}
    if name == "pvt":
        from upvit.adapters import get_adapter
        from upvit.targets import Targets

        teacher = upvit.load(os.path.join(ASSETS, "pvt_teacher"))
        target = Targets.from_ratio(get_adapter(teacher).topology(), 0.5, keep_heads=True)
        return {"teacher": teacher,
                "B0 shape": upvit.prune(teacher, upvit.make_plan(teacher, magnitude(teacher), targets=target))}
    if name == "lm":
        teacher = upvit.load(os.path.join(ASSETS, "lm_teacher"))
        scores = Scores.load(os.path.join(RESULTS, "lm_teacher_scores_p64_seed0.safetensors"))
        return {"teacher": teacher,
                "64/2/256": upvit.prune(teacher,
                                        upvit.make_plan(teacher, scores, embed_dim=64, num_heads=2, mlp_hidden=256))}
    if name == "minilm":
        teacher = upvit.load_model("hf:all-MiniLM-L6-v2")
        scores = Scores.load(os.path.join(RESULTS, "minilm_scores_p16_seed0.safetensors"))
        return {"teacher": teacher,
                "192/6/768": upvit.prune(teacher,
                                         upvit.make_plan(teacher, scores, embed_dim=192, num_heads=6, mlp_hidden=768))}
    raise SystemExit(f"unknown group {name}")


def interleaved(runs: dict, repeats: int) -> dict:
    """Seconds of each runner's calls, taken in turns (one call of every runner, then again, ``repeats`` times)
    after two warm-up calls each, so that a burst of load from other jobs falls on all models alike."""
    for run in runs.values():
        run()
        run()
    times: dict = {k: [] for k in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            t0 = time.process_time()
            run()
            times[key].append(time.process_time() - t0)
    return times


@torch.inference_mode()
def profile(model, batch: int) -> dict[str, float]:
    """Self CPU time of one eager forward split into matrix products and the rest; operator calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from upvit.evaluation import model_output

    x = example_batch(model, batch, None, "cpu", random=True)
    model_output(model, x)
    best = None
    for _ in range(1):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            model_output(model, x)
        matmul = other = 0.0
        calls = 0
        for e in prof.key_averages():
            if not e.key.startswith("aten::"):
                continue
            calls += e.count
            if e.key in MATMUL_OPS:
                matmul += e.self_cpu_time_total
            else:
                other += e.self_cpu_time_total
        if best is None or matmul + other < best["matmul_ms"] + best["other_ms"]:
            best = {"matmul_ms": matmul / 1e3, "other_ms": other / 1e3, "aten_calls": calls}
    return best


def measure_group(name: str, repeats_min: int = 7, budget_s: float = 60.0) -> dict:
    log(f"{name}: building models")
    models = group_models(name)
    rows = {}
    for label, model in models.items():
        model.eval()
        rows[label] = {"params": count_params(model), "macs": count_macs(model),
                       "input_size": list(upvit.bench.input_size_of(model))}
    for rt in RUNTIMES:
        for b in BATCHES:
            runs = {label: make_runner(model, example_batch(model, b, None, "cpu", random=True), rt, "cpu")
                    for label, model in models.items()}
            once = max(statistics.median(v) for v in interleaved(runs, 1).values())
            repeats = int(min(60, max(repeats_min, budget_s / max(once * len(runs), 1e-6))))
            times = interleaved(runs, repeats)
            for label, ts in times.items():
                rows[label].setdefault("seconds", {}).setdefault(rt, {})[str(b)] = {
                    "min": min(ts), "median": statistics.median(ts), "repeats": repeats}
            log(f"{name}: {rt} batch {b}: {repeats} interleaved repeats")
    for label, model in models.items():
        rows[label]["profile"] = {"1": profile(model, 1)}  # operator calls (its wall-clock split is kept, not shown)
    teacher = rows["teacher"]
    for label, row in rows.items():
        row["macs_ratio"] = teacher["macs"] / row["macs"]
        row["speedup"] = {rt: {b: teacher["seconds"][rt][b]["min"] / row["seconds"][rt][b]["min"]
                               for b in row["seconds"][rt]} for rt in RUNTIMES}
        row["speedup_median"] = {rt: {b: teacher["seconds"][rt][b]["median"] / row["seconds"][rt][b]["median"]
                                      for b in row["seconds"][rt]} for rt in RUNTIMES}
    return {"models": rows, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def machine() -> dict:
    from upvit.demo import machine_description

    load = os.getloadavg()
    import onnxruntime

    return {"description": machine_description() + " (shared with other jobs)",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "loadavg_at_start": [round(v, 2) for v in load]}


def report(state: dict) -> str:
    lines = ["# Deploying pruned models: MACs ratio vs measured speed-up", "",
             "Written by `benchmarks/deploy.py` (see its docstring for the method). Students are pruned, "
             "not fine-tuned (time depends on the shape only). Speed-up = teacher time / student time, the models "
             "called in turns in the same sitting; times are process CPU time with one thread, the minimum over the "
             "calls (the 2-core machine was shared with other jobs at load 10-18, which makes wall-clock time "
             "meaningless; medians are in deploy.json). ONNX Runtime runs the `upvit export` graph "
             "(TorchScript exporter, opset 17) on the CPU provider with as many threads as torch.", ""]
    for group, g in state.get("groups", {}).items():
        m = g["machine"]
        lines += [f"## {group}", "",
                  f"Machine: {m['description']}; torch {m['torch']} with {m['torch_threads']} thread(s), "
                  f"onnxruntime {m['onnxruntime']}; load average at start {m['loadavg_at_start']}; "
                  f"finished {g['finished']}.", "",
                  "| model | params (M) | MMACs | MACs ratio | eager b1 ms | eager b64 ms | ORT b1 ms | ORT b64 ms | "
                  "speed-up eager b1 | eager b64 | ORT b1 | ORT b64 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in g["models"].items():
            s, sp = r["seconds"], r["speedup"]
            lines.append(f"| {label} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e6:.1f} | {r['macs_ratio']:.2f}x | "
                         f"{s['torch']['1']['min'] * 1e3:.2f} | {s['torch']['64']['min'] * 1e3:.1f} | "
                         f"{s['onnxruntime']['1']['min'] * 1e3:.2f} | {s['onnxruntime']['64']['min'] * 1e3:.1f} | "
                         f"{sp['torch']['1']:.2f}x | {sp['torch']['64']:.2f}x | {sp['onnxruntime']['1']:.2f}x | "
                         f"{sp['onnxruntime']['64']:.2f}x |")
        lines += ["", "Achieved multiply-accumulate rate at batch 64 (MACs x 64 / time) and operator calls per "
                      "forward:", "",
                  "| model | eager GMAC/s | ORT GMAC/s | eager b1 time / floor's | aten calls |",
                  "|---|---:|---:|---:|---:|"]
        floor = g["models"].get("floor (width 1)")
        for label, r in g["models"].items():
            s_ = r["seconds"]
            rate = {rt: r["macs"] * 64 / s_[rt]["64"]["min"] / 1e9 for rt in RUNTIMES}
            over = f"{s_['torch']['1']['min'] / floor['seconds']['torch']['1']['min']:.2f}" if floor else "-"
            lines.append(f"| {label} | {rate['torch']:.2f} | {rate['onnxruntime']:.2f} | {over} | "
                         f"{r['profile']['1']['aten_calls']} |")
        lines.append("")
    lines += budget_report()
    reading = os.path.join(HERE, "readings", "deploy.md")
    if os.path.isfile(reading) and not SMOKE:
        with open(reading) as f:
            lines += [f.read().rstrip(), ""]
    return "\n".join(lines)


def budget_report() -> list[str]:
    """The budget experiment (benchmarks/budget_quality.py): deploy_budget.json, and deploy_budget_T.json etc.
    written by one process per shape."""
    import glob
    import json
    import math

    state: dict = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "deploy_budget*.json"))):
        with open(path) as f:
            for shape, entry in json.load(f).items():
                if len(entry.get("runs", {})) >= len(state.get(shape, {}).get("runs", {})):
                    state[shape] = entry
    if not state:
        return []
    lines = ["## Budget experiment: the budget-chosen shape vs the paper's", "",
             "`benchmarks/budget_quality.py`: budgets equal to the MACs fractions of the paper's S and T students "
             "of the shipped ViT teacher; channels from the teacher's exact KL scores (256-image proxy); the budget "
             "search (grid 8) compares candidates by their joint KL on that proxy; each chosen shape fine-tuned with "
             "the quality benchmark's recipe (4 epochs, distillation from the teacher; seed 0 only, the CPU time for "
             "seeds 1-2 was not there); the paper shapes' numbers are the "
             "quality benchmark's KL cells at 4 epochs (same recipe and seeds). Top-1 on animal-mnist:val.", "",
             "| budget (MACs) | shape | candidates | joint KL on the proxy | top-1 after 4 epochs (mean +- SE, "
             "seeds) |",
             "|---|---|---:|---:|---|"]

    def mean_se(v):
        if not v:
            return "not run"
        m = sum(v) / len(v)
        if len(v) == 1:
            return f"{m:.2f} (one seed)"
        se = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))
        return f"{m:.2f} +- {se:.2f} ({', '.join(f'{x:.2f}' for x in v)})"

    for shape, e in state.items():
        p = e["paper"]
        cell = p.get("quality_cell") or {}
        ps = p["shape"]
        lines.append(f"| {p['macs_fraction']:.4f} | paper {shape}: "
                     f"{ps['embed_dim']}/{ps['num_heads']}/{ps['embed_dim']}/"
                     f"{ps['mlp_hidden']} | - | {p.get('joint_kl', float('nan')):.2f} | "
                     f"{mean_se(cell.get('top1', []))} |")
        if "chosen" in e:
            runs = [r["top1"] for _, r in sorted(e.get("runs", {}).items())]
            lines.append(f"| {p['macs_fraction']:.4f} | budget: {e['chosen']['shape']} "
                         f"({e['chosen']['use']:.1%} of the MACs) | {len(e['candidates'])} | "
                         f"{e['chosen']['joint_kl']:.2f} | "
                         f"{e.get('note') or mean_se(runs)} |")
    lines += ["", "Top-1 after each of the 4 epochs, seed 0 (paper shapes: the quality benchmark's cell records):", ""]
    for shape, e in state.items():
        cell = os.path.join(RESULTS, "quality", "cells", f"{shape}-kl-ep4-seed0.json")
        if os.path.isfile(cell):
            with open(cell) as f:
                lines.append(f"- paper {shape}: {json.load(f)['val_curve']}")
        if "0" in e.get("runs", {}):
            lines.append(f"- budget {shape} ({e['chosen']['shape']}): {e['runs']['0']['curve']}")
    lines.append("")
    return lines


def smoke_setup(args: argparse.Namespace) -> None:
    """``--smoke``: the vit and pvt groups (``_smoke_group_models``) on tiny random teachers, one timed call per
    model after the warm-up, deploy.json and deploy.md in $UPVIT_BENCH_SMOKE_DIR/deploy (never benchmarks/results).
    Checks that the script runs; its numbers mean nothing."""
    global SMOKE, RESULTS, STATE
    sys.path.insert(0, HERE)
    from _smoke import smoke_dir

    SMOKE = RESULTS = smoke_dir("deploy")
    STATE = os.path.join(RESULTS, "deploy.json")
    if args.groups == GROUPS:
        args.groups = ["vit", "pvt"]
    args.repeats, args.seconds, args.redo = 1, 0.0, True


GROUPS = ["vit", "swin", "pvt", "lm", "minilm"]


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", nargs="+", default=GROUPS)
    ap.add_argument("--repeats", type=int, default=7, help="at least this many interleaved calls per model")
    ap.add_argument("--seconds", type=float, default=60.0, help="aim for this long per (runtime, batch) of a group")
    ap.add_argument("--redo", action="store_true", help="measure the groups again even if deploy.json has them")
    ap.add_argument("--report", action="store_true", help="only rewrite deploy.md from deploy.json")
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny random teachers (the vit and pvt "
                    "groups), one timed call per model, results in $UPVIT_BENCH_SMOKE_DIR/deploy")
    args = ap.parse_args()
    if args.smoke:
        smoke_setup(args)
    state = json.load(open(STATE)) if os.path.isfile(STATE) else {"groups": {}}
    if not args.report:
        for group in args.groups:
            if group in state["groups"] and not args.redo:
                log(f"{group}: done before")
                continue
            info = machine()
            result = measure_group(group, args.repeats, args.seconds)
            state["groups"][group] = {"machine": info, **result}
            atomic_write_json(STATE, state)
            log(f"{group}: written to {STATE}")
    atomic_write_bytes(os.path.join(RESULTS, "deploy.md"), (report(state) + "\n").encode())
    log(f"wrote {os.path.join(RESULTS, 'deploy.md') if SMOKE else 'benchmarks/results/deploy.md'}")


if __name__ == "__main__":
    main()
