"""Quality benchmark (issue 15): UP-ViT's exact-KL selection against magnitude, random, Taylor and
scratch, and two options beyond the paper, each fine-tuned with the same distillation budget.

Cells: shape (S = embed 96 / 6 heads / MLP 384, T = 48 / 3 / 192) x method x budget (the demo's 4
epochs, and 16) x fine-tuning seed (0, 1, 2). Every cell is one fine-tuning run with the demo's
settings (batch 128, lr 1e-3, weight decay 0.05, half an epoch of warm-up then cosine, distillation
alpha 1 from the teacher, seeded data order and augmentation) and writes one JSON record when it
finishes; the report gives mean and standard error per (shape, method, budget).

Methods (the student's channels; all from the same teacher):

* ``kl``: the paper's criterion, exact KL on a 256-image proxy (training images, seed 0), read from
  ``--kl-scores`` (checked against the teacher and proxy by re-scoring a few channels).
* ``magnitude``: L2 norm of the weights a channel carries. ``random``: uniform scores seeded by the
  fine-tuning seed (each seed is another random selection). ``taylor``: first-order Taylor,
  sum over a channel's weights of |w * dL/dw|, L = cross-entropy on the proxy images' labels.
* ``scratch``: the same shape with timm's random initialisation (seeded by the fine-tuning seed).
* ``kl-iterative``: two steps (the T path goes through the S shape): prune to the intermediate shape
  with the exact scores, distil 1 epoch, re-score the intermediate model (hybrid scorer, whose keep
  sets at its target are exact KL's), prune to the target, fine-tune for the budget minus that epoch.
* ``kl-lsq`` / ``magnitude-lsq``: the kl / magnitude student, its layers then refitted by least squares
  on the proxy set (``upvit.prune(..., compensate="lsq")``, :mod:`upvit.compensation`).
* ``kl-whole`` / ``magnitude-whole``: whole original heads kept instead of merged ones
  (``make_plan(heads="whole")``), ranked by the exact KL of removing each head on the proxy set
  (kl) or by the head's summed magnitude; ``kl-whole-lsq``: both options together.
* ``kl-greedy``: residual channels chosen greedily in rounds of 16 under the joint removal already
  decided (exact KL from the original, one path 192 -> 96 -> 48 for both shapes); attention and FFN
  by the exact one-shot scores.

Runs are resumable at every level: finished cells are skipped, a cell's fine-tuning continues from its
last epoch, the greedy path from its last round; a lock file per cell lets two processes share the
work. The teacher's logits for a training batch are cached on disk by the batch's bytes (runs with
the same seed see identical batches), so the teacher runs once per batch over the whole benchmark.

    python benchmarks/quality.py run --teacher DIR --kl-scores FILE            # every cell, priority order
    python benchmarks/quality.py run ... --shape T --budget 4 --method kl --seed 0   # a piece
    python benchmarks/quality.py status                                        # done / remaining cells
    python benchmarks/quality.py report [--reading benchmarks/readings/quality.md]   # quality.md / .json

Priority order: budget 4 for the paper's comparison (kl, magnitude, random, taylor, scratch; T then
S, seed by seed), then the options at budget 4, then budget 16 in the same order.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import upvit  # noqa: E402
from upvit.demo import SHAPES, SharedTeacher, machine_description  # noqa: E402
from upvit.errors import UpvitError  # noqa: E402

PAPER = ("kl", "magnitude", "random", "taylor", "scratch")
OPTIONS = ("kl-iterative", "kl-greedy")
# issue 26: whole heads instead of merged ones, and least-squares compensation before fine-tuning
HEADS_AND_COMPENSATION = ("kl-lsq", "magnitude-lsq", "kl-whole", "magnitude-whole", "kl-whole-lsq")
METHODS = PAPER + OPTIONS + HEADS_AND_COMPENSATION
BUDGETS = (4, 16)
SEEDS = (0, 1, 2)
RESULTS = os.path.join(ROOT, "benchmarks", "results")


@dataclass
class Settings:
    """Everything that defines the cells (recorded in every cell; the report refuses to mix)."""

    teacher: str
    kl_scores: str | None
    proxy_size: int = 256
    proxy_seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    alpha: float = 1.0
    iterative_steps: int = 2
    iterative_epochs: int = 1  # distillation between the steps (counted in the budget)
    greedy_batch: int = 16
    max_steps_per_epoch: int | None = None  # smoke runs only
    val_limit: int | None = None  # smoke runs only
    shapes: dict[str, dict[str, int]] = field(default_factory=lambda: copy.deepcopy(SHAPES))

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("teacher")
        d.pop("kl_scores")
        return d


def cell_key(shape: str, method: str, budget: int, seed: int) -> str:
    return f"{shape}-{method}-ep{budget}-seed{seed}"


def priority(shapes=("T", "S"), methods=METHODS, budgets=BUDGETS, seeds=SEEDS) -> list[tuple[str, str, int, int]]:
    """All requested cells in the order they should run (see the module doc)."""
    out = []
    for budget in sorted(budgets):
        for group in (PAPER, OPTIONS, HEADS_AND_COMPENSATION):
            for seed in seeds:
                for shape in shapes:
                    out += [(shape, m, budget, seed) for m in group if m in methods]
    return out


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def _atomic_json(path: str, obj: Any) -> None:
    from upvit.io import atomic_write_json

    atomic_write_json(path, obj)


def kl_sum(teacher: torch.nn.Module, student: torch.nn.Module, images: torch.Tensor) -> float:
    """sum over ``images`` of KL(teacher || student), both in eval mode (the student's mode is restored)."""
    with torch.no_grad():
        was = student.training
        student.eval()
        t = torch.log_softmax(teacher(images).double(), -1)
        q = torch.log_softmax(student(images).double(), -1)
        student.train(was)
    return float((t.exp() * (t - q)).sum())


class DiskCachedTeacher(SharedTeacher):
    """The demo's shared teacher, with its logits also kept on disk (one small file per batch), so
    separate processes and resumed runs reuse them; bit-identical to running the teacher."""

    def __init__(self, teacher: torch.nn.Module, directory: str) -> None:
        super().__init__(teacher)
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.disk_hits = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest() + "-"
               + "x".join(map(str, x.shape)))
        if key not in self._cache:
            path = os.path.join(self.directory, key + ".safetensors")
            if os.path.exists(path):
                from upvit.io import load_tensors

                self._cache[key] = load_tensors(path)[0]["logits"]
                self.disk_hits += 1
            else:
                from upvit.io import save_tensors

                out = self.teacher(x).detach()
                save_tensors(path, {"logits": out})
                self._cache[key] = out
                return out
        self.hits += 1
        return self._cache[key].to(x.device)


