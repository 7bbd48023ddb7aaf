"""Which tensor slices carry a channel, and surgery's slicing helpers: one set for every family.

**Declared channels.** Every adapter declares, per site, the state-dict slices that carry channel c
(:class:`ChannelSlice`: tensor, dimension, index map, role; the "group" of Torch-Pruning, declared
rather than traced), built layer by layer with :class:`Declaration`, and the state-dict keys no site
touches. From that one declaration come the weights a channel carries (magnitude and Taylor
importance: :func:`declared_weights`), surgery's slicing (:func:`declared_rules`) and, for
issue-26-style compensation, the layers that write (role "out": output rows and biases) and read
(role "in": input columns) a site's channels (:meth:`~upvit.adapters.base.Adapter.producers`,
:meth:`~upvit.adapters.base.Adapter.consumers`). ``tests/adapters/test_declared_channels.py`` checks,
for every family, that every state-dict key is claimed or declared untouched and that derived slicing
equals an independent slice-by-hand reference.

A *slice rule* says how one state-dict tensor of the source model becomes the pruned model's: a list
of ``(dim, index)`` applied in order (``index_select``); an empty list copies the tensor whole.
Surgery derives one rule per state-dict key from the declaration (:func:`apply_rules` refuses a key
without one, so a tensor the adapter does not know about is never silently copied at the wrong
width); what is not channel slicing stays an explicit step of the family's surgery after it: moving
sub-layers for depth pruning (:func:`move_sublayers`), folding the attention scale
(:func:`fold_q_scale`), Swin's relative-position bias columns merged per head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from ..errors import UpvitError

# state-dict key -> [(dim, index), ...] applied in order (an empty list copies the tensor)
SliceRules = dict[str, list[tuple[int, torch.Tensor]]]


Role = Literal["out", "in", "param"]


@dataclass(frozen=True)
class ChannelSlice:
    """Channel c of a site is index ``c + k * stride`` (k < ``copies``) along ``dim`` of the state-dict
    tensor ``key``. ``role``: "out" where the tensor produces channel c (a layer's output rows and bias:
    the site's producers), "in" where it consumes it (a layer's input columns: the site's consumers),
    "param" for a per-channel vector or table that is neither (LayerNorm, LayerScale, tokens, position and
    word embeddings, a depthwise conv's kernels). ``copies``/``stride``: fused projections (qkv: 3 copies
    at stride = attention width) and concatenated inputs (Swin's patch merging: 4 copies)."""

    key: str
    dim: int
    role: Role
    copies: int = 1
    stride: int = 0

    def index(self, keep: torch.Tensor) -> torch.Tensor:
        """The tensor's indices along ``dim`` that channels ``keep`` occupy, in order (copy by copy)."""
        if self.copies == 1:
            return keep
        return torch.cat([keep + k * self.stride for k in range(self.copies)])


def declared_weights(state: dict[str, torch.Tensor], slices: list[ChannelSlice]) -> list[tuple[torch.Tensor, int]]:
    """``(tensor, dim)`` pairs, index i along ``dim`` being carried by channel i (views of ``state``'s
    tensors, so a parameter's gradient can be matched to them): what magnitude and Taylor read. A tensor
    stored under two keys (a tied LM head, which is the word embedding) counts once."""
    out, seen = [], set()
    for sl in slices:
        t = state[sl.key].detach()
        dim = sl.dim % t.dim()
        mark = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), dim, sl.copies)
        if mark in seen:
            continue
        seen.add(mark)
        if sl.copies > 1:
            t, dim = t.unflatten(dim, (sl.copies, sl.stride)), dim + 1
        out.append((t, dim))
    return out


def declared_rules(state: dict[str, torch.Tensor], declared: dict[str, list[ChannelSlice]],
                   keep: dict[str, list[int]], untouched: Iterable[str] = ()) -> SliceRules:
    """Slice rules for every key of ``state``: each declared slice of a site in ``keep`` selects the kept
    channels; keys only claimed by sites not in ``keep`` (removed units), and ``untouched`` keys, are
    copied whole. A key neither claimed nor untouched gets no rule (:func:`apply_rules` refuses it)."""
    rules: SliceRules = {key: [] for key in untouched}
    for site, slices in declared.items():
        for sl in slices:
            rules.setdefault(sl.key, [])
            if site in keep:
                device = state[sl.key].device
                idx = sl.index(torch.as_tensor(keep[site], dtype=torch.long, device=device))
                rules[sl.key].append((sl.dim % state[sl.key].dim(), idx))
    return rules


