"""What the timm adapters share: building through ``timm.create_model`` (with one-line errors) and
timm's default data config, rebuilding, the attention-backend switch, and the search for a registered
timm architecture of the same shape (the slicing helpers, shared with the Hugging Face adapters, are in
:mod:`upvit.adapters.slicing`; loading and saving timm models is :mod:`upvit.models`)."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from typing import Any, Iterator

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UpvitError


def import_timm():
    from .._compat import import_timm as _import

    return _import()


def create_timm_model(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with one-line errors."""
    timm = import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UpvitError(f"unknown timm model {name!r}{hint}: see timm.list_models()")
    try:
        return timm.create_model(name, pretrained=False, **(kwargs or {}))
    except TypeError as e:
        raise UpvitError(f"timm model {name!r} rejected its arguments {kwargs}: {e}") from None


def default_data_config(model: nn.Module) -> dict[str, Any]:
    """The data config of a timm model, from its ``pretrained_cfg`` (ImageNet defaults where it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "input_size": list(cfg.get("input_size", (3, 224, 224))),
        "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": cfg.get("crop_pct", 0.875),
        "interpolation": cfg.get("interpolation", "bicubic"),
    }


def staged_unit_moves(blocks, where: list[tuple[int, int]], unit_parts: dict[str, tuple[str, ...]],
                      stages: str) -> dict[str, str | None]:
    """Depth surgery of a staged timm model: the :func:`move_sublayers` map that gives new block k of a
    stage the sub-layers of the stage's k-th re-paired attention and FFN units (``blocks``: the
    :class:`~upvit.topology.PairedBlock` list in order; ``where[b]``: (stage, index) of source block b;
    ``stages``: the attribute holding the stages, ``"layers"`` for Swin, ``"stages"`` for PVTv2).
    Sub-layers of removed units map to None (dropped)."""
    moves: dict[str, str | None] = {f"{stages}.{s}.blocks.{i}.{part}.": None for s, i in where
                                    for parts in unit_parts.values() for part in parts}
    position: dict[int, int] = {}
    for pair in blocks:
        k = position.get(pair.stage, 0)
        position[pair.stage] = k + 1
        for kind, unit in (("attn", pair.attn), ("ffn", pair.ffn)):
            s, i = where[int(unit.split(".")[1])]
            for part in unit_parts[kind]:
                moves[f"{stages}.{s}.blocks.{i}.{part}."] = f"{stages}.{s}.blocks.{k}.{part}."
    return moves


def exact_ratio(hidden: int, dim: int) -> float:
    """An ``mlp_ratio`` with ``int(dim * ratio) == hidden`` exactly (timm's rounding)."""
    ratio = hidden / dim
    while int(dim * ratio) < hidden:  # float rounding: nudge up until timm's int(dim * ratio) is exact
        ratio = math.nextafter(ratio, math.inf)
    if int(dim * ratio) != hidden:
        raise UpvitError(f"no mlp_ratio gives {hidden} FFN units at width {dim} in timm")
    return ratio


SKIP_INIT = {"weight_init": "skip"}


def rebuild_from_state(model: nn.Module, base_name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor],
                       init_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(base_name, **kwargs)`` built on the meta device, then the sliced ``state``
    assigned strictly; the attention backend choice (fused or not) and train/eval mode are kept.
    ``init_kwargs`` (default ``weight_init='skip'``) are passed to the constructor only for building:
    families whose constructor has no ``weight_init`` (PVTv2) pass ``{}`` (on the meta device their
    initialisation costs nothing anyway)."""
    init = SKIP_INIT if init_kwargs is None else init_kwargs
    new = create_timm_model(base_name, {**kwargs, "device": "meta", **init})
    expected = new.state_dict()
    if set(expected) != set(state):
        missing = sorted(set(expected) ^ set(state))
        raise UpvitError(f"the rebuilt timm model and the sliced weights disagree on {missing[0]}: "
                         "this variant is not supported for pruning yet")
    for key, tensor in state.items():
        if expected[key].shape != tensor.shape:
            raise UpvitError(f"sliced {key} has shape {tuple(tensor.shape)}, the rebuilt model expects "
                             f"{tuple(expected[key].shape)}: this variant is not supported for pruning yet")
    new.load_state_dict(state, strict=True, assign=True)
    device = next(iter(state.values())).device
    # non-persistent buffers (relative-position indices, attention masks) are not in the state dict:
    # materialise them and let the modules fill them
    for module in new.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device=device)
        init = getattr(module, "init_non_persistent_buffers", None)
        if callable(init):
            init()
    left = [k for k, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if left:
        raise UpvitError(f"the rebuilt timm model has {left[0]} outside its state dict: this variant is not "
                         "supported for pruning yet")
    for name, mod in model.named_modules():  # keep the attention backend choice (fused or not)
        if hasattr(mod, "fused_attn"):
            try:
                new.get_submodule(name).fused_attn = mod.fused_attn
            except AttributeError:
                pass
    new.train(model.training)
    return new


def output_divergence(model: nn.Module, problems: list[str]) -> str:
    """How the scoring engines compare a timm model's outputs: ``"kl"`` for a classifier (its forward gives
    logits), ``"cosine"`` for a headless backbone (``num_classes=0``: its forward gives the pooled embedding,
    whose softmax means nothing; 1 - cos of the embedding, as for sentence encoders). A headless model
    without pooling (``global_pool=''``: per-token features) adds a line to ``problems``."""
    if getattr(model, "num_classes", None) != 0:
        return "kl"
    if not getattr(model, "global_pool", ""):
        problems.append("a headless model without pooling (num_classes=0, global_pool=''): its output is per-token "
                        "features, not one embedding; build it with global_pool='token' or 'avg'")
    return "cosine"


def base_config(model: nn.Module, default_kwargs: dict[str, Any]):
    """The model's ModelConfig, or one reconstructed from timm's pretrained_cfg."""
    config = getattr(model, "upvit_config", None)
    if config is not None:
        return config
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise UpvitError("this timm model carries neither an upvit config nor a timm architecture name: "
                         "load it with upvit.load_model('timm:NAME,...') so it can be rebuilt")
    return ModelConfig(name=arch, kwargs=dict(default_kwargs), data_config=default_data_config(model))


def new_config(base, kwargs: dict[str, Any], new: nn.Module, candidates: list[str]):
    """A copy of ``base`` for the rebuilt model: new kwargs and the registered timm architecture with
    exactly this shape, if any (``timm_equivalent`` and, where needed, ``extra['timm_equivalent_kwargs']``)."""
    config = copy.deepcopy(base)
    config.kwargs = kwargs
    config.timm_equivalent, equivalent_kwargs = timm_equivalent(new, kwargs, base.name, candidates)
    config.extra = dict(config.extra)
    config.extra.pop("plan", None)
    if equivalent_kwargs:
        config.extra["timm_equivalent_kwargs"] = equivalent_kwargs
    else:
        config.extra.pop("timm_equivalent_kwargs", None)
    return config


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily switch timm attention modules to their explicit matmul path."""
    changed = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    for m in changed:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True


