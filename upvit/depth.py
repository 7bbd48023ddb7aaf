"""Progressive block pruning with hybrid blocks (docs/method.md section 3, the paper's third part).

Removable *candidates* come from the topology: a whole block (``attn.i`` + ``ffn.i``) or a *hybrid
block* (``ffn.i`` + ``attn.i+1``: everything between two consecutive residual positions), inside
one stage; a plain ViT of depth d has 2d - 1 of them. After a removal the remaining units are
re-paired into ordinary blocks (:meth:`upvit.topology.Topology.rebuilt_blocks`): after a hybrid,
block i's attention (with its norm and layer scale) and block i+1's FFN form one pre-norm block,
so the result is a standard model of the same family, one block shallower, whose logits equal the
original's with those two sub-layers skipped. Families where a block's position matters refuse
what they cannot rebuild (``adapter.check_units``: Swin keeps every remaining block's window shift,
so inside a shifted stage only the last block, or a hybrid ending there, leaves alone).

:func:`prune_depth` is the driver: each step scores every candidate on the current model (by
default the paper's summed KL on the proxy set, :func:`upvit.importance.units.unit_scores`), removes
the least important, fine-tunes with distillation from the original model for the step's budget,
evaluates and benchmarks, appends a JSON line to ``log.jsonl`` and checkpoints the step's model
directory. A run interrupted at any point continues with ``resume=True`` and ends with exactly the
model an uninterrupted run gives.

Amounts are in *blocks-worth*: removing N blocks-worth removes 2N units, each candidate being a
block or a hybrid (one blocks-worth each, or ``candidate_blocks`` with longer runs). ``remove=N,
steps=K`` removes N/K blocks-worth per step; a step removing more than one candidate takes the
lowest-scoring ones that can be removed together (disjoint and rebuildable), greedily.

Width and depth compose. The documented order is **depth first, then width** (``upvit depth``,
then ``upvit score`` + ``upvit prune`` on its result): the few, coarse depth decisions are taken on
the full-width model, where the KL of a block is measured in the context it was trained in, and the
channel scores are then computed on the blocks that will actually remain (channels of a block that
is removed later would have been scored for nothing). The reverse order (``upvit depth`` on a
width-pruned model) and a single plan doing both (``make_plan(..., drop_units=[...])``, channels and
units chosen from scores of the unpruned model) work as well.

>>> import upvit                                                               # doctest: +SKIP
>>> small = upvit.prune_depth(teacher, teacher, train_ds, proxy, remove=2, steps=2,
...                           train_config=upvit.TrainConfig(epochs=4), out_dir="runs/depth")  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import UpvitError
from .provenance import run_record

CRITERIA = ("kl", "block_influence", "last")
KINDS = ("block", "hybrid")
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
TABLE_FILE = "depth.md"
SELECTION_FILE = "selection.json"
STEP_FILE = "step.json"
RUN_FORMAT = "upvit-depth-run"


# ------------------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """Units removed together: ``kind`` "block" (starts with an attention: attn.i, ffn.i, ...) or
    "hybrid" (starts with an FFN: ffn.i, attn.i+1, ...)."""

    units: tuple[str, ...]
    kind: str

    @property
    def key(self) -> str:
        return "+".join(self.units)

    def to_dict(self) -> dict[str, Any]:
        return {"units": list(self.units), "kind": self.kind}


def candidates(model: Any, candidate_blocks: int = 1, kinds: Sequence[str] = KINDS) -> list[Candidate]:
    """Every removable run of ``2 * candidate_blocks`` consecutive units inside a stage that the
    family can rebuild without (blocks and/or hybrid blocks, in forward order).

    >>> [c.key for c in candidates(vit_of_depth_3)]                            # doctest: +SKIP
    ['attn.0+ffn.0', 'ffn.0+attn.1', 'attn.1+ffn.1', 'ffn.1+attn.2', 'attn.2+ffn.2']
    """
    from .adapters import get_adapter

    if candidate_blocks < 1:
        raise UpvitError(f"candidate_blocks must be at least 1, got {candidate_blocks}")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UpvitError(f"candidate kinds must be among {', '.join(KINDS)}, got {list(kinds)}")
    adapter = get_adapter(model)
    topo = adapter.topology()
    if not topo.rules.depth_pruning:
        raise UpvitError(f"{type(adapter.model).__name__} cannot be rebuilt with fewer blocks yet: depth pruning "
                         "covers timm ViT/DeiT, Swin and PVTv2")
    units = [u.key for u in topo.units]
    out = []
    for run in topo.unit_runs(2 * candidate_blocks):
        kind = "block" if run[0].startswith("attn.") else "hybrid"
        if kind not in kinds:
            continue
        try:
            adapter.check_units([u for u in units if u not in run])
        except UpvitError:
            continue
        out.append(Candidate(run, kind))
    return out


def score_candidates(model: Any, proxy: Any, cands: Sequence[Candidate], criterion: str = "kl",
                     batch_size: int = 64) -> torch.Tensor:
    """``[C]`` float64 importance of each candidate (higher = more important, the lowest is removed):

    * ``"kl"``: the paper's summed KL(model || model without the candidate) on ``proxy``;
    * ``"block_influence"``: ShortGPT's ``1 - cos(input, output)`` on ``proxy``;
    * ``"last"``: the number of units after the candidate (the naive baseline: drop the last blocks).
    """
    from .adapters import get_adapter
    from .importance.api import proxy_tensor
    from .importance.units import block_influence, unit_scores

    if criterion not in CRITERIA:
        raise UpvitError(f"unknown depth criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    adapter = get_adapter(model)
    groups = [c.units for c in cands]
    if criterion == "last":
        topo = adapter.topology()
        return torch.tensor([float(len(topo.units) - 1 - max(topo.unit_index(u) for u in g)) for g in groups],
                            dtype=torch.float64)
    inputs = proxy if isinstance(proxy, dict) else proxy_tensor(proxy, adapter.input_size())
    if criterion == "kl":
        return unit_scores(adapter, inputs, groups, batch_size=batch_size)
    return block_influence(adapter, inputs, groups, batch_size=batch_size)


def select(model: Any, cands: Sequence[Candidate], scores: torch.Tensor, count: int) -> list[Candidate]:
    """The ``count`` lowest-scoring candidates that can be removed together: taken greedily in order
    of score (ties: the earlier one), skipping any that overlaps one already taken or whose removal
    together with them the family cannot rebuild."""
    from .adapters import get_adapter

    adapter = get_adapter(model)
    topo = adapter.topology()
    units = [u.key for u in topo.units]
    order = sorted(range(len(cands)), key=lambda c: (float(scores[c]), topo.unit_index(cands[c].units[0])))
    chosen: list[Candidate] = []
    removed: set[str] = set()
    for c in order:
        if len(chosen) == count:
            break
        cand = cands[c]
        if removed & set(cand.units):
            continue
        try:
            adapter.check_units([u for u in units if u not in removed | set(cand.units)])
        except UpvitError:
            continue
        chosen.append(cand)
        removed |= set(cand.units)
    if len(chosen) < count:
        raise UpvitError(f"only {len(chosen)} of the {count} candidates asked for can be removed together from this "
                         f"model: remove less, or in more steps")
    return sorted(chosen, key=lambda c: topo.unit_index(c.units[0]))


def removal_plan(model: Any, removed: Sequence[str]):
    """A :class:`~upvit.plan.Plan` that removes the units ``removed`` and keeps every channel."""
    from .adapters import get_adapter
    from .plan import Plan

    adapter = get_adapter(model)
    topo = adapter.topology()
    for key in removed:
        topo.unit_index(key)
    kept = [u.key for u in topo.units if u.key not in set(removed)]
    adapter.check_units(kept)
    keep = {s.key: list(range(s.size)) for s in topo.sites if s.kind == "residual" or s.key in kept}
    heads = {s.key: [[h] for h in range(s.heads or 1)] for s in topo.sites if s.kind == "attn" and s.key in kept}
    return Plan(keep=keep, heads=heads, source=topo.to_dict(), units=kept,
                meta={"criterion": "depth", "removed_units": list(removed)})


def remove_units(model: nn.Module, removed: Sequence[str]) -> nn.Module:
    """``model`` rebuilt without the units ``removed`` (a genuine shallower model of its family)."""
    from .surgery import prune

    return prune(model, removal_plan(model, removed))


def _renamed(model: nn.Module, removed: Sequence[str], origin: list[str]) -> list[str]:
    """The original names of the units of ``model`` rebuilt without ``removed`` (``origin`` gives
    the original name of each unit of ``model``, in forward order)."""
    from .adapters import get_adapter

    topo = get_adapter(model).topology()
    name = dict(zip((u.key for u in topo.units), origin))
    out = []
    for pair in topo.rebuilt_blocks([u.key for u in topo.units if u.key not in set(removed)]):
        out += [name[pair.attn], name[pair.ffn]]
    return out


# ------------------------------------------------------------------------------------- the driver
def _fingerprint_tensor(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{list(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UpvitError(f"cannot read {path} ({e}): delete the step directory to redo the step") from None


def _stats(model: nn.Module, val_data: Any, device: torch.device, bench_batch: int, bench_runs: int,
           desc: str) -> dict[str, Any]:
    from .bench import count_macs, count_params, throughput
    from .evaluation import evaluate

    out: dict[str, Any] = {"params": count_params(model), "macs": count_macs(model)}
    speed = throughput(model, batch_size=bench_batch, runs=bench_runs, device=device)
    out["images_per_second"] = round(speed["images_per_second"], 1)
    if val_data is not None:
        metrics = evaluate(model, val_data, device=device, desc=desc)
        out.update({"top1": metrics["top1"], "val_loss": metrics["loss"]})
    else:
        out.update({"top1": None, "val_loss": None})
    return out


@dataclass(frozen=True)
class DepthConfig:
    """The settings of one depth-pruning run, checked when built (one line naming the problem and the fix).

    ``remove`` blocks-worth in ``steps`` equal rounds, each removing ``remove / steps / candidate_blocks``
    candidates of ``kinds`` ("block", "hybrid"; ``criterion="last"`` considers blocks only) chosen by
    ``criterion`` ("kl", the paper's; "block_influence"; "last"). ``train_config`` (a
    :class:`upvit.train.TrainConfig` whose ``epochs`` is the budget of the whole run; None: no fine-tuning)
    is split evenly over the steps; ``alpha``/``temperature`` weigh the distillation term; the rest sizes
    the scoring and the throughput measurement."""

    remove: int
    steps: int = 1
    criterion: str = "kl"
    kinds: tuple[str, ...] = KINDS
    candidate_blocks: int = 1
    train_config: Any = None
    alpha: float = 1.0
    temperature: float = 1.0
    score_batch_size: int = 64
    bench_batch: int = 64
    bench_runs: int = 10

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise UpvitError(f"unknown depth criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}")
        # the naive baseline drops the last blocks: hybrids are not its candidates
        object.__setattr__(self, "kinds", ("block",) if self.criterion == "last" else tuple(self.kinds))
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise UpvitError(f"candidate kinds must be among {', '.join(KINDS)}, got {list(self.kinds)}")
        for name in ("remove", "steps", "candidate_blocks", "score_batch_size", "bench_batch", "bench_runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UpvitError(f"{name} must be a positive integer, got {value!r}")
        for name, low in (("alpha", 0.0), ("temperature", None)):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or (value < low if low is not None else value <= 0):
                bound = "at least 0" if low is not None else "above 0"
                raise UpvitError(f"{name} must be a finite number {bound}, got {value!r}")
        if self.remove % self.steps:
            raise UpvitError(f"--remove {self.remove} blocks-worth does not split into {self.steps} equal steps: "
                             "choose --steps among "
                             f"{', '.join(str(k) for k in range(1, self.remove + 1) if self.remove % k == 0)}")
        if self.per_step % self.candidate_blocks:
            raise UpvitError(f"each step removes {self.per_step} blocks-worth, not a multiple of the candidates' "
                             f"{self.candidate_blocks} blocks: change --steps or --candidate-blocks")
        if self.train_config is not None and self.train_config.epochs % self.steps:
            raise UpvitError(f"{self.train_config.epochs} fine-tuning epochs do not split into {self.steps} equal "
                             f"steps: give a multiple of {self.steps}")

    @property
    def per_step(self) -> int:
        """Blocks-worth removed by each step."""
        return self.remove // self.steps

    @property
    def step_train_config(self) -> Any:
        """Each step's fine-tuning: the run's budget divided by the steps (None: no fine-tuning)."""
        cfg = self.train_config
        return dataclasses.replace(cfg, epochs=cfg.epochs // self.steps) if cfg is not None else None

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one (``run.json``; the fingerprints join it)."""
        return {"remove": self.remove, "steps": self.steps, "criterion": self.criterion, "kinds": list(self.kinds),
                "candidate_blocks": self.candidate_blocks, "alpha": self.alpha, "temperature": self.temperature,
                "score_batch_size": self.score_batch_size,
                "train_config": dataclasses.asdict(self.train_config) if self.train_config is not None else None}


