"""Files that never half-exist: atomic writes, safetensors in and out, state dicts from checkpoints.

The lowest layer of loading: it knows no model family (:mod:`upvit.io` writes and reads model
directories on top of it).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from .errors import UpvitError


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if e.filename is None:  # a failed write (full disk) names no file: name the one being written
            raise OSError(e.errno, e.strerror, path) from e
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or one clear error."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise UpvitError(f"{path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises several types for damaged files
        raise UpvitError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:120]}); "
                         "re-create it or restore it from a good copy") from None


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch checkpoint (loaded with ``weights_only=True``)."""
    if path.endswith(".safetensors"):
        return load_tensors(path)[0]
    if not os.path.isfile(path):
        raise UpvitError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UpvitError(f"cannot read checkpoint {path} ({type(e).__name__}): re-create it") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def read_json(path: str) -> Any:
    """A JSON file, or one clear error naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UpvitError(f"{path} is not valid JSON ({e}): restore it") from None
