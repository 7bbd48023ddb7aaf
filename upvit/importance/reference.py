"""The reference every exact criterion measures against: the original model's outputs, computed once.

Three scorers compare a changed model with the original on the proxy set: the exact KL engine
(:mod:`upvit.importance.kl`, one channel removed), greedy selection (:mod:`upvit.importance.greedy`,
channels removed jointly) and depth pruning's unit scores (:mod:`upvit.importance.units`, units
skipped). They share the same three ideas, stated here once:

1. the original's outputs per proxy batch, turned by the adapter into what its divergence compares
   with (:meth:`Adapter.output_reference`: ``(log q, q)`` for the KL, normalised embeddings for a
   sentence encoder), and the event weights (padding counts 0);
2. a stream cache: the streams entering unit i, advanced unit by unit, so a candidate whose change
   first acts at unit i runs from there;
3. candidates on the batch axis: C candidates of one batch run as one ``[C * B, ...]`` forward,
   compared with :meth:`Reference.divergence`, the adapter's one divergence
   (:meth:`Adapter.output_divergence`).
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..adapters.base import Adapter, Inputs, Stream, batch_len, batch_repeat, batch_slice, batch_to, forward_from
from ..errors import UpvitError

TOKEN_ROWS = 32768  # target size of a stacked forward, in token rows, when candidate_batch is automatic


def check_proxy(inputs: Inputs) -> None:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 4 or inputs.shape[0] == 0:
            raise UpvitError("the proxy set must be a non-empty [N, C, H, W] image tensor (or a dict of per-sample "
                             "tensors for text)")
    elif not isinstance(inputs, dict) or not inputs or batch_len(inputs) == 0:
        raise UpvitError("the proxy set must be a non-empty image tensor or a dict of per-sample tensors")


def criterion_name(divergence: str) -> str:
    """How the exact score is named in messages and metadata: ``kl`` for output distributions, ``1 - cos``
    for a sentence encoder's embeddings (the adapter's ``divergence``)."""
    return {"kl": "kl", "cosine": "1 - cos"}.get(divergence, f"{divergence} divergence")


def samples_word(inputs: Inputs) -> str:
    """``images`` for an image batch, ``sequences`` for token inputs (a dict of tensors)."""
    return "images" if isinstance(inputs, torch.Tensor) else "sequences"


class Reference:
    """The original model's outputs on the proxy batches (computed once, no grad) and the streams
    entering its first unit; see the module doc. ``batches``: ``(start, end)`` rows of ``inputs``."""

    def __init__(self, adapter: Adapter, inputs: Inputs, batch_size: int = 64,
                 batches: list[tuple[int, int]] | None = None) -> None:
        check_proxy(inputs)
        if batch_size < 1:
            raise UpvitError("batch_size must be at least 1")
        self.adapter = adapter
        self.topology = adapter.topology()
        param = next(adapter.model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.inputs = batch_to(inputs, param.device, param.dtype)
        n = batch_len(self.inputs)
        self.batches = batches or [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        self.ref: list[tuple[torch.Tensor, ...]] = []
        self.weights: list[torch.Tensor | None] = []
        self.entry: list[Stream] = []  # the streams entering unit 0, per batch
        was_training = adapter.model.training
        adapter.model.eval()  # the original's outputs are always the eval-mode ones
        try:
            self._compute()
        finally:
            adapter.model.train(was_training)

    @torch.no_grad()
    def _compute(self) -> None:
        adapter = self.adapter
        for s, e in self.batches:
            x = batch_slice(self.inputs, s, e)
            stream = adapter.begin(x)
            logits = forward_from(adapter, stream, 0, self.topology)
            bad = (~torch.isfinite(logits)).any(-1)
            if bad.any():
                raise UpvitError(f"the model's logits are NaN or inf on {int(bad.any(-1).sum())} proxy inputs: "
                                 "check the weights and the input normalisation")
            self.ref.append(adapter.output_reference(logits))
            w = adapter.event_weights(x)
            self.weights.append(None if w is None else w.to(logits.device, torch.float64))
            self.entry.append(stream)

    def fits(self, adapter: Adapter, batches: list[tuple[int, int]]) -> bool:
        """Whether this reference serves a run of ``adapter`` on these proxy batches."""
        return adapter is self.adapter and batches == self.batches

    # ---------------------------------------------------------------- sizes
    def rows(self, n: int = 0) -> int:
        s, e = self.batches[n]
        return e - s

    def candidate_batch(self, given: int | None = None, streams: list[Stream] | None = None) -> int:
        """Candidates per forward: ``given``, else about TOKEN_ROWS rows x tokens (of ``streams``, the
        ones candidates start from, default the first unit's)."""
        x0 = (streams or self.entry)[0].x
        tokens = max(1, x0[0].numel() // x0.shape[-1])
        return given or max(1, round(TOKEN_ROWS / (self.rows(0) * tokens)))

    def batch_inputs(self, n: int) -> Inputs:
        s, e = self.batches[n]
        return batch_slice(self.inputs, s, e)

    # ---------------------------------------------------------------- the stream cache
    def walk(self) -> Iterator[tuple[int, list[Stream]]]:
        """``(i, streams entering unit i)`` for every unit in forward order, advanced in place."""
        streams = list(self.entry)
        units = self.topology.units
        for i, unit in enumerate(units):
            yield i, streams
            if i + 1 < len(units):
                streams = [self.adapter.run(unit.key, st) for st in streams]

    def streams_at(self, start: int) -> list[Stream] | None:
        """The streams entering unit ``start`` (None for -1: candidates then run from the inputs)."""
        if start < 0:
            return None
        for i, streams in self.walk():
            if i == start:
                return streams
        raise UpvitError(f"this model has no unit number {start}")

    # ---------------------------------------------------------------- candidates
    def run(self, n: int, start: int, copies: int, streams: list[Stream] | None = None) -> torch.Tensor:
        """Logits ``[copies, B, E, K]`` of batch ``n`` entering unit ``start`` (-1: from the inputs),
        ``copies`` times on the batch axis, under whatever masking the caller has switched on."""
        a = self.adapter
        if start < 0:
            logits = forward_from(a, a.begin(batch_repeat(self.batch_inputs(n), copies)), 0, self.topology)
        else:
            stream = (streams if streams is not None else self.streams_at(start))[n]
            logits = forward_from(a, stream.repeat(copies) if copies > 1 else stream, start, self.topology)
        return logits.view(copies, self.rows(n), *logits.shape[1:])

    def divergence(self, n: int, outputs: torch.Tensor) -> torch.Tensor:
        """``[C]`` float64: the adapter's divergence of each candidate's outputs ``[C, B, E, K]`` from
        the original's on batch ``n`` (summed over samples and events)."""
        return self.adapter.output_divergence(self.ref[n], outputs, self.weights[n])

    @staticmethod
    def criterion_of(adapter: Adapter) -> str:
        """What the divergence is, for scores' metadata and messages (:func:`criterion_name`)."""
        return criterion_name(adapter.divergence)


__all__ = ["Reference", "TOKEN_ROWS", "check_proxy", "criterion_name", "samples_word"]