class Context:
    """The teacher, data, proxy set and selections, built once per process."""

    def __init__(self, settings: Settings, results: str, work: str) -> None:
        from upvit.data import load_data, sample_proxy
        from upvit.distill import model_fingerprint
        from upvit.importance.api import proxy_labels, proxy_tensor

        self.s, self.results, self.work = settings, results, work
        os.makedirs(os.path.join(results, "cells"), exist_ok=True)
        os.makedirs(work, exist_ok=True)
        self.teacher = upvit.load(settings.teacher)
        self.teacher_fingerprint = model_fingerprint(self.teacher)
        dc = self.teacher.upvit_config.data_config
        self.data_config = dc
        val = load_data("animal-mnist:val", data_config=dc)[0]
        if settings.val_limit:
            val = torch.utils.data.Subset(val, list(range(settings.val_limit)))
        self.val = val
        train_eval = load_data("animal-mnist:train", data_config=dc)[0]
        self.proxy, self.proxy_record = sample_proxy(train_eval, size=settings.proxy_size, seed=settings.proxy_seed)
        self.proxy_record["data"] = "animal-mnist:train"
        self.images = proxy_tensor(self.proxy, tuple(dc["input_size"]))
        self.labels = proxy_labels(self.proxy)
        self.shared = DiskCachedTeacher(self.teacher, os.path.join(work, "teacher_logits", self.teacher_fingerprint))
        self._scores: dict[str, Any] = {}

    # ------------------------------------------------------------------ selections
    def scores_path(self, name: str) -> str:
        return os.path.join(self.results, f"scores_{name}_p{self.s.proxy_size}_seed{self.s.proxy_seed}.safetensors")

    def kl(self):
        """The exact one-shot scores, checked against this teacher and proxy on a few channels."""
        if "kl" not in self._scores:
            from upvit.importance.kl import kl_scores
            from upvit.importance.scores import Scores

            if self.s.kl_scores:
                scores = Scores.load(self.s.kl_scores)
                scores.check_matches(upvit.get_adapter(self.teacher).topology())
                probe = {"res.0": torch.argsort(scores["res.0"])[:2].tolist(), "ffn.5": [0, 1], "attn.2": [0]}
                probe = {k: v for k, v in probe.items() if k in scores}
                again = kl_scores(upvit.get_adapter(self.teacher), self.images, candidates=probe, progress=False)
                for key, idx in probe.items():
                    if not torch.allclose(again[key][idx], scores[key][idx].double(), rtol=1e-4, atol=1e-9):
                        raise UpvitError(f"{self.s.kl_scores} are not this teacher's exact KL scores on the "
                                         f"{self.s.proxy_size}-image proxy (seed {self.s.proxy_seed}): {key}{idx} "
                                         f"{scores[key][idx].tolist()} vs {again[key][idx].tolist()}")
            else:  # smoke runs: exact scores computed here
                scores = kl_scores(upvit.get_adapter(self.teacher), self.images, progress=False)
            self._scores["kl"] = scores
        return self._scores["kl"]

    def kl_sha256(self) -> str | None:
        if not self.s.kl_scores:
            return None
        with open(self.s.kl_scores, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def taylor(self):
        path = self.scores_path("taylor")
        if "taylor" not in self._scores:
            from upvit.importance.scores import Scores

            if os.path.exists(path) and Scores.load(path).meta.get("teacher_fingerprint") == self.teacher_fingerprint:
                self._scores["taylor"] = Scores.load(path)
            else:
                scores = upvit.score(self.teacher, self.images, method="taylor", labels=self.labels,
                                     proxy_meta=self.proxy_record,
                                     meta={"teacher_fingerprint": self.teacher_fingerprint})
                scores.save(path)
                self._scores["taylor"] = scores
        return self._scores["taylor"]

    def greedy(self):
        path = self.scores_path("greedy")
        if "greedy" not in self._scores:
            from upvit.importance.scores import Scores

            if os.path.exists(path) and Scores.load(path).meta.get("teacher_fingerprint") == self.teacher_fingerprint:
                self._scores["greedy"] = Scores.load(path)
            else:
                _log(f"greedy residual path on {self.s.proxy_size} images (rounds of {self.s.greedy_batch}; resumable)")
                state = os.path.join(self.work, f"greedy_state_{self.teacher_fingerprint}.json")
                scores = upvit.score(self.teacher, self.images, method="greedy", initial=self.kl(),
                                     targets=list(self.s.shapes.values()), batch=self.s.greedy_batch, state_path=state,
                                     proxy_meta=self.proxy_record,
                                     meta={"teacher_fingerprint": self.teacher_fingerprint})
                scores.save(path)
                self._scores["greedy"] = scores
        return self._scores["greedy"]

    def train_data(self, seed: int):
        from upvit.data import load_data

        return load_data("animal-mnist:train", data_config=self.data_config, train=True, seed=seed)[0]

    def train_config(self, epochs: int, seed: int):
        s = self.s
        return upvit.TrainConfig(epochs=epochs, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay,
                                 warmup_epochs=s.warmup_epochs, seed=seed, max_steps_per_epoch=s.max_steps_per_epoch)

    # ------------------------------------------------------------------ students
    def student(self, shape: str, method: str, seed: int) -> tuple[torch.nn.Module, int, dict[str, Any]]:
        """The student before the cell's fine-tuning, the distillation epochs it has already had
        (counted in the budget), and how it was selected."""
        from upvit.models import build_model

        target = self.s.shapes[shape]
        if method == "scratch":  # only the shape is taken from a pruned model
            magnitude = upvit.score(self.teacher, self.images, method="magnitude")
            shaped = upvit.prune(self.teacher, upvit.make_plan(self.teacher, magnitude, **target))
            torch.manual_seed(seed)
            model = build_model(copy.deepcopy(shaped.upvit_config))
            model.upvit_config.extra = {"init": "random (timm default)", "seed": seed}
            return model, 0, {"init": "timm default, torch.manual_seed(seed)"}
        if method == "kl-iterative":
            return self.iterative(shape, seed)
        if method in HEADS_AND_COMPENSATION:
            return self.optioned(shape, method)
        scores = {"kl": self.kl, "taylor": self.taylor, "kl-greedy": self.greedy}.get(method)
        if scores is not None:
            scores = scores()
        elif method == "magnitude":
            scores = upvit.score(self.teacher, self.images, method="magnitude")
        elif method == "random":
            scores = upvit.score(self.teacher, self.images, method="random", seed=seed)
        else:
            raise UpvitError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
        plan = upvit.make_plan(self.teacher, scores, **target)
        info = {"scores": {k: scores.meta.get(k) for k in ("criterion", "method", "num_images", "reduction", "seed",
                                                           "wall_time_s", "exact_evaluations")}}
        return upvit.prune(self.teacher, plan), 0, info

    def head_scores(self):
        """The exact KL of removing each whole head, on the proxy set (once per process)."""
        if "heads" not in self._scores:
            from upvit.importance.heads import head_scores

            t0 = time.time()
            self._scores["heads"] = head_scores(self.teacher, self.images)
            self._scores["heads_seconds"] = round(time.time() - t0, 1)
        return self._scores["heads"]

    def optioned(self, shape: str, method: str) -> tuple[torch.nn.Module, int, dict[str, Any]]:
        """kl / magnitude selection with whole heads and/or least-squares compensation (issue 26)."""
        base, *options = method.split("-")
        scores = self.kl() if base == "kl" else upvit.score(self.teacher, self.images, method="magnitude")
        whole = "whole" in options
        heads = self.head_scores() if whole and base == "kl" else None
        plan = upvit.make_plan(self.teacher, scores, heads="whole" if whole else "merge", head_scores=heads,
                               **self.s.shapes[shape])
        compensate = "lsq" if "lsq" in options else "none"
        student = upvit.prune(self.teacher, plan, compensate=compensate, proxy=self.images)
        info = {"scores": {"criterion": scores.meta.get("criterion")}, "heads": "whole" if whole else "merge",
                "head_ranking": ("exact KL of removing the head" if heads is not None else
                                 "sum of the head's channel scores") if whole else None,
                "compensation": {k: v for k, v in student.upvit_config.extra.get("compensation", {}).items()
                                 if k in ("mode", "seconds", "summary")} or None}
        return student, 0, info

    def proxy_kl(self, student: torch.nn.Module) -> float:
        """sum over the proxy images of KL(teacher || student): how far the student starts from its teacher."""
        return kl_sum(self.teacher, student, self.images)

    def iterative(self, shape: str, seed: int) -> tuple[torch.nn.Module, int, dict[str, Any]]:
        """Steps 1..k of iterative pruning (distillation between them), cached per (shape, seed)."""
        from upvit.iterative import prune_iteratively

        target = self.s.shapes[shape]
        base = os.path.join(self.work, "iterative", f"{self.teacher_fingerprint}-{shape}-seed{seed}")
        done = os.path.join(base, "pruned")
        info_path = os.path.join(base, "steps.json")
        if os.path.exists(os.path.join(done, "model.safetensors")) and os.path.exists(info_path):
            with open(info_path) as f:
                info = json.load(f)
            return upvit.load(done).train(), info["pre_epochs"], info
        epochs = self.s.iterative_epochs
        train = self.train_data(seed)

        def finetune(model, step):
            out = os.path.join(base, f"between-{step}")
            resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
            _log(f"  kl-iterative {shape} seed {seed}: distilling step {step}'s model for {epochs} epoch(s)")
            # trains in place (a resumed run loads its checkpoint into the model, finished or not)
            self._between = upvit.finetune(model, self.shared, train, self.train_config(epochs, seed), out,
                                           alpha=self.s.alpha, val_data=self.val, resume=resume)
            return None

        self._between = None
        result = prune_iteratively(self.teacher, self.images, target, steps=self.s.iterative_steps, method="hybrid",
                                   first_scores=self.kl(), finetune=finetune)
        upvit.save(result.model, done)
        info = {"pre_epochs": epochs * (self.s.iterative_steps - 1), "steps": [r.to_dict() for r in result.steps],
                "between_val_top1": (self._between or {}).get("val_top1")}
        _atomic_json(info_path, info)
        return upvit.load(done).train(), info["pre_epochs"], info


# ---------------------------------------------------------------------------------------- cells
def _lock(path: str) -> bool:
    """Take the cell's lock file (False if a live process holds it)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            with open(path) as f:
                pid = int(f.read().strip() or "0")
            os.kill(pid, 0)
            return False
        except (ValueError, ProcessLookupError, PermissionError):
            os.unlink(path)  # a dead holder: take over
            return _lock(path)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def run_cell(ctx: Context, shape: str, method: str, budget: int, seed: int) -> dict[str, Any] | None:
    """Fine-tune one cell (resuming its run if interrupted) and write its record; None if another
    process holds it or it is already done."""
    from upvit.bench import count_params
    from upvit.evaluation import evaluate

    key = cell_key(shape, method, budget, seed)
    record_path = os.path.join(ctx.results, "cells", key + ".json")
    if os.path.exists(record_path):
        return None
    lock = os.path.join(ctx.work, "locks", key + ".lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    if not _lock(lock):
        _log(f"{key}: another process runs it, skipped")
        return None
    try:
        t0 = time.time()
        load0 = os.getloadavg()
        student, pre_epochs, selection = ctx.student(shape, method, seed)
        t_select = time.time() - t0
        epochs = budget - pre_epochs
        before = evaluate(student, ctx.val)["top1"]
        kl_before = ctx.proxy_kl(student)
        run_dir = os.path.join(ctx.work, "runs", ctx.teacher_fingerprint, key)
        resume = os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
        _log(f"{key}: top-1 before fine-tuning {before:.2f}; {epochs} epoch(s){' (resuming)' if resume else ''}")
        t1 = time.time()
        upvit.finetune(student, ctx.shared, ctx.train_data(seed), ctx.train_config(epochs, seed), run_dir,
                       alpha=ctx.s.alpha, val_data=ctx.val, resume=resume, extra_config={"quality_cell": key})
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        record = {
            "cell": key, "shape": shape, "method": method, "budget": budget, "seed": seed,
            "top1_before": before, "proxy_kl_before": kl_before, "top1": log[-1]["val_top1"],
            "val_curve": [r["val_top1"] for r in log],
            "finetune_epochs": epochs, "pre_epochs": pre_epochs, "params": count_params(student),
            "plan": student.upvit_config.extra.get("plan"), "selection": selection,
            "seconds": {"selection": round(t_select, 1), "finetune": round(time.time() - t1, 1),
                        "epoch_mean": round(sum(r["epoch_seconds"] for r in log) / len(log), 1)},
            "resumed": resume, "teacher": ctx.s.teacher, "teacher_fingerprint": ctx.teacher_fingerprint,
            "kl_scores": ctx.s.kl_scores, "kl_scores_sha256": ctx.kl_sha256() if method.startswith("kl") else None,
            "settings": ctx.s.identity(), "proxy": ctx.proxy_record,
            "val_images": len(ctx.val), "machine": machine_description(),
            "loadavg_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        _atomic_json(record_path, record)
        _log(f"{key}: top-1 {record['top1']:.2f} after {epochs} epoch(s), {record['seconds']['finetune']:.0f} s")
        return record
    finally:
        if os.path.exists(lock):
            os.unlink(lock)


def add_proxy_kl_before(args: argparse.Namespace) -> int:
    """Finished cells made before the proxy KL was recorded: rebuild each student (deterministic for every
    method but kl-iterative) and add ``proxy_kl_before``; the top-1 before fine-tuning is checked to match."""
    from upvit.evaluation import evaluate

    cells = [c for c in load_cells(args.results) if c.get("proxy_kl_before") is None and c["method"] != "kl-iterative"]
    if not cells:
        print("every cell has its proxy KL before fine-tuning")
        return 0
    first = cells[0]
    settings = Settings(teacher=os.path.abspath(args.teacher), kl_scores=os.path.abspath(args.kl_scores)
                        if args.kl_scores else first.get("kl_scores"), **first["settings"])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = Context(settings, args.results, args.work)
    memo: dict[tuple, tuple[float, float]] = {}
    for c in cells:
        if c["teacher_fingerprint"] != ctx.teacher_fingerprint:
            raise SystemExit(f"{c['cell']} is of another teacher: give its --teacher")
        key = (c["shape"], c["method"], c["seed"] if c["method"] in ("random", "scratch") else None)
        if key not in memo:
            student, _, _ = ctx.student(c["shape"], c["method"], c["seed"])
            memo[key] = (ctx.proxy_kl(student), evaluate(student, ctx.val)["top1"])
        kl, top1 = memo[key]
        if abs(top1 - c["top1_before"]) > 1e-6:
            raise SystemExit(f"{c['cell']}: the rebuilt student has top-1 {top1} before fine-tuning, the cell recorded "
                             f"{c['top1_before']}: not the same student, not patched")
        c["proxy_kl_before"] = kl
        c["proxy_kl_before_added"] = time.strftime("%Y-%m-%d %H:%M:%S") + " (benchmarks/quality.py before)"
        _atomic_json(os.path.join(args.results, "cells", c["cell"] + ".json"), c)
        _log(f"{c['cell']}: proxy KL before fine-tuning {kl:.2f}")
    return 0


# ---------------------------------------------------------------------------------------- report
def load_cells(results: str) -> list[dict[str, Any]]:
    folder = os.path.join(results, "cells")
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                out.append(json.load(f))
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n); 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def compare(a: list[dict], b: list[dict]) -> dict[str, Any] | None:
    """a - b: the difference of the means with the unpaired standard error of the difference, and the
    paired one over the seeds both have (the runs of one seed share data order and augmentation)."""
    if not a or not b:
        return None
    ma, sa = mean_se([r["top1"] for r in a])
    mb, sb = mean_se([r["top1"] for r in b])
    out = {"diff": ma - mb, "se": math.sqrt(sa ** 2 + sb ** 2) if len(a) > 1 and len(b) > 1 else float("nan")}
    by_seed = {r["seed"]: r["top1"] for r in b}
    paired = [r["top1"] - by_seed[r["seed"]] for r in a if r["seed"] in by_seed]
    if len(paired) > 1:
        out["paired_diff"], out["paired_se"] = mean_se(paired)
    out["verdict"] = verdict(out["diff"], out["se"])
    return out


def verdict(diff: float, se: float) -> str:
    """The issue's rule: a win or a loss only beyond one standard error of the difference."""
    if not math.isfinite(se):
        return "n<2"
    if diff > se:
        return "wins" + (" (>2 SE)" if diff > 2 * se else "")
    if diff < -se:
        return "loses" + (" (>2 SE)" if diff < -2 * se else "")
    return "ties"


def summarise(cells: list[dict[str, Any]], shapes=("S", "T")) -> dict[str, Any]:
    table: dict[str, Any] = {}
    budgets = sorted({c["budget"] for c in cells})
    for budget in budgets:
        for shape in shapes:
            for method in METHODS:
                rows = [c for c in cells if (c["shape"], c["method"], c["budget"]) == (shape, method, budget)]
                if rows:
                    m, se = mean_se([r["top1"] for r in rows])
                    mb, _ = mean_se([r["top1_before"] for r in rows])
                    kls = [r["proxy_kl_before"] for r in rows if r.get("proxy_kl_before") is not None]
                    table[f"{shape}-{method}-ep{budget}"] = {
                        "shape": shape, "method": method, "budget": budget, "n": len(rows), "mean": m, "se": se,
                        "seeds": sorted(r["seed"] for r in rows),
                        "top1": [r["top1"] for r in sorted(rows, key=lambda r: r["seed"])],
                        "top1_before_mean": mb, "proxy_kl_before_mean": sum(kls) / len(kls) if kls else None,
                        "finetune_seconds_mean": sum(r["seconds"]["finetune"] for r in rows) / len(rows)}
    comparisons: dict[str, Any] = {}
    pick = lambda s, m, b: [c for c in cells if (c["shape"], c["method"], c["budget"]) == (s, m, b)]  # noqa: E731
    for budget in budgets:
        for shape in shapes:
            for a, b in [("kl", "magnitude"), ("kl", "random"), ("kl", "taylor"), ("kl", "scratch"),
                         ("kl-iterative", "kl"), ("kl-greedy", "kl"), ("kl-iterative", "magnitude"),
                         ("kl-greedy", "magnitude"), ("taylor", "magnitude"),
                         ("kl-lsq", "kl"), ("magnitude-lsq", "magnitude"), ("kl-lsq", "magnitude-lsq"),
                         ("kl-whole", "kl"), ("magnitude-whole", "magnitude"), ("kl-whole", "magnitude-whole"),
                         ("kl-whole-lsq", "kl-lsq"), ("kl-lsq", "kl-iterative"), ("kl-whole-lsq", "kl-iterative"),
                         ("kl-whole-lsq", "magnitude-lsq"), ("kl-whole-lsq", "taylor")]:
                c = compare(pick(shape, a, budget), pick(shape, b, budget))
                if c is not None:
                    comparisons[f"{shape}-ep{budget}: {a} vs {b}"] = c
    return {"budgets": budgets, "cells": table, "comparisons": comparisons}


def missing_cells(cells: list[dict[str, Any]]) -> list[str]:
    have = {c["cell"] for c in cells}
    return [cell_key(*k) for k in priority() if cell_key(*k) not in have]


def report(results: str, out_stem: str, reading_path: str | None = None) -> dict[str, Any]:
    cells = load_cells(results)
    if not cells:
        raise SystemExit(f"no finished cells under {results}/cells")
    teachers = {c["teacher_fingerprint"] for c in cells}
    settings = {json.dumps(c["settings"], sort_keys=True) for c in cells}
    if len(teachers) > 1 or len(settings) > 1:
        raise SystemExit("the cells come from different teachers or settings: report them separately")
    summary = summarise(cells)
    missing = missing_cells(cells)
    reading = None
    if reading_path:
        with open(reading_path) as f:
            reading = f.read().strip()
    extra = greedy_diagnostics(results, cells[0])
    kl_files = sorted({c["kl_scores"] for c in cells if c.get("kl_scores")})
    result = {"complete": not missing, "missing": missing, "teacher": cells[0]["teacher"],
              "teacher_fingerprint": cells[0]["teacher_fingerprint"], "kl_scores": kl_files[0] if kl_files else None,
              "settings": cells[0]["settings"], "proxy": cells[0]["proxy"], "val_images": cells[0]["val_images"],
              "machine": cells[0]["machine"], **summary, "greedy": extra, "reading": reading}
    _atomic_json(out_stem + ".json", result)
    with open(out_stem + ".md", "w") as f:
        f.write(markdown(result))
    return result


def greedy_diagnostics(results: str, cell: dict[str, Any]) -> dict[str, Any] | None:
    """Joint divergence of the greedy and one-shot residual choices at each target width."""
    proxy = cell["proxy"]
    path = os.path.join(results, f"scores_greedy_p{proxy['num_images']}_seed{proxy['seed']}.safetensors")
    if not os.path.exists(path):
        return None
    from upvit.importance.scores import Scores

    meta = Scores.load(path).meta
    g = meta["greedy"]["res.0"]
    joint = {}
    for rnd in g["rounds"]:
        width = rnd["alive_before"] - len(rnd["removed"])
        joint[width] = rnd["joint_kl"]
    return {"joint_kl_greedy": {str(w): joint.get(int(w)) for w in g["one_shot_joint_kl"]},
            "joint_kl_one_shot": g["one_shot_joint_kl"], "exact_evaluations": meta.get("exact_evaluations"),
            "wall_time_s": meta.get("wall_time_s"), "rounds": len(g["rounds"])}


def _fmt(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    se = "" if not math.isfinite(cell["se"]) else f" ± {cell['se']:.2f}"
    return f"{cell['mean']:.2f}{se} (n={cell['n']})"


def _shown_path(path: str | None) -> str | None:
    """A path as the report shows it: relative to the repository when inside it (no machine's prefix)."""
    if not path:
        return path
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full.startswith(ROOT + os.sep) else path


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    status = ("complete: every cell has its 3 seeds" if result["complete"] else
              f"**INCOMPLETE**: {len(result['missing'])} cells missing (listed at the end)")
    lines = ["# Quality benchmark: UP-ViT vs magnitude, random, Taylor, scratch, and the options beyond the paper", "",
             f"Teacher `{_shown_path(result['teacher'])}` (fingerprint {result['teacher_fingerprint']}); KL scores "
             f"`{_shown_path(result['kl_scores'])}` (exact, {result['proxy']['num_images']}-image proxy, "
             f"seed {result['proxy']['seed']}). "
             f"Fine-tuning: batch {s['batch_size']}, lr {s['lr']}, weight decay {s['weight_decay']}, warm-up "
             f"{s['warmup_epochs']} epoch, distillation alpha {s['alpha']} from the teacher, seeds 0/1/2; top-1 on "
             f"{result['val_images']} validation images. Machine: {result['machine']} (shared). Status: {status}.", "",
             "Mean ± standard error over fine-tuning seeds (n = seeds finished). Proxy KL before FT: sum over the "
             f"{result['proxy']['num_images']} proxy images of KL(teacher || student) before fine-tuning "
             "(kl-iterative: "
             "not recorded, its student is made by training).", ""]
    for budget in result["budgets"]:
        lines += [f"## Budget {budget} epochs", "", "| method | S top-1 | T top-1 | S before FT | T before FT | "
                  "S proxy KL before FT | T proxy KL before FT |", "|---|---:|---:|---:|---:|---:|---:|"]
        for method in METHODS:
            c = {sh: result["cells"].get(f"{sh}-{method}-ep{budget}") for sh in ("S", "T")}
            if not any(c.values()):
                continue
            before = [f"{c[sh]['top1_before_mean']:.2f}" if c[sh] else "-" for sh in ("S", "T")]
            kl = [f"{c[sh]['proxy_kl_before_mean']:.1f}" if c[sh] and c[sh].get("proxy_kl_before_mean") is not None
                  else "-" for sh in ("S", "T")]
            lines.append(f"| {method} | {_fmt(c['S'])} | {_fmt(c['T'])} | {before[0]} | {before[1]} | "
                         f"{kl[0]} | {kl[1]} |")
        comps = [(k, v) for k, v in result["comparisons"].items() if k.split(":")[0].endswith(f"ep{budget}")]
        if comps:
            lines += ["", "| comparison | difference ± SE | paired over seeds | verdict (1 SE rule) |",
                      "|---|---:|---:|---|"]
            for k, v in comps:
                se = f" ± {v['se']:.2f}" if math.isfinite(v["se"]) else ""
                paired = f"{v['paired_diff']:+.2f} ± {v['paired_se']:.2f}" if "paired_diff" in v else "-"
                lines.append(f"| {k} | {v['diff']:+.2f}{se} | {paired} | {v['verdict']} |")
        lines.append("")
    g = result.get("greedy")
    if g:
        lines += ["## Greedy residual path: joint divergence on the proxy set", "",
                  "sum over the proxy images of KL(teacher || teacher with the residual channels removed, "
                  "all at once):", "",
                  "| residual width | one-shot KL choice | greedy choice |", "|---:|---:|---:|"]
        for w, v in sorted(g["joint_kl_one_shot"].items(), key=lambda t: -int(t[0])):
            lines.append(f"| {w} | {v:.2f} | {g['joint_kl_greedy'].get(str(w)) or float('nan'):.2f} |")
        lines += ["", f"{g['rounds']} rounds, {g['exact_evaluations']} exact evaluations, {g['wall_time_s']:.0f} s.",
                  ""]
    if result.get("reading"):
        lines += ["## Reading", "", result["reading"], ""]
    if result["missing"]:
        lines += ["## Missing cells", "", "Finish them with (resumable; each command runs what is missing):", "",
                  "```bash", "nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py run "
                  f"--teacher {result['teacher']}"
                  + (f" --kl-scores {result['kl_scores']}" if result["kl_scores"] else ""),
                  "```", "",
                  ", ".join(result["missing"]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI
SMOKE_SHAPES = {"S": {"embed_dim": 12, "num_heads": 2, "mlp_hidden": 24},  # of _smoke.py's tiny ViT (24 wide, 4 heads)
                "T": {"embed_dim": 8, "num_heads": 1, "mlp_hidden": 12}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the requested cells that are not finished (priority order)")
    run.add_argument("--teacher", default=None, help="default: upvit/assets/teacher (with --smoke: a tiny random ViT)")
    run.add_argument("--kl-scores", default=None, help="exact KL scores of the teacher on the proxy set (required "
                     "unless --smoke)")
    run.add_argument("--shape", nargs="+", default=["T", "S"], choices=["S", "T"])
    run.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    run.add_argument("--budget", nargs="+", type=int, default=list(BUDGETS))
    run.add_argument("--seed", nargs="+", type=int, default=list(SEEDS))
    run.add_argument("--results", default=None,
                     help="default: benchmarks/results/quality (--smoke: a temporary folder)")
    run.add_argument("--work", default=None, help="default: runs/quality (--smoke: a temporary folder)")
    run.add_argument("--limit", type=int, default=None, help="stop after this many cells")
    run.add_argument("--smoke", action="store_true", help="test-sized: a tiny teacher's shapes given by --shapes-json, "
                     "2 steps per epoch, 200 validation images, KL scores computed here")
    run.add_argument("--proxy-size", type=int, default=256)
    run.add_argument("--shapes-json", default=None, help="override the S and T shapes (smoke runs)")
    before = sub.add_parser("before", help="add the proxy KL before fine-tuning to finished cells that lack it "
                            "(rebuilds each cell's student; kl-iterative is skipped: its student is trained)")
    before.add_argument("--teacher", default=os.path.join(ROOT, "upvit", "assets", "teacher"))
    before.add_argument("--kl-scores", default=None)
    before.add_argument("--results", default=os.path.join(RESULTS, "quality"))
    before.add_argument("--work", default=os.path.join(ROOT, "runs", "quality"))
    for name in ("status", "report"):
        p = sub.add_parser(name)
        p.add_argument("--results", default=os.path.join(RESULTS, "quality"))
        if name == "report":
            p.add_argument("--reading", default=None, help="a Markdown file with the hand-written reading, appended "
                           "to quality.md (benchmarks/readings/quality.md)")
    args = ap.parse_args(argv)
    if args.command == "status":
        cells = load_cells(args.results)
        missing = missing_cells(cells)
        print(f"{len(cells)} cells done, {len(missing)} missing")
        for key in missing:
            print("  missing", key)
        return 0
    if args.command == "before":
        return add_proxy_kl_before(args)
    if args.command == "report":
        if args.reading and not os.path.isfile(args.reading):
            raise SystemExit(f"--reading {args.reading}: no such file (the hand-written reading, e.g. "
                             "benchmarks/readings/quality.md)")
        stem = args.results.rstrip("/")
        report(args.results, stem, args.reading)
        print(open(stem + ".md").read())
        return 0
    if args.smoke and not args.teacher:  # a tiny random ViT and its shapes, everything in a scratch folder
        from _smoke import smoke_dir, tiny_teacher

        where = smoke_dir("quality")
        args.teacher = tiny_teacher("vit", where)
        args.results, args.work = (args.results or os.path.join(where, "results"),
                                   args.work or os.path.join(where, "work"))
        args.shapes_json = args.shapes_json or json.dumps(SMOKE_SHAPES)
        args.proxy_size = min(args.proxy_size, 16)
    args.teacher = args.teacher or os.path.join(ROOT, "upvit", "assets", "teacher")
    args.results = args.results or os.path.join(RESULTS, "quality")
    args.work = args.work or os.path.join(ROOT, "runs", "quality")
    if not args.kl_scores and not args.smoke and set(args.method) & {"kl", "kl-iterative", "kl-greedy"}:
        raise SystemExit("--kl-scores FILE is required for kl, kl-iterative and kl-greedy: the teacher's exact KL "
                         "scores on the proxy set (benchmarks/scoring.py --full-only writes them)")
    bad = [b for b in args.budget if b not in BUDGETS] if not args.smoke else []
    if bad:
        raise SystemExit(f"budgets are {BUDGETS}, got {bad}")
    settings = Settings(teacher=os.path.abspath(args.teacher),
                        kl_scores=os.path.abspath(args.kl_scores) if args.kl_scores else None,
                        proxy_size=args.proxy_size)
    if args.shapes_json:
        settings.shapes = json.loads(args.shapes_json)
    if args.smoke:
        settings.max_steps_per_epoch, settings.val_limit, settings.batch_size = 2, 200, 32
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = Context(settings, args.results, args.work)
    existing = load_cells(args.results)
    other = {c["teacher_fingerprint"] for c in existing} - {ctx.teacher_fingerprint}
    if other:
        raise SystemExit(f"{args.results} holds cells of another teacher ({sorted(other)[0]}): use another --results")
    todo = [k for k in priority(tuple(args.shape), tuple(args.method), tuple(args.budget), tuple(args.seed))
            if not os.path.exists(os.path.join(args.results, "cells", cell_key(*k) + ".json"))]
    _log(f"teacher {settings.teacher} ({ctx.teacher_fingerprint}); {len(todo)} cells to run")
    done = 0
    for shape, method, budget, seed in todo:
        if budget <= settings.iterative_epochs * (settings.iterative_steps - 1) and method == "kl-iterative":
            raise SystemExit(f"budget {budget} is too small for kl-iterative's in-between distillation")
        if run_cell(ctx, shape, method, budget, seed) is not None:
            done += 1
        if args.limit and done >= args.limit:
            break
    _log(f"{done} cells finished in this run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
