"""upvit: unified structured pruning of vision transformers (UP-ViTs).

Importing upvit stays light; the heavy pieces load on first use.

>>> import upvit
>>> teacher = upvit.load("upvit/assets/teacher")  # doctest: +SKIP
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "UpvitError": "upvit.errors",
    "ModelConfig": "upvit.config",
    "load_model": "upvit.models",
    "save": "upvit.io",
    "load": "upvit.io",
    "evaluate": "upvit.evaluation",
    "TrainConfig": "upvit.train",
    "fit": "upvit.train",
    "finetune": "upvit.distill",
    "DistillationLoss": "upvit.distill",
    "FeatureDistillationLoss": "upvit.distill",
    "score": "upvit.importance.api",
    "Scores": "upvit.importance.scores",
    "get_adapter": "upvit.adapters",
    "make_plan": "upvit.plan",
    "Plan": "upvit.plan",
    "Targets": "upvit.targets",
    "Topology": "upvit.topology",
    "register_method": "upvit.importance.api",
    "prune": "upvit.surgery",
    "prune_depth": "upvit.depth",
    "prune_iteratively": "upvit.iterative",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'upvit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