class Declaration:
    """Builds an adapter's :meth:`~upvit.adapters.base.Adapter.channel_slices` over one model's state dict,
    layer by layer; a claim on a key the model does not have (an absent bias, token or module) is skipped.
    ``copies`` splits a tensor's axis into that many equal parts, channel c being index c of each (fused
    projections: qkv is 3 copies; Swin's patch merging reads 4 neighbours)."""

    def __init__(self, state: dict[str, torch.Tensor], sites: Iterable[str] = ()) -> None:
        self.shapes = {key: tuple(t.shape) for key, t in state.items()}
        self.slices: dict[str, list[ChannelSlice]] = {site: [] for site in sites}

    def claim(self, site: str, key: str, dim: int, role: Role, copies: int = 1) -> None:
        """Index c (of each of ``copies`` equal parts) along ``dim`` of ``key`` carries channel c of ``site``."""
        if key in self.shapes:
            stride = self.shapes[key][dim] // copies if copies > 1 else 0
            self.slices.setdefault(site, []).append(ChannelSlice(key, dim, role, copies, stride))

    def linear(self, prefix: str, out: str | None = None, inp: str | None = None, out_copies: int = 1,
               in_copies: int = 1) -> None:
        """nn.Linear or a convolution (weight ``[out, in, ...]``) at ``prefix``: its output rows and bias are
        the channels of site ``out`` (producer), its input columns those of site ``inp`` (consumer)."""
        if out is not None:
            self.claim(out, f"{prefix}.weight", 0, "out", out_copies)
        if inp is not None:
            self.claim(inp, f"{prefix}.weight", 1, "in", in_copies)
        if out is not None:
            self.claim(out, f"{prefix}.bias", 0, "out", out_copies)

    def conv1d(self, prefix: str, out: str | None = None, inp: str | None = None, out_copies: int = 1) -> None:
        """transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed, ``[in, out]``."""
        if out is not None:
            self.claim(out, f"{prefix}.weight", 1, "out", out_copies)
        if inp is not None:
            self.claim(inp, f"{prefix}.weight", 0, "in")
        if out is not None:
            self.claim(out, f"{prefix}.bias", 0, "out", out_copies)

    def vector(self, site: str, prefix: str, copies: int = 1, dim: int = 0) -> None:
        """Every tensor directly under ``prefix`` (a LayerNorm's weight and bias, a LayerScale's gamma, a
        depthwise conv's kernels and bias) is per-channel along ``dim``: role "param"."""
        start = prefix + "."
        for key in self.shapes:
            if key.startswith(start) and "." not in key[len(start):]:
                self.claim(site, key, dim, "param", copies)


def apply_rules(model: nn.Module, rules: SliceRules, family: str = "timm") -> dict[str, torch.Tensor]:
    """The model's state dict sliced by ``rules`` (new tensors; refuses keys without a rule)."""
    state = model.state_dict()
    unknown = sorted(set(state) - set(rules))
    if unknown:
        raise UpvitError(f"surgery does not know how to slice {unknown[0]} of this {family} model: this variant is "
                         "not supported for pruning yet")
    out = {}
    for key, tensor in state.items():
        t = tensor.detach()
        for dim, index in rules[key]:
            t = t.index_select(dim, index.to(t.device))
        out[key] = t if rules[key] else t.clone()
    return out


def move_sublayers(state: dict[str, torch.Tensor], moves: dict[str, str | None]) -> dict[str, torch.Tensor]:
    """Depth surgery on a state dict: every key under an old sub-layer prefix in ``moves`` (e.g.
    ``"blocks.3.norm2."``) goes under its new prefix (``"blocks.2.norm2."``), or is dropped where
    the new prefix is None; other keys stay. Prefixes end with a dot, so ``blocks.1.`` never
    matches ``blocks.10.``."""
    out = {}
    for key, tensor in state.items():
        old = next((p for p in moves if key.startswith(p)), None)
        if old is None:
            out[key] = tensor
        elif moves[old] is not None:
            out[moves[old] + key[len(old):]] = tensor
    return out


def fold_q_scale(state: dict[str, torch.Tensor], prefix: str, rows: int, factor: float, dim: int = 0) -> None:
    """Multiply the first ``rows`` outputs (q) of ``prefix``.weight/.bias by ``factor``: with the pruned
    module's own ``head_dim ** -0.5`` scale, q . k then carries the original model's scale. ``dim``: the
    output axis (0 for nn.Linear; -1 for transformers' ``Conv1D``, stored ``[in, out]``)."""
    for suffix in ("weight", "bias"):
        if f"{prefix}.{suffix}" in state:
            state[f"{prefix}.{suffix}"].narrow(dim, 0, rows).mul_(factor)


def q_scale(old_head_dim: int, new_head_dim: int) -> float | None:
    """The factor folded into the query projection so that the pruned attention, which scales by its
    own ``new_head_dim ** -0.5``, keeps the original ``old_head_dim ** -0.5`` (None: no change)."""
    return None if old_head_dim == new_head_dim else (new_head_dim / old_head_dim) ** 0.5


__all__ = ["ChannelSlice", "Declaration", "Role", "SliceRules", "apply_rules", "declared_rules", "declared_weights",
           "fold_q_scale", "move_sublayers", "q_scale"]
