"""Model directories: ``config.json`` + ``model.safetensors`` (or a Hugging Face ``save_pretrained``
directory). Never pickle.

:func:`save` and :func:`load` hand the work to the model's library (:data:`upvit.models.LIBRARIES`):
the config's ``family`` names it when saving, the first library that claims a directory loads it.
The file helpers (atomic writes, safetensors) live in :mod:`upvit.files` and are re-exported here.
"""
from __future__ import annotations

import os  # noqa: F401  (upvit.io.os: tests patch os.fdopen through it)

from torch import nn

from .config import ModelConfig
from .files import atomic_write_bytes, atomic_write_json, load_state_dict_file, load_tensors, read_json, save_tensors
from .models import CONFIG_FILE, WEIGHTS_FILE, library, load_dir_any, model_config, read_config


def save(model: nn.Module, directory: str, config: ModelConfig | None = None) -> str:
    """Write ``model`` as a model directory; returns the directory.

    >>> import upvit
    >>> model = upvit.load("upvit/assets/teacher")   # doctest: +SKIP
    >>> upvit.save(model, "/tmp/copy")               # doctest: +SKIP
    """
    config = config or model_config(model)
    return library(config.family).save(model, directory, config)


def load(directory: str) -> nn.Module:
    """Rebuild a model from its directory, in eval mode (an upvit or a Hugging Face directory)."""
    return load_dir_any(directory)


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "atomic_write_bytes", "atomic_write_json", "load", "load_state_dict_file",
           "load_tensors", "read_config", "read_json", "save", "save_tensors"]
