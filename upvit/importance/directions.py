"""The class directions of the KL's second-order term, shared by the Fisher and local estimates.

For an output distribution q = softmax(z), the expected squared change of log p(y) under y ~ q is
(dz)^T (diag q - q q^T) (dz). :func:`class_directions` writes that covariance as a weighted sum of
rank-one terms, so one backward pass per term gives it exactly (or a seeded Monte-Carlo sample of
classes gives an unbiased estimate when there are too many classes).
"""
from __future__ import annotations

import torch


def class_directions(logits: torch.Tensor, classes: str, max_exact_classes: int, rank: int | None,
                     num_samples: int, generator: torch.Generator
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], str, float, float]:
    """Directions v_j ([B, K] each) and weights w_j with E_{y~q}[(d log p(y))^2] = sum_j w_j (v_j . dz)^2
    for every image (w_j None means 1), the class mode used, and the captured/total covariance trace.

    "exact": the eigen-components sqrt(lambda) u of diag(q) - q q^T (the zero one, along 1, skipped;
    the ``rank`` largest if given). "sample": one-hot(y) - q for classes y drawn from q (seeded)."""
    logp = torch.log_softmax(logits.detach(), dim=-1)
    q = logp.exp().to(torch.float64)
    num_classes = logp.shape[-1]
    mode = ("exact" if num_classes <= max_exact_classes else "sample") if classes == "auto" else classes
    dtype, device = logits.dtype, logits.device
    if mode == "exact":
        lam, vec = torch.linalg.eigh(torch.diag_embed(q) - q.unsqueeze(2) * q.unsqueeze(1))
        lam, vec = lam.flip(-1).clamp_min(0), vec.flip(-1)  # largest first
        r = num_classes - 1 if rank is None else min(rank, num_classes - 1)
        picks = [(vec[:, :, j] * lam[:, j:j + 1].sqrt()).to(dtype) for j in range(r)]
        return picks, [None] * r, mode, float(lam[:, :r].sum()), float(lam.sum())
    picks, weights = [], []
    for ys, w in sampled_picks(q.cpu(), num_samples, generator, device):
        picks.append(torch.nn.functional.one_hot(ys, num_classes).to(dtype) - logp.exp())  # d log p(y) = d z_y - q . dz
        weights.append(w)
    return picks, weights, mode, 0.0, 0.0


def sampled_picks(q: torch.Tensor, num_samples: int, generator: torch.Generator,
                   device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Draw ``num_samples`` classes per image from q and fold repeats into weights: slot j holds each
    image's j-th distinct drawn class with weight count/num_samples (0 where an image has fewer),
    so the number of backward passes is the largest number of distinct classes drawn for an image."""
    drawn = torch.multinomial(q.to(torch.float64), num_samples, replacement=True, generator=generator)
    counts = torch.zeros_like(q, dtype=torch.float64).scatter_add_(1, drawn,
                                                                   torch.ones_like(drawn, dtype=torch.float64))
    order = counts.argsort(dim=1, descending=True, stable=True)
    slots = int((counts > 0).sum(1).max())
    picks = []
    for j in range(slots):
        ys = order[:, j]
        weight = counts.gather(1, ys.view(-1, 1)).view(-1) / num_samples
        picks.append((ys.to(device), weight.to(device)))
    return picks
