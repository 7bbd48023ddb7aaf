"""What describes a saved model, for every family: :class:`ModelConfig`, the ``key=value`` arguments of a
model spec, strict weight loading, and :class:`Library` (how one library's models are named, built,
saved and loaded; timm in :mod:`upvit.models`, transformers in :mod:`upvit.hf`).

This module knows no family: the adapters (which do) and the loaders (which ask the adapters' family
records) both build on it, so neither imports the other through it.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import UpvitError

CONFIG_FORMAT = "upvit-model"
CONFIG_VERSION = 1


@dataclass(init=False)
class ModelConfig:
    """Everything needed to rebuild a model: the library (``family``: ``"timm"`` or ``"hf"``, see
    :class:`Library`), the architecture ``name`` and its constructor ``kwargs``, the data settings,
    class names and provenance.

    timm: ``timm.create_model(name, **kwargs)``. Hugging Face (:mod:`upvit.hf`): ``name`` is the
    transformers class; the architecture itself lives in HF's own ``config.json``.

    Files keep the historic keys ``timm_name``/``timm_kwargs`` for ``name``/``kwargs`` (a stock reload
    reads them without upvit, see :mod:`upvit.certificate`); :meth:`from_dict` reads both spellings, and
    ``timm_name=``/``timm_kwargs=`` are accepted as keyword aliases."""

    name: str
    kwargs: dict[str, Any]
    family: str
    data_config: dict[str, Any]
    class_names: list[str] | None
    timm_equivalent: str | None  # a registered timm architecture with exactly this shape
    extra: dict[str, Any]  # provenance: training run, plan, teacher ...

    def __init__(self, name: str | None = None, kwargs: dict[str, Any] | None = None, family: str = "timm",
                 data_config: dict[str, Any] | None = None, class_names: list[str] | None = None,
                 timm_equivalent: str | None = None, extra: dict[str, Any] | None = None, *,
                 timm_name: str | None = None, timm_kwargs: dict[str, Any] | None = None) -> None:
        if name is None and timm_name is None:
            raise TypeError("ModelConfig needs the architecture's name (name=... or timm_name=...)")
        self.name = name if name is not None else timm_name
        self.kwargs = kwargs if kwargs is not None else (timm_kwargs if timm_kwargs is not None else {})
        self.family = family
        self.data_config = data_config if data_config is not None else {}
        self.class_names = class_names
        self.timm_equivalent = timm_equivalent
        self.extra = extra if extra is not None else {}

    # the names the files and older code use
    @property
    def timm_name(self) -> str:
        return self.name

    @timm_name.setter
    def timm_name(self, value: str) -> None:
        self.name = value

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        return self.kwargs

    @timm_kwargs.setter
    def timm_kwargs(self, value: dict[str, Any]) -> None:
        self.kwargs = value

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # the file format (version 1) as written since the start: timm_name, timm_kwargs first
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "timm_name": d.pop("name"),
                "timm_kwargs": d.pop("kwargs"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if d.get("format") != CONFIG_FORMAT:
            raise UpvitError("config.json is not an upvit model config (missing format 'upvit-model')")
        if d.get("version", 0) > CONFIG_VERSION:
            raise UpvitError(f"config.json has version {d['version']}, newer than this upvit ({CONFIG_VERSION}): "
                             "upgrade upvit")
        known = {"name", "kwargs", "family", "data_config", "class_names", "timm_equivalent", "extra", "timm_name",
                 "timm_kwargs"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def derived(self) -> "ModelConfig":
        """A copy for a derived model (pruned, fine-tuned): the plan of its parent is dropped."""
        new = copy.deepcopy(self)
        new.extra = {k: v for k, v in new.extra.items() if k != "plan"}
        return new


@dataclass(frozen=True)
class Library:
    """How the models of one library (timm, transformers) are named, built, saved and loaded. Every
    family record (:class:`upvit.adapters.family.Family`) names its library; the loaders dispatch on it
    instead of testing which library a model comes from."""

    name: str  # ModelConfig.family of its models; its specs are written ``NAME:...``
    from_spec: Callable[[str, str | None, int | None], nn.Module]  # (spec, checkpoint, init_seed) -> model
    build: Callable[[ModelConfig], nn.Module]  # a model with fresh weights from its config
    save: Callable[[nn.Module, str, ModelConfig], str]  # model directory written -> its path
    owns_dir: Callable[[str], bool]  # whether a directory is one of this library's model directories
    load_dir: Callable[[str], nn.Module]  # the model of such a directory, in eval mode
    num_classes: Callable[[nn.Module], int | None] = lambda model: None  # a classifier's class count
    class_count_key: str = "num_classes"  # the spec key that sets the class count
    stock_loader: Callable[[str], str] = lambda directory: "?"  # how a directory reloads without upvit, in words

    @property
    def prefix(self) -> str:
        return f"{self.name}:"


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, so list values survive: ``a=1,b=[2,3]`` -> ``["a=1", "b=[2,3]"]``."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_pairs(pairs: list[str], spec: str) -> dict[str, Any]:
    """``["key=value", ...]`` of a model spec -> kwargs; values are JSON literals or bare strings
    (e.g. ``global_pool=token``)."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UpvitError(f"bad model argument {pair!r} in {spec!r}: write key=value")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return kwargs


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load a state dict, with one clear line on mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise UpvitError(f"weights in {source} do not fit the model: {detail[:400]}") from None
