"""Top-1 accuracy and cross-entropy of a classifier on a dataset; per-token for a language model.

Inputs are an image tensor or a dict of per-sample tensors (text); a model's output may be a
tensor, a (cls, dist) pair or a Hugging Face ``ModelOutput`` (:func:`model_output` reduces all of
them to logits, or to the pooled sentence embedding of a bare text encoder). For a language model
(logits ``[B, T, V]``, labels ``[B, T]`` with -100 where there is no target) the metrics are over
target tokens: ``top1`` is next-token accuracy, ``loss`` the mean cross-entropy per token and
``perplexity`` its exponential.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from . import distributed as dist_utils
from .data import collate_readable
from .progress import progress

# what a model's forward returns, reduced to logits (tasks.py, below the data modules); importable from here
from .tasks import logits_of, mean_pooled, model_output  # noqa: F401


def _to(inputs, device):
    return {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str | None = None,
             num_workers: int = 0, desc: str = "eval") -> dict[str, float]:
    """``{"top1": %, "loss": mean CE, "n": images}``; sharded over ranks when distributed. For a
    language model ``n`` counts target tokens and ``perplexity`` = exp(loss) is added."""
    device = torch.device(device) if device is not None else dist_utils.default_device()
    was_training = model.training
    model.eval().to(device)
    sampler = DistributedSampler(dataset, shuffle=False) if dist_utils.is_distributed() else None
    # collate_readable leaves out images an ImageFolder could not read (--skip-bad-images)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_readable)
    totals = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, count
    per_token = False
    for batch in progress(loader, desc=desc, leave=False):
        if batch is None:
            continue
        images, labels = batch
        images, labels = _to(images, device), torch.as_tensor(labels).to(device)
        logits = model_output(model, images).float()
        if not torch.isfinite(logits).all():
            from .errors import UpvitError

            raise UpvitError("the model produced NaN/inf logits: its weights are damaged or diverged")
        if logits.dim() == 2 and labels.dim() == 2:
            from .errors import UpvitError

            raise UpvitError("this model returns sentence embeddings, which have no accuracy: compare it with its "
                             "teacher (upvit eval MODEL --teacher T, or upvit.text.embedding_agreement)")
        if logits.dim() == 3:  # [B, T, V]: one prediction per position, -100 where there is no target
            per_token = True
            logits, labels = logits.flatten(0, 1), labels.flatten()
            keep = labels != -100
            logits, labels = logits[keep], labels[keep]
        totals[0] += (logits.argmax(-1) == labels).sum().item()
        totals[1] += F.cross_entropy(logits, labels, reduction="sum").item()
        totals[2] += labels.numel()
    dist_utils.all_reduce_sum(totals)
    model.train(was_training)
    n = max(totals[2].item(), 1)
    metrics = {"top1": 100.0 * totals[0].item() / n, "loss": totals[1].item() / n, "n": int(totals[2].item())}
    if per_token:
        metrics["perplexity"] = math.exp(metrics["loss"])
    return metrics
