"""The training loop shared by from-scratch training and distillation fine-tuning.

One loop for both: the criterion is a callable ``criterion(logits, images, labels) -> (loss, parts)``,
so distillation is a criterion that holds the teacher (the DeiT habit) and the loop never branches.

The loop is deterministic given the seed: data order comes from a sampler seeded by (seed, epoch),
augmentation from the dataset's (seed, epoch, index) generator, the learning rate from the global
step. A checkpoint is written atomically after every epoch; ``resume=True`` continues from it and
ends with exactly the weights an uninterrupted run would have.
Runs under ``torchrun`` with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from . import distributed as dist_utils
from .adapters.base import batch_len, batch_to
from .errors import UpvitError
from .evaluation import evaluate, model_output
from .fingerprint import digest
from .io import atomic_write_bytes, save
from .progress import progress
from .provenance import derive

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"

JSON_LINES = False  # print each epoch's record as a JSON line (``--json``) instead of a readable line


def epoch_line(record: dict[str, Any], epochs: int, elapsed: float, epochs_run: int) -> str:
    """One readable line per finished epoch: ``epoch 3/30  loss 0.8421 (ce 0.61, kl 0.23)  val top-1 91.75%
    (loss 0.3288)  lr 2.68e-05  12.3 s/epoch  elapsed 37 s, ETA 5.5 min``. ``elapsed``: seconds since this
    process started training, over ``epochs_run`` epochs (a resumed run times its own epochs only)."""
    from .progress import format_seconds

    parts = [f"epoch {record['epoch']}/{epochs}"]
    loss = record.get("train_loss")
    if loss is not None:
        terms = [f"{k[len('train_'):]} {v:.4g}" for k, v in record.items()
                 if k.startswith("train_") and k != "train_loss" and isinstance(v, float)]
        if len(terms) == 1:  # the loss is that one term
            terms = []
        parts.append(f"loss {loss:.4f}" + (f" ({', '.join(terms)})" if terms else ""))
    if "val_perplexity" in record:
        parts.append(f"val perplexity {record['val_perplexity']:.3f}")
    elif record.get("val_top1") is not None:
        parts.append(f"val top-1 {record['val_top1']:.2f}% (loss {record['val_loss']:.4f})")
    parts.append(f"lr {record['lr']:.2e}")
    per_epoch = elapsed / max(1, epochs_run)
    parts.append(f"{per_epoch:.1f} s/epoch")
    left = epochs - record["epoch"]
    parts.append(f"elapsed {format_seconds(elapsed)}"
                 + (f", ETA {format_seconds(left * per_epoch)}" if left else ", done"))
    return "  ".join(parts)


Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    """Optimisation settings. ``batch_size`` is the global batch, split over ranks.

    ``weight_decay`` defaults to 1e-3, the fine-tuning recipe (docs/method.md section 4) and the default of
    ``upvit train``, ``finetune`` and ``depth``; the teacher recipes in the Makefile pass 0.05."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-3
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    grad_clip: float | None = None
    seed: int = 0
    num_workers: int = 0
    amp: str = "auto"  # auto: bfloat16 autocast on CUDA, off on CPU; "off" / "bf16" force it
    max_steps_per_epoch: int | None = None  # cut epochs short (tests, smoke runs)
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UpvitError("epochs and batch size must be at least 1")
        if self.lr <= 0:
            raise UpvitError("the learning rate must be positive")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UpvitError("--ema-decay must lie strictly between 0 and 1 (e.g. 0.999)")
        if self.amp not in ("auto", "off", "bf16"):
            raise UpvitError("--amp must be auto, off or bf16")


class CrossEntropy:
    """Plain (optionally label-smoothed) cross-entropy in the criterion contract."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, logits, images, labels):
        if logits.dim() == 3:  # a language model: one prediction per position, -100 = no target
            logits, labels = logits.flatten(0, 1), labels.flatten()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, ignore_index=-100)
        return loss, {"ce": loss.item()}


def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0, then cosine from ``lr`` down to ``min_lr``."""
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress_)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and whatever the model's own ``no_weight_decay()`` names
    (tokens, position embeddings, relative-position bias tables)."""
    named = getattr(model, "no_weight_decay", None)
    exempt = set(named()) if callable(named) else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name in exempt
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fingerprint(cfg: TrainConfig, model: nn.Module, dataset_len: int, criterion: Any = None) -> str:
    """Identifies a run: settings, model shape, data size and the criterion's ``describe()`` if it has one."""
    shape = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    describe = getattr(criterion, "describe", None)
    blob = json.dumps([asdict(cfg), shape, dataset_len, describe() if callable(describe) else None],
                      sort_keys=True, default=str)
    return digest([blob]).hexdigest()[:16]


