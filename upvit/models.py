"""Model specs and configs: how a model is named, built and described.

A MODEL argument is either a model directory written by :func:`upvit.save` (``config.json`` +
``model.safetensors``; or a Hugging Face ``save_pretrained`` directory, see :mod:`upvit.hf`),
``hf:PATH_OR_NAME[,key=value,...]`` or ``timm:NAME`` with optional constructor kwargs after commas, values as
JSON literals, e.g. ``timm:vit_base_patch16_224,img_size=28,patch_size=4,in_chans=1,num_classes=10``.
A ``timm:`` model gets random weights unless a checkpoint (a state dict in ``.safetensors`` or
``.pth``) is given. They are seeded (``init_seed=N`` in the spec, default 0; ``upvit train`` uses its
``--seed``), so the same spec gives the same weights in every process: ``upvit score timm:NAME`` and a later
``upvit prune timm:NAME`` see one model, and the scores' fingerprint check passes.

Every model comes through a :class:`~upvit.config.Library`: :data:`TIMM` here (``timm:`` specs, upvit
model directories) and :data:`upvit.hf.HF`; :func:`load_model`, :func:`build_model` and
:mod:`upvit.io` pick one by the spec's prefix, the config's ``family`` or the directory, never by
testing a model's family. What a family adds (its classes, tasks, data config) is its record in its
adapter module (:mod:`upvit.adapters.family`).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter, task_of
from .adapters.timm_common import create_timm_model, default_data_config
from .config import CONFIG_FORMAT, CONFIG_VERSION, Library, ModelConfig, load_into, parse_pairs, split_top_level
from .errors import UpvitError
from .files import atomic_write_json, load_state_dict_file, load_tensors, read_json, save_tensors
from .hf import HF, is_hf_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def parse_timm_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``timm:NAME,key=value,...`` -> (NAME, kwargs)."""
    if not spec.startswith("timm:"):
        raise UpvitError(f"{spec!r} is not a timm spec: write timm:NAME[,key=value,...]")
    name, *pairs = split_top_level(spec[len("timm:"):])
    return name.strip(), parse_pairs(pairs, spec)


