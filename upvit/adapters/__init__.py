"""Adapters: the only place that knows a model family's module names.

``get_adapter(model)`` returns the adapter for a supported model, or raises a one-line UpvitError.
Third-party families call :func:`register` with a predicate and a constructor (and, to be loaded and
saved like the built-in ones, a :class:`~upvit.adapters.family.Family` record).

A family is one module: its adapter, its predicate and its ``FAMILY`` record (library, classes and
tasks, data config; see :mod:`upvit.adapters.family`), registered by one row of ``BUILTIN``.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from ..errors import UpvitError
from .base import Adapter, Masks, Stream, forward_from
from .family import Family

# built-in families: (name, module, predicate function, adapter class); modules import lazily; each
# module also holds the family's record as ``FAMILY``
BUILTIN = (
    ("timm_vit", "upvit.adapters.timm_vit", "is_timm_vit", "TimmViTAdapter"),
    ("timm_swin", "upvit.adapters.timm_swin", "is_timm_swin", "TimmSwinAdapter"),
    ("timm_pvt_v2", "upvit.adapters.timm_pvt", "is_timm_pvt", "TimmPVTv2Adapter"),
    ("hf_gpt2", "upvit.adapters.hf_gpt2", "is_hf_gpt2", "HFGPT2Adapter"),
    ("hf_bert", "upvit.adapters.hf_bert", "is_hf_bert", "HFBertAdapter"),
    ("hf_vit", "upvit.adapters.hf_vit", "is_hf_vit", "HFViTAdapter"),
)
_REGISTERED: list[tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module], Adapter]]] = []
_RECORDS: dict[str, Family] = {}  # the family records of registered (third-party) families


def register(name: str, predicate: Callable[[nn.Module], bool], constructor: Callable[[nn.Module], Adapter],
             family: Family | None = None) -> None:
    """Make :func:`get_adapter` return ``constructor(model)`` for models where ``predicate(model)``;
    ``family`` is its record (default: a timm family with the library's defaults)."""
    if all(n != name for n, _, _ in _REGISTERED):
        _REGISTERED.append((name, predicate, constructor))
        _RECORDS[name] = family or Family(name, "timm")


def _families():
    out = []
    for name, module, predicate, cls in BUILTIN:
        mod = importlib.import_module(module)
        out.append((name, getattr(mod, predicate), getattr(mod, cls)))
    return out + [f for f in _REGISTERED if f[0] not in {b[0] for b in BUILTIN}]


def families() -> list[Family]:
    """The family records of every known family, built-in first."""
    records = [importlib.import_module(module).FAMILY for _, module, _, _ in BUILTIN]
    builtin = {b[0] for b in BUILTIN}
    return records + [_RECORDS[n] for n, _, _ in _REGISTERED if n not in builtin]


def family_of_class(class_name: str) -> Family | None:
    """The record of the family covering a transformers class (``Family.classes``), or None."""
    return next((f for f in families() if class_name in f.classes), None)


def task_of(model: nn.Module) -> str | None:
    """The task of a model (a :class:`upvit.tasks.Task` value): from its upvit config if it records one,
    else from its family's record of its class; None for an image classifier that records none."""
    config = getattr(model, "upvit_config", None)
    task = (config.data_config or {}).get("task") if config is not None else None
    if task:
        return task
    family = family_of_class(type(model).__name__)
    return family.task_of_class(type(model).__name__) if family is not None else None


def input_size_of(model: nn.Module) -> tuple[int, ...]:
    """A model's input size: from its upvit config's data config, else its adapter's, else (3, 224, 224)."""
    config = getattr(model, "upvit_config", None)
    if config is not None and config.data_config.get("input_size"):
        return tuple(config.data_config["input_size"])
    try:
        size = get_adapter(model).input_size()
    except UpvitError:
        size = None
    return tuple(size) if size else (3, 224, 224)


def get_adapter(model: nn.Module) -> Adapter:
    if isinstance(model, Adapter):
        return model
    families = _families()
    for _, predicate, constructor in families:
        if predicate(model):
            return constructor(model)
    names = ", ".join(n for n, _, _ in families)
    raise UpvitError(f"no adapter for model class {type(model).__name__}: supported families are {names}")


__all__ = ["Adapter", "Family", "Masks", "Stream", "families", "family_of_class", "forward_from", "input_size_of",
           "get_adapter", "register", "task_of"]
