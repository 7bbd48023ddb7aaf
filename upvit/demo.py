"""``upvit demo``: the whole method on the embedded default, with honest baselines.

From the shipped teacher (a small DeiT-B-like ViT on Animal-MNIST) the demo

1. scores every channel with the paper's KL criterion (by default the ``hybrid`` scorer, whose keep
   sets at the demo's targets equal exact scoring's; the proxy size is printed and recorded),
2. prunes to the S shape (96 / 6 heads / 384) and the T shape (48 / 3 heads / 192),
3. fine-tunes each pruned model with soft distillation from the teacher, and, with the identical
   budget and distillation, the same architectures (a) trained from scratch, (b) pruned by weight
   magnitude (L2) and (c) pruned by random channel choice,
4. reports accuracy before/after fine-tuning, parameters, MACs and measured throughput as a
   Markdown table, JSON, and a PNG of accuracy against MACs (:func:`plot_report` redraws it from the JSON).

All runs see exactly the same batches (same seed, sampler and seeded augmentation), so the
teacher's logits for a batch are computed once and shared between runs (:class:`SharedTeacher`).
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UpvitError

ASSET_TEACHER = os.path.join(os.path.dirname(__file__), "assets", "teacher")
SHAPES = {"S": {"embed_dim": 96, "num_heads": 6, "mlp_hidden": 384},
          "T": {"embed_dim": 48, "num_heads": 3, "mlp_hidden": 192}}


@dataclass
class DemoConfig:
    """Full-length settings (about 20 minutes on 2 CPU cores); ``quick()`` gives the test-sized run."""

    teacher: str = ASSET_TEACHER
    out: str = "demo_out"
    method: str = "hybrid"
    proxy_size: int = 32  # random training images, seed 0; the public code used 2-5 images per class
    proxy_seed: int = 0
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    alpha: float = 1.0
    seed: int = 0
    # "none" fine-tunes the students as pruned (the paper); "lsq"/"bias" after compensation (upvit.compensation).
    # The report shows the top-1 before fine-tuning both without compensation and with lsq either way.
    compensate: str = "none"
    max_steps_per_epoch: int | None = None
    val_limit: int | None = None  # evaluate on N validation images only, evenly from every class (quick runs)
    bench_batch: int = 256
    bench_runs: int = 10
    shapes: dict[str, dict[str, int]] = field(default_factory=lambda: copy.deepcopy(SHAPES))

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        base = dict(proxy_size=16, epochs=1, max_steps_per_epoch=3, batch_size=32, val_limit=200,
                    bench_batch=16, bench_runs=2, method="kl")
        return cls(**{**base, **overrides})


class SharedTeacher(nn.Module):
    """The teacher, with its logits memoised by the exact bytes of the input batch.

    Runs with the same seed see identical batches, so every run after the first reuses the
    teacher's logits instead of recomputing them; the result is bit-identical to no caching.
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.upvit_config = getattr(teacher, "upvit_config", None)
        self.num_classes = getattr(teacher, "num_classes", None)
        self._cache: dict[str, torch.Tensor] = {}
        self.hits = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest() + str(tuple(x.shape))
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            return cached.to(x.device)
        out = self.teacher(x)
        self._cache[key] = out.detach()
        return out


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the report (also written under ``cfg.out``)."""
    from . import io
    from .bench import count_macs, count_params, throughput
    from .compensation import check_mode, compensate
    from .data import dataset_labels, load_data, sample_proxy, stratified_subset
    from .distill import finetune
    from .evaluation import evaluate
    from .importance.api import proxy_tensor, score
    from .models import build_model
    from .plan import make_plan
    from .surgery import prune
    from .train import TrainConfig

    t_start = time.time()
    check_mode(cfg.compensate)
    if not os.path.isdir(cfg.teacher):
        raise UpvitError(f"teacher {cfg.teacher!r} not found: reinstall upvit or run `make teacher`")
    teacher = io.load(cfg.teacher)
    data_config = teacher.upvit_config.data_config
    # a limited validation set is drawn evenly from every class (its first N images are all one class)
    val_ds = stratified_subset(load_data("animal-mnist:val", data_config=data_config)[0], cfg.val_limit, seed=cfg.seed)
    train_eval_ds = load_data("animal-mnist:train", data_config=data_config)[0]
    train_ds = load_data("animal-mnist:train", data_config=data_config, train=True, seed=cfg.seed)[0]
    os.makedirs(cfg.out, exist_ok=True)  # only once the teacher and the data have loaded

    # 1. scores -----------------------------------------------------------------------------
    proxy, proxy_record = sample_proxy(train_eval_ds, size=cfg.proxy_size, seed=cfg.proxy_seed)
    targets = [cfg.shapes[k] for k in cfg.shapes]
    method_options: dict[str, Any] = {"targets": targets} if cfg.method == "hybrid" else {}
    _log(f"[1/4] scoring the teacher's channels: method={cfg.method}, proxy={len(proxy)} training images (seed "
         f"{cfg.proxy_seed})")
    t0 = time.time()
    selections = {"upvit": score(teacher, proxy, method=cfg.method, **method_options)}
    scoring_seconds = time.time() - t0
    selections["magnitude"] = score(teacher, proxy, method="magnitude")
    selections["random"] = score(teacher, proxy, method="random", seed=cfg.seed)
    selections["upvit"].save(os.path.join(cfg.out, "scores.safetensors"))
    _log(f"      scored in {scoring_seconds:.1f} s")

    # 2. students -----------------------------------------------------------------------------
    _log("[2/4] building students: UP-ViT, magnitude, random selections and from-scratch, at the S and T shapes")
    students: dict[str, nn.Module] = {}
    before_by_mode: dict[str, dict[str, float]] = {}  # student -> top-1 before fine-tuning per compensation mode
    proxy_images = proxy_tensor(proxy, tuple(data_config["input_size"]))
    for shape_name, shape in cfg.shapes.items():
        for sel_name, scores in selections.items():
            name = f"{sel_name}-{shape_name}"
            plan = make_plan(teacher, scores, **shape)
            variants = {}
            for mode in dict.fromkeys(("none", "lsq", cfg.compensate)):
                variants[mode] = prune(teacher, plan)
                compensate(teacher, variants[mode], plan, proxy_images, mode=mode)
                before_by_mode.setdefault(name, {})[mode] = evaluate(variants[mode], val_ds,
                                                                     desc=f"eval {name}")["top1"]
            students[name] = variants[cfg.compensate]
        torch.manual_seed(cfg.seed)
        scratch = build_model(copy.deepcopy(students[f"upvit-{shape_name}"].upvit_config))
        scratch.upvit_config.extra = {"init": "random (timm default)", "shape_of": f"upvit-{shape_name}"}
        students[f"scratch-{shape_name}"] = scratch

    # 3. fine-tuning ----------------------------------------------------------------------------
    shared = SharedTeacher(teacher)
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            warmup_epochs=cfg.warmup_epochs, seed=cfg.seed, max_steps_per_epoch=cfg.max_steps_per_epoch)
    rows: list[dict[str, Any]] = []
    teacher_metrics = evaluate(teacher, val_ds, desc="eval teacher")
    teacher_bench = throughput(teacher, batch_size=cfg.bench_batch, runs=cfg.bench_runs)
    rows.append({"model": "teacher", "selection": "-", "shape": "B", "top1_before": teacher_metrics["top1"],
                 "top1": teacher_metrics["top1"], "params": count_params(teacher), "macs": count_macs(teacher),
                 "images_per_second": teacher_bench["images_per_second"], "finetune_seconds": 0.0})
    _log(f"[3/4] fine-tuning {len(students)} students for {cfg.epochs} epoch(s) each with distillation (alpha "
         f"{cfg.alpha})")
    for name, student in students.items():
        sel_name, shape_name = name.rsplit("-", 1)
        before = (before_by_mode[name][cfg.compensate] if name in before_by_mode
                  else evaluate(student, val_ds, desc=f"eval {name}")["top1"])
        run_dir = os.path.join(cfg.out, name)
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        t0 = time.time()
        record = finetune(student, shared, train_ds, train_cfg, run_dir, alpha=cfg.alpha, val_data=val_ds,
                          teacher_name=cfg.teacher, extra_config={"demo": name})
        seconds = time.time() - t0
        bench = throughput(student, batch_size=cfg.bench_batch, runs=cfg.bench_runs)
        rows.append({"model": name, "selection": sel_name, "shape": shape_name, "top1_before": before,
                     "top1_before_by_compensation": before_by_mode.get(name), "top1": record["val_top1"],
                     "params": count_params(student), "macs": count_macs(student),
                     "images_per_second": bench["images_per_second"], "finetune_seconds": round(seconds, 1)})
        _log(f"      {name:14s} top-1 {before:6.2f}% -> {record['val_top1']:6.2f}%  ({seconds:.0f} s)")

    # 4. report ---------------------------------------------------------------------------------
    report = {"config": asdict(cfg), "proxy": proxy_record, "scoring_method": cfg.method,
              "scoring_seconds": round(scoring_seconds, 1), "rows": rows, "val_images": len(val_ds),
              "val_images_per_class": np.bincount(dataset_labels(val_ds)).tolist(),
              "teacher_cache_hits": shared.hits, "total_seconds": round(time.time() - t_start, 1),
              "machine": machine_description()}
    write_report(report, cfg.out)
    _log(f"[4/4] report written to {cfg.out}/demo.md, demo.json, demo.png ({report['total_seconds']:.0f} s in all)")
    _log(markdown_table(rows))
    return report


def machine_description() -> str:
    import platform

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.machine()} {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | selection | shape | top-1 before FT | before FT, lsq compensation | top-1 after FT | "
             "params (M) | MMACs | images/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lsq = (r.get("top1_before_by_compensation") or {}).get("lsq")
        lsq_text = f"{lsq:.2f}" if lsq is not None else "-"
        lines.append(f"| {r['model']} | {r['selection']} | {r['shape']} | {r['top1_before']:.2f} | {lsq_text} | "
                     f"{r['top1']:.2f} | "
                     f"{r['params'] / 1e6:.3f} | {r['macs'] / 1e6:.1f} | {r['images_per_second']:.0f} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str) -> None:
    from .io import atomic_write_json

    atomic_write_json(os.path.join(out, "demo.json"), report)
    cfg = report["config"]
    text = ["# upvit demo", "",
            f"Teacher `{cfg['teacher']}`; scores: `{report['scoring_method']}` on "
            f"{report['proxy']['num_images']} proxy images (seed {report['proxy']['seed']}), "
            f"{report['scoring_seconds']} s; fine-tuning: {cfg['epochs']} epoch(s), "
            f"batch {cfg['batch_size']}, lr {cfg['lr']}, alpha {cfg['alpha']}, identical for every student, from the "
            "students "
            f"{'as pruned' if cfg.get('compensate', 'none') == 'none' else 'after ' + cfg['compensate']}"
            f"{'' if cfg.get('compensate', 'none') == 'none' else ' compensation'}"
            " (the lsq column: the same student after least-squares compensation on the proxy images, not fine-tuned); "
            f"accuracy on {report['val_images']} validation images; throughput at batch {cfg['bench_batch']} "
            f"on {report['machine']}.", "", markdown_table(report["rows"]), ""]
    with open(os.path.join(out, "demo.md"), "w") as f:
        f.write("\n".join(text))
    plot(report["rows"], os.path.join(out, "demo.png"), cfg.get("shapes"))


SELECTION_STYLES = {  # selection -> (legend label, colour, marker)
    "-": ("teacher", "k", "*"), "upvit": ("UP-ViT (KL scores)", "tab:red", "o"),
    "magnitude": ("L2-magnitude selection", "tab:green", "^"), "random": ("random selection", "tab:gray", "v"),
    "scratch": ("same shape, from scratch", "tab:blue", "s")}
SELECTION_NAMES = {"-": "teacher", "upvit": "UP-ViT", "magnitude": "magnitude", "random": "random",
                   "scratch": "scratch"}


def plot_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the plot draws: one point per (selection, shape) at x = its MACs (a shape's architecture
    fixes them, so every model of one shape sits at the same x, unlike measured throughput), y = the
    mean top-1 over its rows (seeds) with the min and max as the error bar where there are several."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["selection"], r["shape"]), []).append(r)
    points = []
    for (sel, shape), group in groups.items():
        macs = {r["macs"] for r in group}
        if len(macs) != 1:
            raise UpvitError(f"rows of {sel} at shape {shape} differ in MACs ({sorted(macs)}): not one architecture")
        top1 = [float(r["top1"]) for r in group]
        mean = sum(top1) / len(top1)
        name = "teacher" if sel == "-" else f"{SELECTION_NAMES.get(sel, sel)}-{shape}"
        seeds = f", {len(top1)} seeds" if len(top1) > 1 else ""
        points.append({"selection": sel, "shape": shape, "x": macs.pop(), "y": mean, "low": min(top1),
                       "high": max(top1), "n": len(top1), "label": f"{name} {mean:.1f}%{seeds}"})
    return points


def _spread_labels(ys: list[float], gap: float) -> list[float]:
    """Label heights near ``ys`` (any order) with at least ``gap`` between neighbours, centred on
    the points' own mean, so labels of close points do not overlap."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [ys[i] for i in order]
    for k in range(1, len(placed)):
        placed[k] = max(placed[k], placed[k - 1] + gap)
    shift = (sum(ys) - sum(placed)) / len(placed)  # keep the column centred on its points
    out = [0.0] * len(ys)
    for k, i in enumerate(order):
        out[i] = placed[k] + shift
    return out


