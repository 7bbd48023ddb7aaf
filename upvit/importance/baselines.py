"""Baseline scorers the paper's criterion is compared against: weight magnitude and random.

* ``magnitude``: the L2 norm of all weights a channel carries, as listed by the adapter's
  ``channel_weights(site_key)`` (for timm ViTs: residual channel c = every tensor slice at index c
  of the residual width; attention dim d = q, k, v rows d with their biases and proj column d; FFN
  unit j = fc1 row j with its bias and fc2 column j). No data is used.
* ``random``: i.i.d. uniform [0, 1) scores from a ``torch.Generator`` seeded with ``seed``, drawn
  site by site in the topology's site order (res.0, attn.0, ffn.0, attn.1, ...), float64.

Both ignore the proxy images; they share the scorer contract ``fn(adapter, images, **options)``:
``batch_size`` and ``device`` are accepted and unused (no forward pass), other keyword arguments
are recorded in the metadata (e.g. the proxy set's description), as the other scorers do.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import UpvitError
from .api import register_method
from .scores import Scores


def _scores_from(adapter, per_site: dict[str, torch.Tensor], meta: dict) -> Scores:
    return Scores.from_sites(adapter.topology(), per_site, {**meta, "model": adapter.describe()})


def channel_l2_norm(weights: list[tuple[torch.Tensor, int]], size: int) -> torch.Tensor:
    """sqrt of the sum of squares, per index along each tensor's ``dim``, over all tensors (float64)."""
    total = torch.zeros(size, dtype=torch.float64)
    for t, dim in weights:
        t = t.detach().to(torch.float64).cpu().movedim(dim, 0)
        if t.shape[0] != size:
            raise UpvitError(f"a weight listed for a site of {size} channels has {t.shape[0]} along its channel axis")
        total += t.reshape(size, -1).pow(2).sum(1)
    return total.sqrt()


@register_method("magnitude")
def magnitude_scores(adapter, images: torch.Tensor | None = None, batch_size: int | None = None,
                     device: str | None = None, **meta: Any) -> Scores:
    """L2 norm of the weights carried by each channel (the images are not used)."""
    per_site = {site.key: channel_l2_norm(adapter.channel_weights(site.key), site.size)
                for site in adapter.topology().sites}
    return _scores_from(adapter, per_site, {**meta, "criterion": "magnitude", "norm": "l2"})


@register_method("random")
def random_scores(adapter, images: torch.Tensor | None = None, seed: int = 0, batch_size: int | None = None,
                  device: str | None = None, **meta: Any) -> Scores:
    """Seeded uniform random scores (the images are not used)."""
    g = torch.Generator().manual_seed(int(seed))
    per_site = {site.key: torch.rand(site.size, generator=g, dtype=torch.float64) for site in adapter.topology().sites}
    return _scores_from(adapter, per_site, {**meta, "criterion": "random", "seed": int(seed)})
