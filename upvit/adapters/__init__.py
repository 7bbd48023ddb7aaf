"""Adapters: the only place that knows a model family's module names.

``get_adapter(model)`` returns the adapter for a supported model, or raises a one-line UpvitError.
"""
from __future__ import annotations

from torch import nn

from ..errors import UpvitError
from .base import Adapter, Masks, Site

_FACTORIES = []  # (name, predicate(model) -> bool, constructor)


def register(name: str, predicate, constructor) -> None:
    _FACTORIES.append((name, predicate, constructor))


def get_adapter(model: nn.Module) -> Adapter:
    if isinstance(model, Adapter):
        return model
    _load_builtin()
    for _, predicate, constructor in _FACTORIES:
        if predicate(model):
            return constructor(model)
    names = ", ".join(n for n, _, _ in _FACTORIES)
    raise UpvitError(f"no adapter for model class {type(model).__name__}: supported families are {names}")


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        from . import timm_vit  # noqa: F401  (registers itself)

        _loaded = True


__all__ = ["Adapter", "Masks", "Site", "get_adapter", "register"]
