"""Masking by forward hooks on a family's own modules, shared by every adapter that masks this way.

An adapter mixes in :class:`HookMasking` and implements ``install_hooks(masks, skip) -> handles``;
the hooks below are the pieces those installs are made of (a keep-mask scaling a module's output, a
LayerNorm renormalised over the kept channels, a skipped branch's output replaced by zeros).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .base import Masks, broadcast_mask, masked_layer_norm


def scale_hook(mask: torch.Tensor) -> Callable:
    """Forward hook multiplying a module's output (last dim) by a ``[C]`` or ``[B, C]`` keep-mask."""
    return lambda module, inputs, out: out * broadcast_mask(mask, out)


def grouped_scale_hook(mask: torch.Tensor, groups: int) -> Callable:
    """Forward hook for an output that holds ``groups`` consecutive copies of the site (q, k, v)."""
    def hook(module, inputs, out):
        shape = out.shape
        o = out.view(*shape[:-1], groups, shape[-1] // groups)
        m = mask if mask.dim() == 1 else mask.view(mask.shape[0], *([1] * (o.dim() - 2)), mask.shape[1])
        return (o * m).view(shape)
    return hook


def norm_hook(mask: torch.Tensor) -> Callable:
    """Forward hook recomputing a LayerNorm over the kept channels (removed ones come out as 0)."""
    return lambda mod, inputs, out: masked_layer_norm(inputs[0], mask, mod.weight, mod.bias, mod.eps)


def zero_hook(module, inputs, out):
    """Forward hook replacing a module's output by zeros (a skipped residual branch)."""
    return torch.zeros_like(out)


def check_sites(adapter, masks: Masks, skip: frozenset[str]) -> None:
    """One clear error for a mask on a site, or a skipped unit, that the model does not have."""
    topo = adapter.topology()
    for key in masks.by_site:
        topo.site(key)
    for key in skip:
        topo.unit_index(key)


class HookMasking:
    """``Adapter.masking`` for adapters that mask through forward hooks: nothing is installed when
    there is nothing to mask; otherwise the sites are checked and ``install_hooks`` runs, and its
    handles are removed on leaving the context."""

    @contextlib.contextmanager
    def masking(self, masks: Masks | None, skip: frozenset[str] = frozenset()) -> Iterator["HookMasking"]:
        handles: list = []
        if masks or skip:
            masks = masks or Masks()
            check_sites(self, masks, skip)
            handles = self.install_hooks(masks, skip)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def install_hooks(self, masks: Masks, skip: frozenset[str]) -> list:  # pragma: no cover - abstract
        raise NotImplementedError
