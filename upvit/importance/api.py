"""``upvit.score``: one entry point over all scoring methods.

A method is a function ``fn(adapter, images, **options) -> Scores`` registered under a name with
:func:`register_method` in its own module; :data:`METHOD_MODULES` says which module defines which
name, so a method's module is imported only when it is asked for.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import UpvitError
from .scores import Scores

MethodFn = Callable[..., Scores]
METHODS: dict[str, MethodFn] = {}
PERSISTING: set[str] = {"kl"}  # methods that write ``out`` themselves, site by site (and can resume)
METHOD_MODULES = {
    "kl": "upvit.importance.kl",
    "fisher": "upvit.importance.fisher",
    "hybrid": "upvit.importance.hybrid",
    "magnitude": "upvit.importance.baselines",
    "random": "upvit.importance.baselines",
    "taylor": "upvit.importance.taylor",
    "greedy": "upvit.importance.greedy",
}
LABELLED: set[str] = {"taylor"}  # methods that need the proxy images' labels (``labels=``)
DATA_FREE: set[str] = {"magnitude", "random"}  # methods that read no proxy data (``proxy`` may be None)


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    def decorator(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return decorator


def get_method(name: str) -> MethodFn:
    if name not in METHODS and name in METHOD_MODULES:
        try:
            importlib.import_module(METHOD_MODULES[name])
        except ModuleNotFoundError as e:
            if e.name != METHOD_MODULES[name]:
                raise
    if name not in METHODS:
        known = sorted(set(METHODS) | {n for n, mod in METHOD_MODULES.items() if importlib.util.find_spec(mod)})
        raise UpvitError(f"unknown scoring method {name!r}: choose one of {', '.join(known)}")
    return METHODS[name]


def proxy_tensor(proxy: torch.Tensor | Dataset | DataLoader, input_size: tuple[int, ...] | None = None) -> torch.Tensor:
    """All proxy images as one float tensor [N, C, H, W]; labels, if any, are dropped. A text proxy
    set (samples whose inputs are dicts of token tensors) comes back as one dict of stacked tensors.

    Refuses an empty proxy set, images of the wrong size and non-finite pixels with one clear line.
    """
    if isinstance(proxy, torch.Tensor):
        images = proxy
    else:
        loader = proxy if isinstance(proxy, DataLoader) else DataLoader(proxy, batch_size=256, shuffle=False)
        chunks = []
        for batch in loader:
            chunks.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
        if not chunks:
            raise UpvitError("the proxy set is empty: give at least one image")
        if isinstance(chunks[0], dict):
            from ..adapters.base import batch_cat

            return trim_padding(batch_cat(chunks))
        images = torch.cat(chunks)
    if images.numel() == 0 or images.shape[0] == 0:
        raise UpvitError("the proxy set is empty: give at least one image")
    if images.dim() != 4:
        raise UpvitError(f"proxy images must be a [N, C, H, W] batch, got shape {list(images.shape)}")
    if input_size is not None and tuple(images.shape[1:]) != tuple(input_size):
        raise UpvitError(f"proxy images are {list(images.shape[1:])} but the model expects {list(input_size)}: "
                         "use the model's evaluation transform (upvit.data.load_data with its data_config)")
    if not torch.isfinite(images).all():
        raise UpvitError("the proxy images contain NaN or inf values: check the data and its transform")
    return images.float()


def trim_padding(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Token inputs without the trailing positions that are padding in every sample (they change no
    output that counts: padded keys are masked, padded positions have event weight 0)."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] == 0:
        return inputs
    used = mask.ne(0).any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else mask.shape[1]
    return {k: v[:, :length] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v for k, v in inputs.items()}


def proxy_labels(proxy: torch.Tensor | Dataset | DataLoader | dict) -> torch.Tensor | None:
    """The labels of a labelled proxy dataset or loader (batches of ``(image, label)``), in order;
    None for a bare image tensor or an unlabelled dataset."""
    if isinstance(proxy, (torch.Tensor, dict)):
        return None
    loader = proxy if isinstance(proxy, DataLoader) else DataLoader(proxy, batch_size=256, shuffle=False)
    chunks = []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            return None
        chunks.append(torch.as_tensor(batch[1]).view(-1))
    return torch.cat(chunks) if chunks else None


def score(model: nn.Module, proxy: torch.Tensor | Dataset | DataLoader | dict | None, method: str = "kl",
          out: str | None = None, resume: bool = False, proxy_meta: dict[str, Any] | None = None,
          meta: dict[str, Any] | None = None, labels: Any = None, **options: Any) -> Scores:
    """Importance of every channel of every site of ``model`` (see docs/method.md section 2).

    ``out``: also write the scores there (the exact method persists site by site and continues an
    interrupted run with ``resume=True``). ``labels``: the proxy images' class indices, for methods
    that need them (``taylor``); ``proxy`` may be None for the data-free methods (``magnitude``,
    ``random``). Labels are taken from the proxy dataset when it yields ``(image, label)`` pairs
    and no labels are given. ``proxy_meta`` (how the proxy set was drawn) and ``meta``
    (e.g. the command line) are recorded in the scores' metadata with the model's topology.

    >>> import upvit, torch
    >>> model = upvit.load("upvit/assets/teacher")                      # doctest: +SKIP
    >>> scores = upvit.score(model, torch.randn(8, 1, 28, 28))          # doctest: +SKIP
    >>> scores["res.0"].shape, scores["ffn.0"].shape                    # doctest: +SKIP
    (torch.Size([192]), torch.Size([768]))
    """
    import time

    from .. import distributed as dist_utils
    from ..adapters import get_adapter
    from ..fingerprint import FINGERPRINT_KEY, model_fingerprint

    t0 = time.time()
    adapter = get_adapter(model)
    fn = get_method(method)
    if proxy is None and method not in DATA_FREE:
        raise UpvitError(f"method {method!r} needs proxy inputs: give a tensor, dataset or loader of proxy images")
    inputs = proxy if isinstance(proxy, dict) or proxy is None else proxy_tensor(proxy, adapter.input_size())
    meta = {**(meta or {}), FINGERPRINT_KEY: model_fingerprint(model)}  # `upvit prune` refuses other models' scores
    if method in PERSISTING:
        return fn(adapter, inputs, out=out, resume=resume, proxy_meta=proxy_meta, meta=meta, **options)
    if method in LABELLED:
        options["labels"] = labels if labels is not None else proxy_labels(proxy)
    if resume:
        raise UpvitError(f"resume applies to the exact method 'kl' only; method {method!r} starts over (drop resume)")
    scores = fn(adapter, inputs, **options)
    scores.meta.update({**meta, "criterion": scores.meta.get("criterion", method), "proxy": dict(proxy_meta or {}),
                        "model": adapter.describe(), "topology": adapter.topology().to_dict(),
                        "wall_time_s": round(time.time() - t0, 3)})
    if out and dist_utils.is_main():
        scores.save(out)
    return scores
