"""Model directories: ``config.json`` + ``model.safetensors``. Never pickle."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from .errors import UpvitError
from .models import ModelConfig, build_model, load_into, model_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


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


def save(model: nn.Module, directory: str, config: ModelConfig | None = None) -> str:
    """Write ``model`` as a model directory; returns the directory.

    >>> import upvit
    >>> model = upvit.load("upvit/assets/teacher")   # doctest: +SKIP
    >>> upvit.save(model, "/tmp/copy")               # doctest: +SKIP
    """
    config = config or model_config(model)
    if config.family == "hf":  # a plain save_pretrained directory + the upvit.json sidecar
        from .hf import save_hf_dir

        return save_hf_dir(model, directory, config)
    os.makedirs(directory, exist_ok=True)
    save_tensors(os.path.join(directory, WEIGHTS_FILE), model.state_dict(), metadata={"format": "pt"})
    atomic_write_json(os.path.join(directory, CONFIG_FILE), config.to_dict())
    return directory


def read_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UpvitError(f"{directory} has no {CONFIG_FILE}: it is not an upvit model directory")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise UpvitError(f"{path} is not valid JSON ({e}): restore it") from None
    return ModelConfig.from_dict(raw)


def load(directory: str) -> nn.Module:
    """Rebuild a model from its directory, in eval mode (an upvit or a Hugging Face directory)."""
    from .hf import is_hf_dir, load_hf_dir

    if is_hf_dir(directory):
        return load_hf_dir(directory)
    config = read_config(directory)
    state, _ = load_tensors(os.path.join(directory, WEIGHTS_FILE))
    model = build_model(config)
    load_into(model, state, source=os.path.join(directory, WEIGHTS_FILE))
    return model.eval()