def shape_caption(shapes: dict[str, dict[str, int]] | None, teacher_macs: int | None) -> str:
    """What the shape letters mean."""
    parts = ["B = the teacher's own shape" + (f" ({teacher_macs / 1e6:.1f} MMACs)" if teacher_macs else "")]
    for name, d in (shapes or {}).items():
        parts.append(f"{name} = embed {d['embed_dim']} / {d['num_heads']} heads / MLP {d['mlp_hidden']}")
    return "Shapes: " + "; ".join(parts) + "."


def plot_figure(rows: list[dict[str, Any]], shapes: dict[str, dict[str, int]] | None = None):
    """Top-1 accuracy against MACs per image (log scale), one marker per selection, every point
    labelled (labels of one shape stacked apart, with a leader line), the shape letters explained under
    the axes, the seeds' min-max as error bars where a cell has several seeds. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = plot_points(rows)
    fig, ax = plt.subplots(figsize=(7.6, 5.4), dpi=120)
    for sel, (label, color, marker) in SELECTION_STYLES.items():
        pts = sorted((p for p in points if p["selection"] == sel), key=lambda p: p["x"])
        if not pts:
            continue
        ax.errorbar([p["x"] for p in pts], [p["y"] for p in pts],
                    yerr=[[p["y"] - p["low"] for p in pts], [p["high"] - p["y"] for p in pts]],
                    marker=marker, color=color, label=label, linestyle="-" if len(pts) > 1 else "none",
                    markersize=9 if sel == "-" else 7, capsize=3, alpha=0.9)
    ys = [p["y"] for p in points]
    gap = 0.05 * (max(ys) - min(ys) or 1.0)  # about one line of 8-pt text on this figure's height
    columns = sorted({p["x"] for p in points})
    for x in columns:
        column = [p for p in points if p["x"] == x]
        left = x == columns[0] and len(columns) > 1  # the smallest shape's labels go left, off the lines
        for p, y in zip(column, _spread_labels([p["y"] for p in column], gap)):
            ax.annotate(p["label"], (p["x"], p["y"]), xytext=(x / 1.12 if left else x * 1.12, y), textcoords="data",
                        fontsize=8, va="center", ha="right" if left else "left",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})
    ax.set_xscale("log")
    ax.set_xlim(columns[0] / (3.0 if len(columns) > 1 else 1.3), columns[-1] * 2.6)  # room for the labels
    shape_of = {p["x"]: p["shape"] for p in points}
    ax.set_xticks(columns, [f"{x / 1e6:.1f} M ({shape_of[x]})" for x in columns])
    ax.minorticks_off()
    ax.set_xlabel("multiply-accumulates per image (MACs, log scale; fixed by the shape)")
    ax.set_ylabel("top-1 accuracy after fine-tuning (%)")
    ax.set_title("Animal-MNIST: pruned students after distillation fine-tuning", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    teacher = next((p["x"] for p in points if p["selection"] == "-"), None)
    seeds = max(p["n"] for p in points)
    note = (f"Error bars: min-max over seeds (up to {seeds})." if seeds > 1
            else "One fine-tuning seed per model (no error bars).")
    fig.text(0.01, 0.01, shape_caption(shapes, teacher) + " " + note, fontsize=7.5, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot(rows: list[dict[str, Any]], path: str, shapes: dict[str, dict[str, int]] | None = None) -> None:
    """Write :func:`plot_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = plot_figure(rows, shapes)
    fig.savefig(path)
    plt.close(fig)


def plot_report(json_path: str, png_path: str) -> None:
    """Redraw a demo's PNG from its ``demo.json`` (no re-run): the rows and the configured shapes."""
    import json

    with open(json_path) as f:
        report = json.load(f)
    plot(report["rows"], png_path, report.get("config", {}).get("shapes"))
