"""Importance of removable groups of units (depth pruning): the paper's KL, and Block Influence.

A *candidate* is a group of unit keys removed together: a block ``("attn.i", "ffn.i")`` or a hybrid
block ``("ffn.i", "attn.i+1")`` (docs/method.md section 3; :func:`upvit.depth.candidates` lists
them). Its exact score is the same criterion as a channel's (docs/method.md section 2):

    s = sum over proxy inputs and their output events of KL(q || p)

with q the softmax of the model's logits and p the softmax of the logits with the candidate's units
skipped (their residual branches add nothing; a stage transition that starts a skipped unit still
runs). Higher = more important. It reuses the exact engine's pieces: the reference
log-probabilities are computed once per proxy batch, the stream is cached unit by unit so every
candidate runs only from its first unit (:func:`~upvit.adapters.base.forward_from`), and the KL is
accumulated in float64 (the adapter's divergence through :class:`upvit.importance.reference.Reference`).

:func:`block_influence` is the cheap criterion of ShortGPT (Men et al., 2024), "Block Influence":
``1 - cos(input, output)`` of the candidate, averaged over proxy inputs and token positions, where the
input is the stream the candidate's branches add to and the output is the stream after them (a block
that barely changes its input is deemed unimportant). It needs no reference outputs.

>>> from upvit.adapters import get_adapter                                     # doctest: +SKIP
>>> unit_scores(get_adapter(model), images, [("attn.3", "ffn.3"), ("ffn.3", "attn.4")])  # doctest: +SKIP
tensor([0.8123, 0.2210], dtype=torch.float64)
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..adapters.base import Adapter, Inputs, Stream, batch_len, batch_slice, batch_to
from ..errors import UpvitError
from ..progress import Scaled, job, note, running
from ..topology import Topology
from .reference import Reference, check_proxy, samples_word


def _prepare(adapter: Adapter, inputs: Inputs, candidates: Sequence[Sequence[str]],
             batch_size: int) -> tuple[Topology, list[tuple[int, int]], list[tuple[int, int, frozenset[str]]], Inputs]:
    """Checked inputs, proxy batches and, per candidate, (first unit index, last unit index, units)."""
    check_proxy(inputs)
    if batch_size < 1:
        raise UpvitError("batch_size must be at least 1")
    if not candidates:
        raise UpvitError("no candidates to score: give at least one group of units")
    topo = adapter.topology()
    spans = []
    for units in candidates:
        if isinstance(units, str) or not units:
            raise UpvitError(f"a candidate must be a non-empty list of unit keys, got {units!r}")
        idx = [topo.unit_index(u) for u in units]
        spans.append((min(idx), max(idx), frozenset(units)))
    param = next(adapter.model.parameters())
    inputs = batch_to(inputs, param.device, param.dtype)
    n = batch_len(inputs)
    return topo, [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)], spans, inputs


def unit_scores(adapter: Adapter, inputs: Inputs, candidates: Sequence[Sequence[str]],
                batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """``[C]`` float64: summed KL(model || model without candidate c's units) over the proxy inputs
    (for a sentence encoder the adapter's divergence, ``1 - cos``, as in the channel scores).

    ``inputs``: proxy images ``[N, C, H, W]`` (evaluation transform) or a dict of per-sample tensors;
    ``candidates``: groups of unit keys (see the module docstring). The model is run in eval mode.
    ``progress``: a first line with the plan and one bar (with ETA)."""
    topo, batches, spans, inputs = _prepare(adapter, inputs, candidates, batch_size)
    U, n = len(topo.units), batch_len(inputs)
    cost = [max(1, U - start) / U for start, _, _ in spans]  # forward passes of the model per input
    if not running():
        note(f"exact KL of {len(spans)} removal candidates x {n:,} proxy {samples_word(inputs)}", progress)
    with job("depth KL", n * (1 + sum(cost)), unit="img-fwd", show=progress) as bar:
        return _unit_kl(adapter, topo, batches, spans, inputs, cost, bar)


def _unit_kl(adapter: Adapter, topo: Topology, batches: list[tuple[int, int]],
             spans: list[tuple[int, int, frozenset[str]]], inputs: Inputs, cost: list[float], bar: Any) -> torch.Tensor:
    by_start: dict[int, list[int]] = {}
    for c, (start, _, _) in enumerate(spans):
        by_start.setdefault(start, []).append(c)
    total = torch.zeros(len(spans), dtype=torch.float64)
    model = adapter.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = Reference(adapter, inputs, batches=batches)  # the original's outputs, once
            bar.update(sum(e - s for s, e in batches))
            last = max(by_start)
            for i, streams in ref.walk():  # the stream cache, advanced unit by unit
                for c in by_start.get(i, []):
                    with adapter.masking(None, skip=spans[c][2]):
                        for n, (s, e) in enumerate(ref.batches):
                            total[c] += ref.divergence(n, ref.run(n, i, 1, streams))[0].cpu()
                            bar.detail("+".join(sorted(spans[c][2])))
                            bar.update((e - s) * cost[c])
                if i >= last:
                    break
    finally:
        model.train(was_training)
    return total


def _cosine_mean(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over samples and positions of cos(a, b) along the channel axis, and the count."""
    a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return cos.sum(), cos.numel()


def block_influence(adapter: Adapter, inputs: Inputs, candidates: Sequence[Sequence[str]],
                    batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """``[C]`` float64: ShortGPT's Block Influence ``1 - mean cos(input, output)`` of each candidate
    (a contiguous run of units), averaged over proxy inputs and token positions.

    The input is the stream entering the candidate with its branches removed (the stream it adds to;
    a stage transition at its start still runs), the output the stream after its last unit."""
    topo, batches, spans, inputs = _prepare(adapter, inputs, candidates, batch_size)
    for start, end, units in spans:
        if len(units) != end - start + 1:
            raise UpvitError(f"block influence needs consecutive units, got {sorted(units)}")
    U, n = len(topo.units), batch_len(inputs)
    if not running():
        note(f"block influence of {len(spans)} removal candidates on {n:,} proxy {samples_word(inputs)}", progress)
    work = 1 + sum(len(units) for _, _, units in spans) / U  # one forward, plus each candidate's units again
    with job("block influence", n * work, unit="img-fwd", show=progress) as bar:
        return _influence(adapter, topo, batches, spans, inputs, Scaled(bar, work))


def _influence(adapter: Adapter, topo: Topology, batches: list[tuple[int, int]],
               spans: list[tuple[int, int, frozenset[str]]], inputs: Inputs, bar: Any) -> torch.Tensor:
    sums = torch.zeros(len(spans), dtype=torch.float64)
    counts = [0] * len(spans)
    model = adapter.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s, e in batches:
                streams: list[Stream] = [adapter.begin(batch_slice(inputs, s, e))]
                for unit in topo.units:  # the stream entering every unit (tiny next to a proxy KL run)
                    streams.append(adapter.run(unit.key, streams[-1]))
                for c, (start, end, units) in enumerate(spans):
                    with adapter.masking(None, skip=units):
                        held = streams[start]
                        for i in range(start, end + 1):
                            held = adapter.run(topo.units[i].key, held)
                    total, n = _cosine_mean(held.x, streams[end + 1].x)
                    sums[c] += total.cpu()
                    counts[c] += n
                bar.update(e - s)
    finally:
        model.train(was_training)
    return 1.0 - sums / torch.tensor(counts, dtype=torch.float64)


__all__ = ["block_influence", "unit_scores"]
