"""A family record: what upvit knows of one model family beyond its adapter, declared in the family's
adapter module as ``FAMILY`` and found through the registry row of :mod:`upvit.adapters`.

The loaders (:mod:`upvit.models`, :mod:`upvit.hf`, :mod:`upvit.io`) read these records instead of
keeping tables of their own: which library builds, saves and loads the family's models (the
``Library`` named by ``library``), which transformers classes it covers and their tasks, the class a
bare ``hf:TYPE`` spec builds, config keys the family reads beyond its config class and the default
data config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn


@dataclass(frozen=True)
class Family:
    """One model family's record (see the module doc)."""

    name: str  # the registry name, e.g. "timm_vit"
    library: str  # the config.Library that builds, saves and loads its models: "timm" or "hf"
    # transformers classes of the family -> their task (a timm family leaves it empty: image classification)
    classes: Mapping[str, str] = field(default_factory=dict)
    # model type -> the class a bare ``hf:TYPE,...`` spec builds
    model_types: Mapping[str, str] = field(default_factory=dict)
    # config keys the family's models read although their config class does not declare them
    config_keys: tuple[str, ...] = ()
    # the data config of a model of the family built without one (None: the library's default)
    data_config: Callable[[nn.Module], dict[str, Any]] | None = None

    def task_of_class(self, class_name: str) -> str | None:
        return self.classes.get(class_name)


__all__ = ["Family"]
