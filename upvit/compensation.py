"""Compensation: refit the pruned model's layers so that they reproduce the original's outputs.

One-shot removal throws away what the removed channels carried. After a plan is applied, the layers
that *read* a pruned site can be refitted on the proxy set so that their outputs match the original
model's as well as the kept channels allow (least-squares reconstruction of the consumer layer; the
idea behind OBS-, ZipLM- and FLAP-style compensation, written here for the adapter contract):

* the layers refitted are those whose input columns are a site's channels and whose output is not
  itself a pruned attention/FFN site: the attention output projection (reads ``attn.b``), the FFN's
  second linear (reads ``ffn.b``), and the readers of residual channels that write something else
  than an attention or FFN site (the classifier head, Swin's patch merging). They are found from the
  adapter's channel declaration (:meth:`Adapter.consumers`), so every family that declares its
  channels gets compensation with no code of its own;
* target: the original layer's output on the same proxy inputs, restricted to the rows the plan keeps;
  input: the pruned model's own input to the layer, computed with every earlier layer already
  compensated (sequential reconstruction in forward order, so errors do not compound). The model runs
  through the adapter's staged forward, so where the head reads only some tokens (a ViT's class
  token) the last FFN is fitted on those tokens only: the others never reach the output;
* ``lsq``: weight and bias by ridge least squares, the ridge pulling towards the plainly sliced weights
  (so the refit never increases the layer's error on the proxy set: the sliced weights are a candidate
  of the same objective); ``bias``: the weights stay, the bias absorbs the mean of what is missing.
  A refit is kept only if it lowers the layer's reconstruction error (keep-all plans stay bit-identical).

Not refitted: layers that write a pruned site (qkv, fc1: their outputs are chosen channels, not a
reconstruction target), convolutions (PVTv2's spatial reduction), and a classifier tied to the input
embedding (GPT-2's LM head), which are left as sliced. Plans that remove whole units are refused:
the layers would not correspond one to one.

>>> small = upvit.prune(model, plan)                                         # doctest: +SKIP
>>> report = compensate(model, small, plan, proxy_images, mode="lsq")        # doctest: +SKIP
>>> report.layers[0].error_before, report.layers[0].error_after             # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .adapters.base import Inputs, batch_len, batch_slice, batch_to, forward_from
from .errors import UpvitError

MODES = ("none", "bias", "lsq")
DEFAULT_RIDGE = 1e-3  # relative to the mean diagonal of the inputs' second moment


@dataclass
class LayerFit:
    """One refitted layer: its module name, the site its inputs are, and its summed squared error
    against the original's output on the proxy set before (sliced weights) and after the refit."""

    name: str
    site: str
    error_before: float
    error_after: float
    changed: bool


@dataclass
class CompensationReport:
    mode: str
    proxy: int
    seconds: float = 0.0
    layers: list[LayerFit] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "proxy": self.proxy, "seconds": round(self.seconds, 3),
                "layers": [asdict(layer) for layer in self.layers], "skipped": self.skipped}

    def summary(self) -> str:
        changed = sum(layer.changed for layer in self.layers)
        before = sum(layer.error_before for layer in self.layers)
        after = sum(layer.error_after for layer in self.layers)
        ratio = after / before if before > 0 else 1.0
        return (f"compensation {self.mode}: {changed} of {len(self.layers)} layers refitted on {self.proxy} proxy "
                f"samples, reconstruction error x{ratio:.3f} ({self.seconds:.1f} s)")


@dataclass(frozen=True)
class _Layer:
    name: str          # module path, the same in the source and the pruned model
    site: str          # the site whose channels are the layer's inputs
    rows: torch.Tensor | None  # the source rows the pruned layer keeps (None: all)
    transposed: bool   # weight stored [in, out] (transformers' Conv1D)


