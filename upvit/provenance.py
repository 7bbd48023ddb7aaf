"""What a model directory records about how it was made (``config.json`` ``extra``).

Every model a command writes records its own step at the top level of ``extra``:

* ``command``: the command line that wrote it;
* ``inputs``: what it read, each with a fingerprint: a model as its spec, its checkpoint file's sha256 and
  :func:`upvit.fingerprint.model_fingerprint` (architecture and weights, as read, before any training);
  a file (scores, plan, checkpoint) as its path and sha256; data as its spec and sample count (a dataset
  is not hashed: an ImageNet folder would take hours);
* ``results``: what the step measured (the last epoch's log record of a training run; the parameters and
  MACs before and after of a prune; the last step's record of depth pruning);
* the step's own settings: ``training``, ``distillation``, ``plan``, ``depth`` ...

The record of the model it was made from moves under ``source`` (which holds that model's own
``source``, and so on), so a pruned model no longer shows its teacher's command and accuracy as its own.
Keys that describe the model itself rather than a step (:data:`MODEL_KEYS`) stay at the top.
"""
from __future__ import annotations

import hashlib
import os
import shlex
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # torch is imported only where a model is fingerprinted: the CLI imports this at start-up
    from torch import nn

# describe the model itself (how to rebuild or relate it), not the step that made it
MODEL_KEYS = ("plan", "timm_equivalent_kwargs", "hf_spec")
SOURCE_KEY = "source"


def run_record(extra: dict[str, Any], keep: Iterable[str] = MODEL_KEYS) -> dict[str, Any]:
    """The part of ``extra`` that records the step which made the model (everything but ``keep``)."""
    keep = set(keep)
    return {k: v for k, v in extra.items() if k not in keep}


def derive(extra: dict[str, Any], keep: Iterable[str] = MODEL_KEYS) -> dict[str, Any]:
    """``extra`` for a model made from one with ``extra``: the keys ``keep`` stay, the rest (the parent's
    own record, with its ``source``) moves under ``source``.

    >>> derive({"plan": 1, "command": "upvit train", "training": {"epochs": 3}})
    {'plan': 1, 'source': {'command': 'upvit train', 'training': {'epochs': 3}}}
    >>> derive({"hf_spec": {}})
    {'hf_spec': {}}
    """
    keep = tuple(keep)
    new = {k: extra[k] for k in keep if k in extra}
    record = run_record(extra, keep)
    if record:
        new[SOURCE_KEY] = record
    return new


def command_line(argv: list[str] | None) -> str:
    """``upvit ARGS`` as a shell would need it quoted."""
    return "upvit " + shlex.join(argv or [])


def file_input(path: str | None) -> dict[str, Any] | None:
    """``{"path", "sha256"}`` of a file (None for no file)."""
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": path, "sha256": h.hexdigest()}


def model_input(spec: str, model: nn.Module, checkpoint: str | None = None) -> dict[str, Any]:
    """A model input: its spec (a directory's path, ``timm:``/``hf:``), checkpoint file and weights' fingerprint."""
    from .fingerprint import model_fingerprint

    record: dict[str, Any] = {"spec": spec, "fingerprint": model_fingerprint(model)}
    if checkpoint:
        record["checkpoint"] = file_input(checkpoint)
    elif os.path.isdir(spec):
        record["directory"] = os.path.abspath(spec)
    return record


def data_input(spec: str | None, dataset: Any = None) -> dict[str, Any] | None:
    """A data input: its spec and, where known, its number of samples (data is not hashed)."""
    if not spec:
        return None
    record: dict[str, Any] = {"spec": spec}
    if dataset is not None:
        try:
            record["samples"] = len(dataset)
        except TypeError:
            pass
    return record


__all__ = ["MODEL_KEYS", "SOURCE_KEY", "command_line", "data_input", "derive", "file_input", "model_input",
           "run_record"]