# ---------------------------------------------------------------------------- equivalent search
# kwargs that do not change the architecture and are passed on to a candidate; any other kwarg beyond
# the shape ones makes the model non-standard (no equivalent reported)
PASS_KWARGS = ("img_size", "in_chans", "num_classes")
SHAPE_KWARGS = ("embed_dim", "embed_dims", "num_heads", "mlp_ratio", "mlp_ratios", "depth", "depths", "patch_size",
                "head_dim", "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
                "window_size", "sr_ratios")


def _signature(model: nn.Module) -> tuple:
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    extras = tuple((name, str(getattr(model, name))) for name in
                   ("global_pool", "num_prefix_tokens", "no_embed_class", "dynamic_img_size") if hasattr(model, name))
    acts = tuple(sorted({type(m).__name__ for m in model.modules() if "act" in type(m).__name__.lower()
                         or type(m).__name__ in ("GELU", "ReLU", "SiLU")}))
    eps = tuple(sorted({float(m.eps) for m in model.modules() if isinstance(m, nn.LayerNorm)}))
    return (type(model), shapes, extras, acts, eps)


_SIGNATURES: dict[tuple[str, str], tuple | None] = {}  # (name, kwargs as JSON) -> signature, built once


def _candidate_signature(name: str, passed_json: str) -> tuple | None:
    """Signature of ``create_model(name, **passed)`` built on the meta device; None if it cannot be built."""
    if (name, passed_json) not in _SIGNATURES:
        _SIGNATURES[name, passed_json] = None  # an unknown or incompatible candidate is simply not equivalent
        for init in (SKIP_INIT, {}):  # not every timm family takes weight_init (PVTv2 does not)
            try:
                cand = create_timm_model(name, {**json.loads(passed_json), "device": "meta", **init})
            except Exception:
                continue
            _SIGNATURES[name, passed_json] = _signature(cand)
            break
    return _SIGNATURES[name, passed_json]


def timm_equivalent(model: nn.Module, kwargs: dict, source_name: str, candidates: list[str]) -> tuple[str | None, dict]:
    """``(name, kwargs)`` of a registered timm architecture whose ``create_model(name, **kwargs)`` has
    exactly this model's state-dict shapes and structure, or ``(None, {})``. Candidates are built on
    the meta device (no memory, no init). ``kwargs`` holds only img_size/in_chans/num_classes overrides
    that differ from the candidate's defaults (empty for standard 224px ImageNet models)."""
    if set(kwargs) - set(PASS_KWARGS) - set(SHAPE_KWARGS):
        return None, {}
    passed = {k: kwargs[k] for k in PASS_KWARGS if k in kwargs}
    prefix = source_name.split("_")[0]
    names = [source_name] + sorted(candidates, key=lambda n: n.split("_")[0] != prefix)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    distilled = hasattr(model, "head_dist")
    sig = _signature(model)
    for name in dict.fromkeys(names):
        found = re.search(r"patch(\d+)", name)
        if (found and patch is not None and int(found.group(1)) != patch) or ("distilled" in name) != distilled:
            continue  # cheap filter before building anything
        if _candidate_signature(name, json.dumps(passed, sort_keys=True)) == sig:
            if passed and _candidate_signature(name, "{}") == sig:
                passed = {}
            return name, passed
    return None, {}