class _Stop(Exception):
    """Raised by a capture hook once the layer of interest has run: the rest of the forward is not needed."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UpvitError(f"compensation mode {mode!r} is unknown: choose one of {', '.join(MODES)}")
    return mode


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _layers(source: nn.Module, plan, adapter) -> tuple[list[_Layer], list[str]]:
    """The layers to refit (unordered) and one line per consumer that is left as sliced, with why."""
    declared = adapter.channel_slices()
    if declared is None:
        raise UpvitError(f"compensation needs the {adapter.family} adapter's channel declarations, which it does not "
                         "have yet: prune without --compensate")
    writes: dict[str, str] = {}  # weight key -> site whose channels are its output rows
    for site, slices in declared.items():
        for sl in slices:
            if sl.role == "out" and sl.key.endswith(".weight"):
                writes[sl.key] = site
    modules = dict(source.named_modules())
    layers, skipped, seen = [], [], set()
    for site, slices in declared.items():
        for sl in slices:
            if sl.role != "in" or not sl.key.endswith(".weight") or sl.key in seen:
                continue
            seen.add(sl.key)
            out_site = writes.get(sl.key)
            if out_site is not None and not out_site.startswith("res."):
                continue  # qkv / fc1: writers of a pruned site
            name = sl.key[: -len(".weight")]
            module = modules.get(name)
            if module is None or not (isinstance(module, nn.Linear) or _is_conv1d(module)):
                skipped.append(f"{name}: not a linear layer ({type(module).__name__}), left as sliced")
                continue
            if _shares_weight(source, module.weight):
                skipped.append(f"{name}: its weight is tied to another parameter, left as sliced")
                continue
            rows = None
            if out_site is not None:
                out_sl = next(s for s in declared[out_site] if s.key == sl.key and s.role == "out")
                rows = out_sl.index(torch.as_tensor(plan.keep[out_site], dtype=torch.long))
            layers.append(_Layer(name, site, rows, _is_conv1d(module)))
    return layers, skipped


def _shares_weight(model: nn.Module, weight: torch.Tensor) -> bool:
    return sum(1 for _, p in model.named_parameters(remove_duplicate=False) if p is weight) > 1


def _forward_order(adapter, x: Inputs, names: list[str]) -> list[str]:
    """Those of ``names`` that the model's forward calls, in the order it first calls them."""
    modules = dict(adapter.model.named_modules())
    order: list[str] = []
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
               for n in names]
    try:
        with torch.no_grad():
            forward_from(adapter, adapter.begin(x), 0)
    finally:
        for h in handles:
            h.remove()
    return order


