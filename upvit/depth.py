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
        raise UpvitError(f"{type(adapter.model).__name__} cannot be rebuilt with fewer blocks yet: depth pruning covers timm "
                         "ViT/DeiT, Swin and PVTv2")
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
    ``val_data`` and benchmark.

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
    from . import io
    from .adapters import get_adapter
    from .distill import check_teacher, finetune, model_fingerprint
    from .distributed import default_device, env_world_size
    from .importance.api import proxy_tensor

    t_start = time.time()
    if env_world_size() > 1:
        raise UpvitError("depth pruning runs in one process: start it without torchrun")
    if criterion not in CRITERIA:
        raise UpvitError(f"unknown depth criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    kinds = ("block",) if criterion == "last" else tuple(kinds)
    for name, value in (("remove", remove), ("steps", steps), ("candidate_blocks", candidate_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UpvitError(f"{name} must be a positive integer, got {value!r}")
    if remove % steps:
        raise UpvitError(f"--remove {remove} blocks-worth does not split into {steps} equal steps: choose --steps "
                         f"among {', '.join(str(k) for k in range(1, remove + 1) if remove % k == 0)}")
    per_step = remove // steps
    if per_step % candidate_blocks:
        raise UpvitError(f"each step removes {per_step} blocks-worth, not a multiple of the candidates' "
                         f"{candidate_blocks} blocks: change --steps or --candidate-blocks")
    if train_config is not None and train_config.epochs % steps:
        raise UpvitError(f"{train_config.epochs} fine-tuning epochs do not split into {steps} equal steps: give a "
                         f"multiple of {steps}")
    adapter = get_adapter(model)
    depth0 = adapter.topology().num_blocks
    if remove >= depth0:
        raise UpvitError(f"the model has {depth0} blocks: remove fewer than {depth0}")
    check_teacher(model, teacher)
    device = torch.device(device) if device is not None else default_device()
    proxy = proxy if isinstance(proxy, dict) else proxy_tensor(proxy, adapter.input_size())
    step_cfg = dataclasses.replace(train_config, epochs=train_config.epochs // steps) if train_config else None

    settings = {"remove": remove, "steps": steps, "criterion": criterion, "kinds": list(kinds),
                "candidate_blocks": candidate_blocks, "alpha": alpha, "temperature": temperature,
                "score_batch_size": score_batch_size,
                "train_config": dataclasses.asdict(train_config) if train_config is not None else None,
                "model": model_fingerprint(model), "teacher": model_fingerprint(teacher),
                "proxy": _fingerprint_tensor(proxy) if isinstance(proxy, torch.Tensor) else
                {k: _fingerprint_tensor(v) for k, v in sorted(proxy.items())},
                "train_size": len(train_data) if train_data is not None else None}
    run_path = os.path.join(out_dir, RUN_FILE)
    if resume:
        if not os.path.isfile(run_path):
            raise UpvitError(f"--resume: {out_dir} holds no depth-pruning run ({RUN_FILE}); start without --resume")
        recorded = _read_json(run_path)
        if recorded.get("settings") != settings:
            diff = next((k for k in settings if recorded.get("settings", {}).get(k) != settings[k]), "format")
            raise UpvitError(f"--resume: the run in {out_dir} was made with another {diff} (model, teacher, proxy "
                             "and settings must be the same); use the original command or a new --out")
    else:
        if os.path.isfile(run_path):
            raise UpvitError(f"{out_dir} already holds a depth-pruning run: add --resume to continue it or choose "
                             "a new --out")
        io.atomic_write_json(run_path, {"format": RUN_FORMAT, "version": 1, "settings": settings,
                                        "meta": dict(meta or {})})

    def event(name: str, k: int) -> None:
        if callback is not None:
            callback(name, k)

    model = model.to(device)
    current = model
    origin = [u.key for u in adapter.topology().units]
    records = []
    base_path = os.path.join(out_dir, "step-0.json")
    if os.path.isfile(base_path):
        records.append(_read_json(base_path))
    else:
        base = {"step": 0, "removed": [], "depth": depth0, "depths": adapter.topology().shape()["depths"],
                **_stats(model, val_data, device, bench_batch, bench_runs, "eval input model")}
        base["top1_before_ft"] = base["top1"]
        io.atomic_write_json(base_path, base)
        records.append(base)
    _write_log(out_dir, records, settings)

    for k in range(1, steps + 1):
        step_dir = os.path.join(out_dir, f"step-{k}")
        done_path = os.path.join(step_dir, STEP_FILE)
        if os.path.isfile(done_path):  # finished before an interruption: its model is on disk
            record = _read_json(done_path)
            records.append(record)
            origin = record["origin_units"]
            current = io.load(step_dir).to(device)
            _write_log(out_dir, records, settings)
            continue
        t0 = time.time()
        os.makedirs(step_dir, exist_ok=True)
        fp = model_fingerprint(current)
        sel_path = os.path.join(step_dir, SELECTION_FILE)
        if os.path.isfile(sel_path):
            selection = _read_json(sel_path)
            if selection.get("model") != fp:
                raise UpvitError(f"{sel_path} was made for another model than the one this step prunes: delete "
                                 f"{step_dir} to redo the step")
        else:
            cands = candidates(current, candidate_blocks, kinds)
            if not cands:
                raise UpvitError(f"no block of the current model ({get_adapter(current).topology().num_blocks} blocks) "
                                 "can be removed: every stage keeps at least one block")
            scores = score_candidates(current, proxy, cands, criterion, batch_size=score_batch_size)
            chosen = select(current, cands, scores, per_step // candidate_blocks)
            name = dict(zip((u.key for u in get_adapter(current).topology().units), origin))
            table = [{**c.to_dict(), "origin": [name[u] for u in c.units], "score": float(s)}
                     for c, s in zip(cands, scores)]
            removed = [row for row in table if any(row["units"] == list(c.units) for c in chosen)]
            selection = {"model": fp, "criterion": criterion, "candidates": table, "removed": removed,
                         "scoring_seconds": round(time.time() - t0, 3)}
            io.atomic_write_json(sel_path, selection)
        event("scored", k)
        removed_units = [u for row in selection["removed"] for u in row["units"]]
        student = remove_units(current, removed_units)
        new_origin = _renamed(current, removed_units, origin)
        before = None
        if val_data is not None:
            from .evaluation import evaluate

            before = evaluate(student, val_data, device=device, desc=f"eval step {k} before fine-tuning")
        t_ft = time.time()
        ft_record = None
        if step_cfg is not None:
            resume_ft = os.path.isfile(os.path.join(step_dir, "checkpoint.pt"))
            ft_record = finetune(student, teacher, train_data, step_cfg, step_dir, alpha=alpha,
                                 temperature=temperature, resume=resume_ft, device=device,
                                 extra_config={"depth_step": k})
        else:
            io.save(student, step_dir)
        event("finetuned", k)
        current = io.load(step_dir).to(device)  # the saved model (the EMA, if any), also after a resume
        topo = get_adapter(current).topology()
        record = {"step": k, "criterion": criterion, "removed": selection["removed"],
                  "candidates": selection["candidates"], "depth": topo.num_blocks, "depths": topo.shape()["depths"],
                  "origin_units": new_origin,
                  "top1_before_ft": before["top1"] if before else None,
                  "val_loss_before_ft": before["loss"] if before else None,
                  **_stats(current, val_data, device, bench_batch, bench_runs, f"eval step {k}"),
                  "finetune": {key: ft_record.get(key) for key in ("epoch", "train_loss", "train_ce", "train_kl")}
                  if ft_record else None,
                  "scoring_seconds": selection.get("scoring_seconds"),
                  "finetune_seconds": round(time.time() - t_ft, 1), "step_seconds": round(time.time() - t0, 1)}
        io.atomic_write_json(done_path, record)
        records.append(record)
        origin = new_origin
        _write_log(out_dir, records, settings)
        event("step", k)

    config = copy.deepcopy(current.upvit_config)
    # the run's own record (upvit.provenance); the steps' intermediate records are in log.jsonl and step-k/,
    # and the input model's record moves under "source"
    own = ("timm_equivalent_kwargs", "hf_spec")
    config.extra = {k: v for k, v in config.extra.items() if k in own}
    config.extra.update({k: v for k, v in (meta or {}).items() if k in ("command", "inputs")})
    config.extra["depth"] = {"criterion": criterion, "remove": remove, "steps": steps,
                             "removed": [[row["origin"] for row in r["removed"]] for r in records[1:]],
                             "origin_units": origin, "seconds": round(time.time() - t_start, 1)}
    config.extra["results"] = {k: v for k, v in records[-1].items()
                               if k not in ("removed", "candidates", "origin_units", "finetune")}
    source = run_record(model.upvit_config.extra, keep=own)
    if source:
        config.extra["source"] = source
    io.save(current, out_dir, config)
    return io.load(out_dir)


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
    lines += ["| step | removed (original units) | depth | top-1 before FT | top-1 after FT | params (M) | MMACs | images/s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['step']} | {describe_removed(r['removed'])} | {r['depth']} | {pct(r.get('top1_before_ft'))} | "
                     f"{pct(r.get('top1'))} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e6:.1f} | "
                     f"{r['images_per_second']:.0f} |")
    return "\n".join(lines)


__all__ = ["CRITERIA", "Candidate", "candidates", "markdown_table", "prune_depth", "remove_units", "removal_plan",
           "score_candidates", "select"]
