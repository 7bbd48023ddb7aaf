"""Top-1 accuracy and cross-entropy of a classifier on a dataset."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from . import distributed as dist_utils
from .data import collate_readable
from .progress import progress


def logits_of(output) -> torch.Tensor:
    """A model's logits: distilled DeiTs return (cls, dist) pairs in training mode."""
    if isinstance(output, (tuple, list)):
        return (output[0] + output[1]) / 2
    return output


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str | None = None,
             num_workers: int = 0, desc: str = "eval") -> dict[str, float]:
    """``{"top1": %, "loss": mean CE, "n": images}``; sharded over ranks when distributed."""
    device = torch.device(device) if device is not None else dist_utils.default_device()
    was_training = model.training
    model.eval().to(device)
    sampler = DistributedSampler(dataset, shuffle=False) if dist_utils.is_distributed() else None
    # collate_readable leaves out images an ImageFolder could not read (--skip-bad-images)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_readable)
    totals = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, count
    for batch in progress(loader, desc=desc, leave=False):
        if batch is None:
            continue
        images, labels = batch
        images, labels = images.to(device), torch.as_tensor(labels).to(device)
        logits = logits_of(model(images)).float()
        if not torch.isfinite(logits).all():
            from .errors import UpvitError

            raise UpvitError("the model produced NaN/inf logits: its weights are damaged or diverged")
        totals[0] += (logits.argmax(-1) == labels).sum().item()
        totals[1] += F.cross_entropy(logits, labels, reduction="sum").item()
        totals[2] += labels.numel()
    dist_utils.all_reduce_sum(totals)
    model.train(was_training)
    n = max(totals[2].item(), 1)
    return {"top1": 100.0 * totals[0].item() / n, "loss": totals[1].item() / n, "n": int(totals[2].item())}
