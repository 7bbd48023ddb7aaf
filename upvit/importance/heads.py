"""Whole-head scores: the exact divergence of removing one whole attention head (all its dims at once).

The paper merges heads (each new head takes the best dims of h_b/h_t consecutive original heads), so a
merged head's attention pattern never existed in the original. The alternative ``heads="whole"`` of
:func:`upvit.plan.make_plan` keeps h_t *whole* original heads per block; this module scores them the
paper's way, by the divergence of the original and the model with that head removed (its q, k and v
dims zeroed: the head then adds nothing), summed over the proxy set. One candidate per head, so the
cost is a few forwards per block, far below the per-channel scores.

>>> scores = head_scores(model, proxy_images)      # doctest: +SKIP
>>> scores["attn.0"]                                # one value per head of block 0   # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters.base import Inputs, Masks
from ..progress import job
from .reference import Reference


def head_masks(size: int, heads: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    """Keep-masks ``[heads * rows, size]``: row block h removes every dim of head h."""
    hd = size // heads
    m = torch.ones(heads, size, dtype=like.dtype, device=like.device)
    for h in range(heads):
        m[h, h * hd:(h + 1) * hd] = 0
    return m.repeat_interleave(rows, dim=0)


@torch.no_grad()
def head_scores(model: nn.Module, proxy: Inputs, batch_size: int = 32,
                progress: bool = False) -> dict[str, torch.Tensor]:
    """Per attention site, ``[heads]`` float64: the divergence of removing each whole head (the adapter's
    divergence: KL for classifiers and language models, 1 - cos for sentence encoders)."""
    from ..adapters import get_adapter
    from .api import proxy_tensor

    adapter = get_adapter(model)
    inputs = proxy if isinstance(proxy, dict) else proxy_tensor(proxy, adapter.input_size())
    ref = Reference(adapter, inputs, batch_size=batch_size)
    topo = ref.topology
    sites = [s for s in topo.sites if s.kind == "attn"]
    by_start: dict[int, list] = {}
    for s in sites:
        by_start.setdefault(topo.start_unit(s.key), []).append(s)
    out: dict[str, torch.Tensor] = {}
    was = model.training
    model.eval()
    try:
        with job("whole-head scores", unit="site", show=progress) as bar:
            bar.extend(len(sites))
            bar.begin()
            for i, streams in ref.walk():
                for site in by_start.get(i, []):
                    acc = torch.zeros(site.heads, dtype=torch.float64)
                    for n in range(len(ref.batches)):
                        like = torch.empty(0, dtype=ref.dtype, device=ref.device)
                        mask = head_masks(site.size, site.heads, ref.rows(n), like)
                        with adapter.masking(Masks({site.key: mask})):
                            logits = ref.run(n, i, site.heads, streams)
                        acc += ref.divergence(n, logits).cpu()
                    out[site.key] = acc
                    bar.update(1)
    finally:
        model.train(was)
    return out


__all__ = ["head_masks", "head_scores"]