def _init_seed(value: Any, spec: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UpvitError(f"init_seed={value!r} in {spec!r}: write a whole number of at least 0, e.g. init_seed=0")
    return value


def model_from_timm_spec(spec: str, checkpoint: str | None = None, init_seed: int | None = None) -> nn.Module:
    """A timm model from ``timm:NAME[,k=v...]``; without ``checkpoint`` its weights are timm's random
    initialisation drawn from seed ``init_seed=`` of the spec, else ``init_seed``, else 0 (the global
    random state is left as it was)."""
    name, kwargs = parse_timm_spec(spec)
    seed = _init_seed(kwargs.pop("init_seed", 0 if init_seed is None else init_seed), spec)  # upvit's, not timm's
    # ``input_size=[C,H,W]`` is upvit's, not timm's: the input of families whose constructor takes no image
    # size (PVTv2 works at any size), recorded in the data config so every command reads data at that size
    explicit = kwargs.pop("input_size", None)
    if explicit is not None and (not isinstance(explicit, list) or len(explicit) != 3
                                 or not all(isinstance(v, int) and v > 0 for v in explicit)):
        raise UpvitError(f"input_size={explicit!r} in {spec!r}: write input_size=[C,H,W], e.g. input_size=[1,28,28]")
    with torch.random.fork_rng(devices=[]):  # the same weights in every process, whatever ran before
        torch.manual_seed(seed)
        model = create_timm_model(name, kwargs)
    data_config = default_data_config(model)
    # timm's pretrained_cfg keeps the default input size even when img_size/in_chans are overridden:
    # the model's adapter knows its real input size; otherwise at least the channel count follows in_chans
    size = explicit or _adapter_input_size(model)
    if size:
        data_config["input_size"] = list(size)
    elif isinstance(kwargs.get("in_chans"), int):
        data_config["input_size"] = [kwargs["in_chans"], *data_config["input_size"][1:]]
    c = data_config["input_size"][0]
    if len(data_config["mean"]) != c:
        data_config["mean"], data_config["std"] = [0.5] * c, [0.5] * c
    model.upvit_config = ModelConfig(name=name, kwargs=kwargs, data_config=data_config)
    if checkpoint:
        load_into(model, load_state_dict_file(checkpoint), source=checkpoint)
    return model


def _adapter_input_size(model: nn.Module) -> tuple[int, ...] | None:
    try:
        return get_adapter(model).input_size()
    except UpvitError:
        return None


def build_timm_model(config: ModelConfig) -> nn.Module:
    """``timm.create_model(config.name, **config.kwargs)`` with random weights."""
    return create_timm_model(config.name, config.kwargs)


def save_dir(model: nn.Module, directory: str, config: ModelConfig) -> str:
    """An upvit model directory: ``model.safetensors`` + ``config.json``."""
    os.makedirs(directory, exist_ok=True)
    save_tensors(os.path.join(directory, WEIGHTS_FILE), model.state_dict(), metadata={"format": "pt"})
    atomic_write_json(os.path.join(directory, CONFIG_FILE), config.to_dict())
    return directory


def read_config(directory: str) -> ModelConfig:
    """The ModelConfig of an upvit model directory, or one clear error."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UpvitError(f"{directory} has no {CONFIG_FILE}: it is not an upvit model directory")
    return ModelConfig.from_dict(read_json(path))


def load_dir(directory: str) -> nn.Module:
    """The model of an upvit model directory, built by its config's library, with its weights, in eval mode."""
    config = read_config(directory)
    state, _ = load_tensors(os.path.join(directory, WEIGHTS_FILE))
    model = build_model(config)
    load_into(model, state, source=os.path.join(directory, WEIGHTS_FILE))
    return model.eval()


# timm: ``timm:`` specs and upvit model directories (config.json + model.safetensors); that directory
# format is also the answer for any directory no other library claims (its errors say what is missing)
TIMM = Library("timm", from_spec=model_from_timm_spec, build=build_timm_model, save=save_dir,
               owns_dir=lambda directory: True, load_dir=load_dir,
               num_classes=lambda model: getattr(model, "num_classes", None),
               stock_loader=lambda d: f"timm.create_model({read_config(d).name!r}, ...) + strict load_state_dict")
# in the order a directory is offered to them: the catch-all upvit directory last
LIBRARIES = (HF, TIMM)


def library(name: str) -> Library:
    """The library named by a config's ``family``."""
    for lib in LIBRARIES:
        if lib.name == name:
            return lib
    known = ", ".join(lib.name for lib in LIBRARIES)
    raise UpvitError(f"model config family {name!r} is unknown: this upvit builds {known} models")


def library_of(model: nn.Module) -> Library:
    """The library of a model: its config's, else transformers for a transformers model, else timm."""
    config = getattr(model, "upvit_config", None)
    if config is not None:
        return library(config.family)
    return HF if is_hf_model(model) else TIMM


def build_model(config: ModelConfig) -> nn.Module:
    """A model with random weights from its config; the config rides along as ``model.upvit_config``."""
    model = library(config.family).build(config)
    model.upvit_config = config
    return model


def num_classes(model: nn.Module) -> int | None:
    """A classifier's class count (timm's ``num_classes``, transformers' ``config.num_labels``); None for a
    model without classes (text)."""
    if getattr(model, "num_classes", None) is not None:
        return model.num_classes
    return library_of(model).num_classes(model)


def load_dir_any(directory: str) -> nn.Module:
    """The model of a directory, loaded by the first library that claims it."""
    return next(lib for lib in LIBRARIES if lib.owns_dir(directory)).load_dir(directory)


def load_model(spec: str, checkpoint: str | None = None, init_seed: int | None = None) -> nn.Module:
    """Resolve a MODEL argument (a model directory, ``timm:NAME[,k=v...]`` or ``hf:PATH_OR_NAME[,k=v...]``).

    ``init_seed``: the seed of a ``timm:``/``hf:`` spec's random initialisation when the spec names none
    (default 0); a directory's weights are its own."""
    for lib in LIBRARIES:
        if spec.startswith(lib.prefix):
            return lib.from_spec(spec, checkpoint, init_seed)
    if os.path.isdir(spec):
        model = load_dir_any(spec)
        if checkpoint:
            load_into(model, load_state_dict_file(checkpoint), source=checkpoint)
        return model
    if os.path.exists(spec):
        raise UpvitError(f"{spec!r} is a file, not a model directory: pass the directory holding config.json")
    raise UpvitError(f"model {spec!r} not found: pass a model directory (config.json + model.safetensors), timm:NAME "
                     "or hf:PATH")


def model_config(model: nn.Module) -> ModelConfig:
    config = getattr(model, "upvit_config", None)
    if config is None:
        raise UpvitError(
            "this model carries no upvit config: create it with upvit.load / upvit.load_model, "
            "or pass config=ModelConfig(name=..., kwargs=...) to upvit.save"
        )
    return config


__all__ = ["CONFIG_FILE", "CONFIG_FORMAT", "CONFIG_VERSION", "LIBRARIES", "TIMM", "WEIGHTS_FILE", "ModelConfig",
           "build_model", "create_timm_model", "default_data_config", "library", "library_of", "load_into",
           "load_model", "model_config", "model_from_timm_spec", "num_classes", "parse_timm_spec", "read_config",
           "split_top_level", "task_of"]
