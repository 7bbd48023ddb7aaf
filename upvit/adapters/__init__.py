"""Adapters: the only place that knows a model family's module names.

``get_adapter(model)`` returns the adapter for a supported model, or raises a one-line UpvitError.
Third-party families call :func:`register` with a predicate and a constructor.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from ..errors import UpvitError
from .base import Adapter, Masks, Stream, forward_from

# built-in families: (name, module, predicate function, adapter class); modules import lazily
BUILTIN = (
    ("timm_vit", "upvit.adapters.timm_vit", "is_timm_vit", "TimmViTAdapter"),
    ("timm_swin", "upvit.adapters.timm_swin", "is_timm_swin", "TimmSwinAdapter"),
    ("timm_pvt_v2", "upvit.adapters.timm_pvt", "is_timm_pvt", "TimmPVTv2Adapter"),
    ("hf_gpt2", "upvit.adapters.hf_gpt2", "is_hf_gpt2", "HFGPT2Adapter"),
    ("hf_bert", "upvit.adapters.hf_bert", "is_hf_bert", "HFBertAdapter"),
    ("hf_vit", "upvit.adapters.hf_vit", "is_hf_vit", "HFViTAdapter"),
)
_REGISTERED: list[tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module], Adapter]]] = []


def register(name: str, predicate: Callable[[nn.Module], bool], constructor: Callable[[nn.Module], Adapter]) -> None:
    """Make :func:`get_adapter` return ``constructor(model)`` for models where ``predicate(model)``."""
    if all(n != name for n, _, _ in _REGISTERED):
        _REGISTERED.append((name, predicate, constructor))


def _families():
    out = []
    for name, module, predicate, cls in BUILTIN:
        mod = importlib.import_module(module)
        out.append((name, getattr(mod, predicate), getattr(mod, cls)))
    return out + [f for f in _REGISTERED if f[0] not in {b[0] for b in BUILTIN}]


def get_adapter(model: nn.Module) -> Adapter:
    if isinstance(model, Adapter):
        return model
    families = _families()
    for _, predicate, constructor in families:
        if predicate(model):
            return constructor(model)
    names = ", ".join(n for n, _, _ in families)
    raise UpvitError(f"no adapter for model class {type(model).__name__}: supported families are {names}")


__all__ = ["Adapter", "Masks", "Stream", "forward_from", "get_adapter", "register"]
