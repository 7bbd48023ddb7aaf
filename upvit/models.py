"""Model specs and configs: how a model is named, built and described.

A MODEL argument is either a model directory written by :func:`upvit.save` (``config.json`` +
``model.safetensors``; or a Hugging Face ``save_pretrained`` directory, see :mod:`upvit.hf`),
``hf:PATH_OR_NAME[,key=value,...]`` or ``timm:NAME`` with optional constructor kwargs after commas, values as
JSON literals, e.g. ``timm:vit_base_patch16_224,img_size=28,patch_size=4,in_chans=1,num_classes=10``.
A ``timm:`` model gets random weights unless a checkpoint (a state dict in ``.safetensors`` or
``.pth``) is given. They are seeded (``init_seed=N`` in the spec, default 0; ``upvit train`` uses its
``--seed``), so the same spec gives the same weights in every process: ``upvit score timm:NAME`` and a later
``upvit prune timm:NAME`` see one model, and the scores' fingerprint check passes.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UpvitError

CONFIG_FORMAT = "upvit-model"
CONFIG_VERSION = 1


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model: ``timm.create_model(timm_name, **timm_kwargs)``.

    For Hugging Face models (``family == "hf"``, see :mod:`upvit.hf`) ``timm_name`` holds the
    transformers class name; the architecture itself lives in HF's own ``config.json``."""

    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "timm"
    data_config: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    timm_equivalent: str | None = None  # a registered timm architecture with exactly this shape
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: training run, plan, teacher ...

    def to_dict(self) -> dict[str, Any]:
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if d.get("format") != CONFIG_FORMAT:
            raise UpvitError("config.json is not an upvit model config (missing format 'upvit-model')")
        if d.get("version", 0) > CONFIG_VERSION:
            raise UpvitError(f"config.json has version {d['version']}, newer than this upvit ({CONFIG_VERSION}): upgrade upvit")
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


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


def parse_timm_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``timm:NAME,key=value,...`` -> (NAME, kwargs)."""
    if not spec.startswith("timm:"):
        raise UpvitError(f"{spec!r} is not a timm spec: write timm:NAME[,key=value,...]")
    name, *pairs = split_top_level(spec[len("timm:"):])
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UpvitError(f"bad model argument {pair!r} in {spec!r}: write key=value")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value  # bare strings, e.g. global_pool=token
    return name.strip(), kwargs


def create_timm_model(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with one-line errors."""
    from ._compat import import_timm

    timm = import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UpvitError(f"unknown timm model {name!r}{hint}: see timm.list_models()")
    try:
        return timm.create_model(name, pretrained=False, **(kwargs or {}))
    except TypeError as e:
        raise UpvitError(f"timm model {name!r} rejected its arguments {kwargs}: {e}") from None


def build_model(config: ModelConfig) -> nn.Module:
    """A model with random weights from its config; the config rides along as ``model.upvit_config``."""
    model = create_timm_model(config.timm_name, config.timm_kwargs)
    model.upvit_config = config
    return model


def default_data_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "input_size": list(cfg.get("input_size", (3, 224, 224))),
        "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": cfg.get("crop_pct", 0.875),
        "interpolation": cfg.get("interpolation", "bicubic"),
    }


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
    model.upvit_config = ModelConfig(timm_name=name, timm_kwargs=kwargs, data_config=data_config)
    if checkpoint:
        from .io import load_state_dict_file

        load_into(model, load_state_dict_file(checkpoint), source=checkpoint)
    return model


def _adapter_input_size(model: nn.Module) -> tuple[int, ...] | None:
    from .adapters import get_adapter

    try:
        return get_adapter(model).input_size()
    except UpvitError:
        return None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load a state dict, with one clear line on mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise UpvitError(f"weights in {source} do not fit the model: {detail[:400]}") from None


def load_model(spec: str, checkpoint: str | None = None, init_seed: int | None = None) -> nn.Module:
    """Resolve a MODEL argument (a model directory, ``timm:NAME[,k=v...]`` or ``hf:PATH_OR_NAME[,k=v...]``).

    ``init_seed``: the seed of a ``timm:``/``hf:`` spec's random initialisation when the spec names none
    (default 0); a directory's weights are its own."""
    if spec.startswith("timm:"):
        return model_from_timm_spec(spec, checkpoint, init_seed=init_seed)
    if spec.startswith("hf:"):
        from .hf import load_hf_spec

        return load_hf_spec(spec, checkpoint, init_seed=init_seed)
    if os.path.isdir(spec):
        from .io import load

        model = load(spec)
        if checkpoint:
            from .io import load_state_dict_file

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
            "or pass config=ModelConfig(timm_name=..., timm_kwargs=...) to upvit.save"
        )
    return config