def prune_depth(
    model: nn.Module,
    teacher: nn.Module,
    train_data: Any,
    proxy: Any,
    remove: int,
    steps: int,
    train_config: Any,
    out_dir: str,
    criterion: str = "kl",
    kinds: Sequence[str] = KINDS,
    candidate_blocks: int = 1,
    val_data: Any = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    resume: bool = False,
    score_batch_size: int = 64,
    bench_batch: int = 64,
    bench_runs: int = 10,
    device: torch.device | str | None = None,
    callback: Callable[[str, int], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> nn.Module:
    """Remove ``remove`` blocks-worth of units in ``steps`` rounds; returns the final model.

    Each step: score the candidates of the current model (``criterion``: "kl", the paper's;
    "block_influence"; "last"), remove the lowest-scoring ``remove / steps / candidate_blocks`` of
    them (:func:`select`), fine-tune with distillation from ``teacher`` (the original model) for
    ``train_config.epochs / steps`` epochs (``train_config`` is a :class:`upvit.train.TrainConfig`
    whose ``epochs`` is the budget of the whole run; None: no fine-tuning), evaluate on
    ``val_data`` and benchmark. The settings are checked by :class:`DepthConfig`; :func:`run_depth`
    takes one directly.

    Writes to ``out_dir``: ``run.json`` (settings, fingerprints), ``step-{k}/`` (``selection.json``:
    every candidate's score and what was removed; the fine-tuning run and the step's model
    directory; ``step.json``: the step's record), ``log.jsonl`` (one line per step, step 0 being
    the input model), ``depth.md`` (a table of accuracy, params, MACs and throughput per step) and,
    at the end, the final model directory itself (``config.json`` + ``model.safetensors``).
    ``resume=True`` continues an interrupted run (refused if its settings differ); the final model is
    then identical to an uninterrupted run's. ``callback(event, step)`` is called after "scored",
    "finetuned" and "step" (the step's record written).

    ``kinds``: candidate kinds ("block", "hybrid"); ``criterion="last"`` considers blocks only.
    The KL of a candidate is measured against the current model (the one the step prunes).
    """
    config = DepthConfig(remove=remove, steps=steps, criterion=criterion, kinds=tuple(kinds),
                         candidate_blocks=candidate_blocks, train_config=train_config, alpha=alpha,
                         temperature=temperature, score_batch_size=score_batch_size, bench_batch=bench_batch,
                         bench_runs=bench_runs)
    return run_depth(config, model, teacher, train_data, proxy, out_dir, val_data=val_data, resume=resume,
                     device=device, callback=callback, meta=meta)


def run_depth(config: DepthConfig, model: nn.Module, teacher: nn.Module, train_data: Any, proxy: Any, out_dir: str,
              *, val_data: Any = None, resume: bool = False, device: torch.device | str | None = None,
              callback: Callable[[str, int], None] | None = None, meta: dict[str, Any] | None = None) -> nn.Module:
    """:func:`prune_depth` with its settings as one checked :class:`DepthConfig`."""
    return _DepthRun(config, model, teacher, train_data, proxy, out_dir, val_data=val_data, resume=resume,
                     device=device, callback=callback, meta=meta).run()


class _DepthRun:
    """One depth-pruning run: set-up (checks, fingerprints, ``run.json``), step 0 (the input model's record),
    each step (select -> remove -> fine-tune -> record) and the final model directory."""

    def __init__(self, config: DepthConfig, model: nn.Module, teacher: nn.Module, train_data: Any, proxy: Any,
                 out_dir: str, *, val_data: Any, resume: bool, device: torch.device | str | None,
                 callback: Callable[[str, int], None] | None, meta: dict[str, Any] | None) -> None:
        self.config, self.model, self.teacher = config, model, teacher
        self.train_data, self.proxy, self.val_data = train_data, proxy, val_data
        self.out_dir, self.resume, self.device, self.callback = out_dir, resume, device, callback
        self.meta = dict(meta or {})

    # ---------------------------------------------------------------- set-up
    def _setup(self) -> None:
        """Refuse what cannot run, fingerprint the inputs, and start (or check, on resume) ``run.json``."""
        from . import io
        from .adapters import get_adapter
        from .distill import check_teacher, model_fingerprint
        from .distributed import default_device, env_world_size
        from .importance.api import proxy_tensor

        self.t_start = time.time()
        if env_world_size() > 1:
            raise UpvitError("depth pruning runs in one process: start it without torchrun")
        adapter = get_adapter(self.model)
        self.depth0 = adapter.topology().num_blocks
        if self.config.remove >= self.depth0:
            raise UpvitError(f"the model has {self.depth0} blocks: remove fewer than {self.depth0}")
        check_teacher(self.model, self.teacher)
        self.device = torch.device(self.device) if self.device is not None else default_device()
        proxy = self.proxy
        self.proxy = proxy if isinstance(proxy, dict) else proxy_tensor(proxy, adapter.input_size())
        self.settings = {**self.config.settings(),
                         "model": model_fingerprint(self.model), "teacher": model_fingerprint(self.teacher),
                         "proxy": _fingerprint_tensor(self.proxy) if isinstance(self.proxy, torch.Tensor) else
                         {k: _fingerprint_tensor(v) for k, v in sorted(self.proxy.items())},
                         "train_size": len(self.train_data) if self.train_data is not None else None}
        out_dir, run_path = self.out_dir, os.path.join(self.out_dir, RUN_FILE)
        if self.resume:
            if not os.path.isfile(run_path):
                raise UpvitError(f"--resume: {out_dir} holds no depth-pruning run ({RUN_FILE}); start without --resume")
            recorded = _read_json(run_path)
            if recorded.get("settings") != self.settings:
                diff = next((k for k in self.settings if recorded.get("settings", {}).get(k) != self.settings[k]),
                            "format")
                raise UpvitError(f"--resume: the run in {out_dir} was made with another {diff} (model, teacher, proxy "
                                 "and settings must be the same); use the original command or a new --out")
        else:
            if os.path.isfile(run_path):
                raise UpvitError(f"{out_dir} already holds a depth-pruning run: add --resume to continue it or choose "
                                 "a new --out")
            io.atomic_write_json(run_path, {"format": RUN_FORMAT, "version": 1, "settings": self.settings,
                                            "meta": self.meta})

    def _event(self, name: str, k: int) -> None:
        if self.callback is not None:
            self.callback(name, k)

    def _stats(self, model: nn.Module, desc: str) -> dict[str, Any]:
        return _stats(model, self.val_data, self.device, self.config.bench_batch, self.config.bench_runs, desc)

    def _base(self) -> None:
        """Step 0: the input model's record (read back after a resume)."""
        from . import io
        from .adapters import get_adapter

        path = os.path.join(self.out_dir, "step-0.json")
        if os.path.isfile(path):
            self.records.append(_read_json(path))
        else:
            topo = get_adapter(self.model).topology()
            base = {"step": 0, "removed": [], "depth": self.depth0, "depths": topo.shape()["depths"],
                    **self._stats(self.model, "eval input model")}
            base["top1_before_ft"] = base["top1"]
            io.atomic_write_json(path, base)
            self.records.append(base)
        _write_log(self.out_dir, self.records, self.settings)

    # ---------------------------------------------------------------- the run
    def run(self) -> nn.Module:
        from .adapters import get_adapter

        self._setup()
        self.model = self.model.to(self.device)
        self.current = self.model
        self.origin = [u.key for u in get_adapter(self.model).topology().units]
        self.records: list[dict[str, Any]] = []
        self._base()
        for k in range(1, self.config.steps + 1):
            self._step(k)
        return self._finish()

    def _selection(self, k: int, step_dir: str) -> dict[str, Any]:
        """Step k's scores and choice on the current model (``selection.json``, read back after a resume)."""
        from . import io
        from .adapters import get_adapter
        from .distill import model_fingerprint

        cfg, current = self.config, self.current
        t0 = time.time()
        fp = model_fingerprint(current)
        path = os.path.join(step_dir, SELECTION_FILE)
        if os.path.isfile(path):
            selection = _read_json(path)
            if selection.get("model") != fp:
                raise UpvitError(f"{path} was made for another model than the one this step prunes: delete "
                                 f"{step_dir} to redo the step")
            return selection
        cands = candidates(current, cfg.candidate_blocks, cfg.kinds)
        if not cands:
            raise UpvitError(f"no block of the current model ({get_adapter(current).topology().num_blocks} blocks) "
                             "can be removed: every stage keeps at least one block")
        scores = score_candidates(current, self.proxy, cands, cfg.criterion, batch_size=cfg.score_batch_size)
        chosen = select(current, cands, scores, cfg.per_step // cfg.candidate_blocks)
        name = dict(zip((u.key for u in get_adapter(current).topology().units), self.origin))
        table = [{**c.to_dict(), "origin": [name[u] for u in c.units], "score": float(s)}
                 for c, s in zip(cands, scores)]
        removed = [row for row in table if any(row["units"] == list(c.units) for c in chosen)]
        selection = {"model": fp, "criterion": cfg.criterion, "candidates": table, "removed": removed,
                     "scoring_seconds": round(time.time() - t0, 3)}
        io.atomic_write_json(path, selection)
        return selection

    def _step(self, k: int) -> None:
        """Score, remove, fine-tune, evaluate and record step k (or read it back if it finished earlier)."""
        from . import io
        from .adapters import get_adapter
        from .distill import finetune

        step_dir = os.path.join(self.out_dir, f"step-{k}")
        done_path = os.path.join(step_dir, STEP_FILE)
        if os.path.isfile(done_path):  # finished before an interruption: its model is on disk
            record = _read_json(done_path)
            self.records.append(record)
            self.origin = record["origin_units"]
            self.current = io.load(step_dir).to(self.device)
            _write_log(self.out_dir, self.records, self.settings)
            return
        t0 = time.time()
        os.makedirs(step_dir, exist_ok=True)
        selection = self._selection(k, step_dir)
        self._event("scored", k)
        removed_units = [u for row in selection["removed"] for u in row["units"]]
        student = remove_units(self.current, removed_units)
        new_origin = _renamed(self.current, removed_units, self.origin)
        before = None
        if self.val_data is not None:
            from .evaluation import evaluate

            before = evaluate(student, self.val_data, device=self.device, desc=f"eval step {k} before fine-tuning")
        t_ft = time.time()
        ft_record = None
        step_cfg = self.config.step_train_config
        if step_cfg is not None:
            resume_ft = os.path.isfile(os.path.join(step_dir, "checkpoint.pt"))
            ft_record = finetune(student, self.teacher, self.train_data, step_cfg, step_dir, alpha=self.config.alpha,
                                 temperature=self.config.temperature, resume=resume_ft, device=self.device,
                                 extra_config={"depth_step": k})
        else:
            io.save(student, step_dir)
        self._event("finetuned", k)
        self.current = io.load(step_dir).to(self.device)  # the saved model (the EMA, if any), also after a resume
        topo = get_adapter(self.current).topology()
        record = {"step": k, "criterion": self.config.criterion, "removed": selection["removed"],
                  "candidates": selection["candidates"], "depth": topo.num_blocks, "depths": topo.shape()["depths"],
                  "origin_units": new_origin,
                  "top1_before_ft": before["top1"] if before else None,
                  "val_loss_before_ft": before["loss"] if before else None,
                  **self._stats(self.current, f"eval step {k}"),
                  "finetune": {key: ft_record.get(key) for key in ("epoch", "train_loss", "train_ce", "train_kl")}
                  if ft_record else None,
                  "scoring_seconds": selection.get("scoring_seconds"),
                  "finetune_seconds": round(time.time() - t_ft, 1), "step_seconds": round(time.time() - t0, 1)}
        io.atomic_write_json(done_path, record)
        self.records.append(record)
        self.origin = new_origin
        _write_log(self.out_dir, self.records, self.settings)
        self._event("step", k)

    def _finish(self) -> nn.Module:
        """The final model directory in ``out_dir``, with the run's own provenance record."""
        from . import io

        cfg = self.config
        config = copy.deepcopy(self.current.upvit_config)
        # the run's own record (upvit.provenance); the steps' intermediate records are in log.jsonl and step-k/,
        # and the input model's record moves under "source"
        own = ("timm_equivalent_kwargs", "hf_spec")
        config.extra = {k: v for k, v in config.extra.items() if k in own}
        config.extra.update({k: v for k, v in self.meta.items() if k in ("command", "inputs")})
        config.extra["depth"] = {"criterion": cfg.criterion, "remove": cfg.remove, "steps": cfg.steps,
                                 "removed": [[row["origin"] for row in r["removed"]] for r in self.records[1:]],
                                 "origin_units": self.origin, "seconds": round(time.time() - self.t_start, 1)}
        config.extra["results"] = {k: v for k, v in self.records[-1].items()
                                   if k not in ("removed", "candidates", "origin_units", "finetune")}
        source = run_record(self.model.upvit_config.extra, keep=own)
        if source:
            config.extra["source"] = source
        io.save(self.current, self.out_dir, config)
        return io.load(self.out_dir)


def _write_log(out_dir: str, records: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """``log.jsonl`` (rewritten whole, so it matches the finished steps after a resume) and ``depth.md``."""
    from .io import atomic_write_bytes

    atomic_write_bytes(os.path.join(out_dir, LOG_FILE), "".join(json.dumps(r) + "\n" for r in records).encode())
    atomic_write_bytes(os.path.join(out_dir, TABLE_FILE), (markdown_table(records, settings) + "\n").encode())


def describe_removed(rows: list[dict[str, Any]]) -> str:
    """``hybrid ffn.2+attn.3`` / ``block attn.5+ffn.5`` in the original model's unit names."""
    return ", ".join(f"{r['kind']} {'+'.join(r['origin'])}" for r in rows) or "-"


def markdown_table(records: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> str:
    """One row per step: what was removed (original unit names), depth, accuracy before/after
    fine-tuning, parameters, MACs and throughput."""
    def pct(v):
        return "-" if v is None else f"{v:.2f}"

    lines = []
    if settings:
        cfg = settings.get("train_config") or {}
        lines += [f"criterion `{settings['criterion']}`, remove {settings['remove']} blocks-worth in "
                  f"{settings['steps']} step(s), candidates {'/'.join(settings['kinds'])}, fine-tuning "
                  f"{cfg.get('epochs', 0)} epoch(s) in all", ""]
    lines += ["| step | removed (original units) | depth | top-1 before FT | top-1 after FT | params (M) | MMACs "
              "| images/s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['step']} | {describe_removed(r['removed'])} | {r['depth']} | "
                     f"{pct(r.get('top1_before_ft'))} | "
                     f"{pct(r.get('top1'))} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e6:.1f} | "
                     f"{r['images_per_second']:.0f} |")
    return "\n".join(lines)


__all__ = ["CRITERIA", "Candidate", "DepthConfig", "candidates", "markdown_table", "prune_depth", "remove_units",
           "removal_plan", "run_depth", "score_candidates", "select"]