def _capture(adapter, x: Inputs, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of module ``name`` for inputs ``x``, each flattened to ``[rows, features]``
    (the forward stops there)."""
    module = dict(adapter.model.named_modules())[name]
    got: list[torch.Tensor] = []

    def hook(m, args, output):
        got.extend(t.detach().reshape(-1, t.shape[-1]) for t in (args[0], output))
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            forward_from(adapter, adapter.begin(x), 0)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise UpvitError(f"layer {name} did not run in the forward pass: compensation cannot refit it")
    return got[0], got[1]


def _weight_bias(module: nn.Module, transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = module.weight.detach()
    return (w.t() if transposed else w), (module.bias.detach() if module.bias is not None else None)


def _assign(module: nn.Module, transposed: bool, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        module.weight.copy_((weight.t() if transposed else weight).to(module.weight.dtype))
        if bias is not None and module.bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype))


def _error(e0: float, R: torch.Tensor, G: torch.Tensor, delta: torch.Tensor) -> float:
    """sum ||y - (theta0 + delta) a||^2 from e0 = sum ||r0||^2, R = sum r0 a^T, G = sum a a^T, where
    r0 = y - theta0 a is the sliced layer's residual (written around theta0, so a keep-all layer, whose
    r0 is exactly 0, stays exactly at 0)."""
    return max(0.0, float(e0 - 2 * (delta * R).sum() + ((delta @ G) * delta).sum()))  # >= 0 up to rounding


def compensate(source: nn.Module, pruned: nn.Module, plan, proxy: Inputs, mode: str = "lsq",
               ridge: float = DEFAULT_RIDGE, batch_size: int = 64, exclude: Sequence[str] = ()) -> CompensationReport:
    """Refit ``pruned`` (made from ``source`` by ``plan``) in place on ``proxy`` (images ``[N, C, H, W]``
    or a dict of token tensors); see the module doc. ``exclude``: module names left as sliced (e.g.
    ``("head",)``, to measure the head's share). Returns what was refitted and how much the
    reconstruction error fell, layer by layer."""
    from .adapters import get_adapter

    check_mode(mode)
    t0 = time.time()
    n = batch_len(proxy) if proxy is not None else 0
    report = CompensationReport(mode, n)
    if mode == "none":
        return report
    if n == 0:
        raise UpvitError("compensation needs proxy samples: give the proxy set (--data) or use --compensate none")
    if plan.units is not None:
        raise UpvitError("compensation does not apply to plans that remove whole blocks: prune the depth "
                         "separately, or use --compensate none")
    if ridge < 0:
        raise UpvitError(f"ridge must be >= 0, got {ridge}")
    src_adapter, new_adapter = get_adapter(source), get_adapter(pruned)
    layers, report.skipped = _layers(source, plan, src_adapter)
    unknown = set(exclude) - {layer.name for layer in layers}
    if unknown:
        raise UpvitError(f"exclude names {sorted(unknown)[0]}, which is not a layer compensation refits: choose from "
                         f"{', '.join(layer.name for layer in layers)}")
    layers = [layer for layer in layers if layer.name not in exclude]
    param = next(source.parameters())
    inputs = batch_to(proxy, param.device, param.dtype)
    batches = [batch_slice(inputs, s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    by_name = {layer.name: layer for layer in layers}
    was = source.training, pruned.training
    source.eval()
    pruned.eval()
    new_modules = dict(pruned.named_modules())
    try:
        order = _forward_order(src_adapter, batches[0], list(by_name))
        report.skipped += [f"{name}: not used by the model's output, left as sliced" for name in by_name
                           if name not in order]
        for name in order:
            layer = by_name[name]
            report.layers.append(_refit(layer, new_modules[name], src_adapter, new_adapter, batches, mode, ridge))
    finally:
        source.train(was[0])
        pruned.train(was[1])
    report.seconds = time.time() - t0
    return report


def _rows_of(x: Inputs, rows: int) -> torch.Tensor | None:
    """Weights (1 real token, 0 padding) for the ``rows`` flattened positions of a layer's activation,
    when the inputs carry an attention mask that the rows follow one to one; None otherwise."""
    if isinstance(x, dict) and "attention_mask" in x:
        mask = x["attention_mask"]
        if mask.numel() == rows:
            return mask.reshape(-1).to(torch.float64)
    return None


def _refit(layer: _Layer, module: nn.Module, src, new, batches: list[Inputs], mode: str, ridge: float) -> LayerFit:
    """Accumulate the moments of (pruned input, sliced layer's residual) over the proxy batches, solve,
    assign."""
    w0, b0 = _weight_bias(module, layer.transposed)
    has_bias = b0 is not None
    d_in = w0.shape[1] + (1 if has_bias else 0)
    G = torch.zeros(d_in, d_in, dtype=torch.float64)
    R = torch.zeros(w0.shape[0], d_in, dtype=torch.float64)
    e0 = 0.0
    for x in batches:
        y = _capture(src, x, layer.name)[1]
        if layer.rows is not None:
            y = y.index_select(1, layer.rows.to(y.device))
        a, y0 = _capture(new, x, layer.name)
        # the sliced layer's residual, from its own output: exactly 0 where nothing was removed upstream
        r0 = (y - y0).to(torch.float64)
        a = a.to(torch.float64)
        if has_bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
        w = _rows_of(x, a.shape[0])
        if w is not None:
            a, r0 = a * w[:, None].sqrt(), r0 * w[:, None].sqrt()
        G += (a.t() @ a).cpu()
        R += (r0.t() @ a).cpu()
        e0 += float((r0 * r0).sum())
    if mode == "lsq":
        lam = ridge * float(torch.diagonal(G).mean()) if ridge > 0 else 0.0
        eye = torch.eye(d_in, dtype=torch.float64)
        # minimise E(theta0 + delta) + lam ||delta||^2: delta (G + lam I) = R (G symmetric: solve transposed)
        delta = torch.linalg.lstsq(G + lam * eye, R.t()).solution.t()
    else:
        delta = torch.zeros_like(R)
        if has_bias:  # "bias": the bias absorbs the mean of what the sliced weights miss
            delta[:, -1] = R[:, -1] / G[-1, -1]
    after = _error(e0, R, G, delta)
    changed = bool(torch.isfinite(delta).all()) and bool(delta.abs().sum() > 0) and after < e0
    if changed:
        theta = (torch.cat([w0, b0[:, None]], 1) if has_bias else w0).to(torch.float64).cpu() + delta
        weight = theta[:, :-1] if has_bias else theta
        _assign(module, layer.transposed, weight.to(w0.device), theta[:, -1].to(w0.device) if has_bias else None)
    return LayerFit(layer.name, layer.site, e0, after if changed else e0, changed)


__all__ = ["CompensationReport", "LayerFit", "MODES", "DEFAULT_RIDGE", "check_mode", "compensate"]
