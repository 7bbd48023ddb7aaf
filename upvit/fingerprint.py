"""Content hashes: one helper for every fingerprint upvit records.

:func:`digest` feeds strings, bytes and tensors (their raw bytes) to one sha256, so the resume
fingerprints of training and KL scoring and the model fingerprint that scores carry are all spelled
with the same primitive. :func:`model_fingerprint` identifies a model by two hashes:

* ``architecture``: the model's class, every submodule's name and class (and head count, which the
  weight shapes do not show) and every state-dict entry's name and shape;
* ``weights``: every state-dict entry's name, dtype, shape and bytes.

``upvit score`` records it in the scores' metadata and ``upvit prune`` refuses scores whose
fingerprint differs from the model it is pruning (:func:`check_scores_fingerprint`).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch
from torch import nn

from .errors import UpvitError

FINGERPRINT_KEY = "model_fingerprint"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (CPU, contiguous), whatever its dtype (bfloat16 included)."""
    t = t.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def digest(parts: Iterable[str | bytes | torch.Tensor], h: Any = None) -> Any:
    """Update ``h`` (a new sha256 by default) with each part in order and return it.

    Strings are UTF-8 encoded, tensors contribute their raw bytes (:func:`tensor_bytes`).

    >>> digest(["a", b"b"]).hexdigest() == hashlib.sha256(b"ab").hexdigest()
    True
    """
    h = hashlib.sha256() if h is None else h
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(tensor_bytes(part))
        elif isinstance(part, str):
            h.update(part.encode())
        else:
            h.update(part)
    return h


def architecture_digest(model: nn.Module) -> str:
    """sha256 over the model's structure: classes, module names, head counts, state-dict names and shapes."""
    def parts():
        yield f"{type(model).__module__}.{type(model).__qualname__}\n"
        for name, module in model.named_modules():
            heads = getattr(module, "num_heads", None)
            yield f"module|{name}|{type(module).__qualname__}|{heads if isinstance(heads, int) else ''}\n"
        for name, t in model.state_dict().items():
            yield f"tensor|{name}|{list(t.shape)}\n"

    return digest(parts()).hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 over every state-dict entry's name, dtype, shape and bytes."""
    def parts():
        for name, t in model.state_dict().items():
            yield f"{name}|{t.dtype}|{list(t.shape)}\n"
            yield t

    return digest(parts()).hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """``{"architecture": sha256, "weights": sha256}`` of a model (see the module doc)."""
    return {"architecture": architecture_digest(model), "weights": weights_digest(model)}


def _shape_words(shape: dict[str, Any] | None) -> str:
    """``"4 blocks, width 24"`` (per-stage widths for multi-stage models) from a ``Topology.shape()``."""
    if not shape:
        return "another shape"
    widths = shape.get("residual") or []
    width = widths[0] if len(widths) == 1 else widths
    return f"{len(shape.get('attn', []))} blocks, width {width}"


def _weights_words(spec: str | None, checkpoint: str | None) -> str:
    """Where a model's weights came from, for messages: ``timm:X with seeded random weights (no --checkpoint)``."""
    if not spec:
        return "a model of unrecorded origin"
    if checkpoint:
        return f"{spec} with --checkpoint {checkpoint}"
    if spec.startswith(("timm:", "hf:")):
        return f"{spec} with seeded random weights (no --checkpoint)"
    return spec


def check_scores_fingerprint(scores: Any, model: nn.Module, source: str, model_spec: str | None = None,
                             checkpoint: str | None = None) -> str | None:
    """Refuse scores computed for another model; return a warning line for scores without a fingerprint.

    ``scores`` is a :class:`upvit.Scores` whose ``meta`` may hold ``model_fingerprint`` (and, from
    ``upvit score``, ``model_spec`` and ``checkpoint``); ``model_spec``/``checkpoint`` say where this
    model's weights came from, so a weights mismatch can say why.
    """
    recorded = (getattr(scores, "meta", None) or {}).get(FINGERPRINT_KEY)
    if not isinstance(recorded, dict) or not recorded.get("architecture"):
        return (f"{source} carries no model fingerprint (written by an older upvit or by hand): "
                "cannot check that it was computed for this model")
    mine = model_fingerprint(model)
    if recorded["architecture"] != mine["architecture"]:
        from .adapters import get_adapter
        from .topology import Topology

        recorded_topology = (getattr(scores, "meta", None) or {}).get("topology")
        theirs = _shape_words(Topology.from_dict(recorded_topology).shape() if recorded_topology else None)
        ours = _shape_words(get_adapter(model).topology().shape())
        raise UpvitError(f"{source} was computed for another architecture ({theirs}; this model: {ours}): "
                         "prune the model the scores came from, or score this one with `upvit score`")
    if recorded.get("weights") != mine["weights"]:
        meta = getattr(scores, "meta", None) or {}
        why = ""
        if meta.get("model_spec") or model_spec:
            why = (f" (scored: {_weights_words(meta.get('model_spec'), meta.get('checkpoint'))}; "
                   f"this model: {_weights_words(model_spec, checkpoint)})")
        raise UpvitError(f"{source}: scores were computed for other weights of this architecture{why}: pass the "
                         "same --checkpoint as to `upvit score` (or the same model directory), or re-score")
    return None