def _mean_over_ranks(sums: dict[str, float]) -> dict[str, float]:
    """Average per-rank loss sums over ranks, so the log describes the global batch (equal shards)."""
    if not dist_utils.is_distributed():
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist_utils.all_reduce_sum(t)
    return {k: v / dist_utils.world_size() for k, v in zip(keys, t.tolist())}


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def fit(
    model: nn.Module,
    train_data: Dataset,
    cfg: TrainConfig,
    out_dir: str,
    criterion: Criterion | None = None,
    val_data: Dataset | None = None,
    resume: bool = False,
    device: torch.device | str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place; write checkpoints, a JSON-lines log and the final model directory.

    The directory's ``config.json`` records the run (:mod:`upvit.provenance`): ``extra_config`` (the
    caller's command and inputs), ``training`` (``cfg``), ``results`` (the last epoch's record) and, under
    ``source``, the record the model carried before. Returns the last epoch's log record.
    ``model.upvit_config`` (see :mod:`upvit.models`) must be set so the result can be saved as a model
    directory.
    """
    distributed = dist_utils.init_if_needed()
    device = torch.device(device) if device is not None else dist_utils.default_device()
    world, rank = dist_utils.world_size(), dist_utils.rank()
    if cfg.batch_size % world:
        raise UpvitError(f"batch size {cfg.batch_size} does not split over {world} processes: "
                         f"use a multiple of {world}")
    criterion = criterion or CrossEntropy(cfg.label_smoothing)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay else None
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sampler = DistributedSampler(train_data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    # Workers are not persistent: each epoch's workers copy the dataset after set_epoch, so seeded
    # augmentation follows the epoch (persistent workers would keep epoch 0's copy forever).
    loader = DataLoader(train_data, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, persistent_workers=False)
    if len(loader) == 0:
        raise UpvitError(f"the training set ({len(train_data)} images) is smaller than one batch ({cfg.batch_size})")
    steps_per_epoch = min(len(loader), cfg.max_steps_per_epoch or len(loader))
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    device_ids = [device.index] if device.type == "cuda" else None
    train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids) if distributed else model

    os.makedirs(out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(out_dir, CHECKPOINT_FILE), os.path.join(out_dir, LOG_FILE)
    fingerprint = _fingerprint(cfg, model, len(train_data), criterion)
    start_epoch, step, history = 0, 0, []
    if resume:
        if not os.path.isfile(ckpt_path):
            raise UpvitError(f"--resume: no {CHECKPOINT_FILE} in {out_dir}; start without --resume")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise UpvitError(f"--resume: the checkpoint in {out_dir} was made with other settings, model or data; "
                             "use the original command or a new --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
    elif os.path.isfile(ckpt_path):
        raise UpvitError(f"{out_dir} already holds a training checkpoint: "
                         "add --resume to continue it or choose a new --out")

    record: dict[str, Any] = history[-1] if history else {}
    t_run = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        train_model.train()
        t0, sums, seen = time.time(), {}, 0
        bar = progress(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        # islice, not a break: a break would first load (and decode) one batch the epoch never uses
        for i, (images, labels) in enumerate(itertools.islice(loader, steps_per_epoch)):
            images, labels = batch_to(images, device), torch.as_tensor(labels).to(device)  # images or a token dict
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model_output(train_model, images)
            loss, parts = criterion(logits.float(), images, labels)
            if not torch.isfinite(loss):
                raise UpvitError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step}: "
                                 "lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if ema is not None:
                with torch.no_grad():
                    done = set()  # tied weights (an LM head tied to the embeddings) appear twice: update once
                    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                        if e.data_ptr() in done:
                            continue
                        done.add(e.data_ptr())
                        if e.is_floating_point():
                            e.copy_(e * cfg.ema_decay + p.detach() * (1 - cfg.ema_decay))
                        else:  # integer buffers (counters) are copied, not averaged
                            e.copy_(p)
            step += 1
            seen += batch_len(images)
            parts = {"loss": loss.item(), **parts}
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            bar.update(1)
        bar.close()
        sums = _mean_over_ranks(sums)
        rate_key = "sequences_per_second" if isinstance(images, dict) else "images_per_second"  # text: token blocks
        record = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                  **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()},
                  "epoch_seconds": round(time.time() - t0, 2), rate_key: round(seen * world / (time.time() - t0), 1)}
        if val_data is not None:
            metrics = evaluate(ema if ema is not None else model, val_data, batch_size=cfg.eval_batch_size,
                               device=device)
            record.update({"val_top1": metrics["top1"], "val_loss": metrics["loss"]})
            if "perplexity" in metrics:
                record["val_perplexity"] = metrics["perplexity"]
        history.append(record)
        if dist_utils.is_main():
            _save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch, "step": step, "history": history, "fingerprint": fingerprint,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            })
            with open(log_path, "w") as f:  # rewritten whole: consistent with the checkpoint after a resume
                f.writelines(json.dumps(r) + "\n" for r in history)
            print(json.dumps(record) if JSON_LINES else epoch_line(record, cfg.epochs, time.time() - t_run,
                                                                  epoch + 1 - start_epoch), flush=True)
        dist_utils.barrier()

    if dist_utils.is_main():
        final = ema if ema is not None else model
        config = copy.deepcopy(model.upvit_config)
        config.extra = derive(config.extra)  # the record of the model trained moves under "source"
        config.extra.update(extra_config or {})
        config.extra["training"] = {**asdict(cfg), "world_size": world}
        config.extra["results"] = record  # the last epoch's log record: what this run measured
        save(final, out_dir, config)
    dist_utils.barrier()
    return record
