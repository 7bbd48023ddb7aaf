"""First-order Taylor importance: how much the loss depends on the weights a channel carries.

The criterion Torch-Pruning users pick most (its ``TaylorImportance``), on this project's sites:

* L = the cross-entropy of the model's logits against the proxy images' **labels**, summed over the
  proxy set (one gradient for the whole set, accumulated in float64 over batches; the model runs in
  eval mode, so dropout and stochastic depth are off). A mean instead of the sum would scale every
  score by 1/N and change no ranking.
* the weights a channel carries are those the adapter lists for it (``channel_weights(site)``: the
  same slices the magnitude baseline uses, so the scorer works for every family that has them; for a
  timm ViT, residual channel c = every residual-width slice at c, attention dim d = its q, k, v rows
  and biases and its proj column, FFN unit j = its fc1 row and bias and its fc2 column).
* ``reduction="weight"`` (default, Torch-Pruning's default, ``multivariable=False``):
  s_c = sum over those weights w of |w * dL/dw|. ``reduction="channel"`` (Torch-Pruning's
  ``multivariable=True``): s_c = |sum over those weights of w * dL/dw|, the first-order change of L
  when all of the channel's weights are zeroed together.

Torch-Pruning averages over the layers of a group and normalises by the group mean; both are a
constant factor within a site here (every channel of a site carries the same tensors), so the keep
sets are the same.

Labels reach the scorer as ``labels=`` (one class index per proxy image), which
:func:`upvit.score` fills from a labelled proxy dataset by itself:

>>> from upvit.data import load_data, sample_proxy                      # doctest: +SKIP
>>> proxy, _ = sample_proxy(load_data("animal-mnist:train")[0], size=256, seed=0)   # doctest: +SKIP
>>> scores = upvit.score(teacher, proxy, method="taylor")               # labels from the dataset  # doctest: +SKIP
>>> scores = upvit.score(teacher, images, method="taylor", labels=y)     # or given explicitly  # doctest: +SKIP
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters.base import Adapter
from ..errors import UpvitError
from ..progress import Scaled, job, note, running
from .api import register_method
from .scores import Scores

REDUCTIONS = ("weight", "channel")


def check_labels(labels: Any, n: int, num_classes: int | None = None) -> torch.Tensor:
    """``labels`` as a long tensor of ``n`` class indices, or one clear error."""
    if labels is None:
        raise UpvitError("method 'taylor' needs the proxy images' labels: pass labels=[...] (one class index per "
                         "image) or a labelled proxy dataset yielding (image, label)")
    t = torch.as_tensor(labels)
    if t.is_floating_point() or t.dim() != 1:
        raise UpvitError("labels must be a 1-D sequence of integer class indices, "
                         f"got {t.dtype} of shape {list(t.shape)}")
    if t.numel() != n:
        raise UpvitError(f"got {t.numel()} labels for {n} proxy images: give one label per image")
    t = t.long()
    if n and (int(t.min()) < 0 or (num_classes is not None and int(t.max()) >= num_classes)):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise UpvitError(f"label {bad} is not a class of this model (classes 0..{(num_classes or 1) - 1})")
    return t


def loss_gradients(adapter: Adapter, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 64, bar: Any = None) -> dict[torch.nn.Parameter, torch.Tensor]:
    """d L / d p (float64) for every floating parameter p, L = summed cross-entropy on the proxy set.

    Frozen parameters (``requires_grad`` off, e.g. a distillation teacher) are differentiated too;
    their flags and ``.grad`` fields are left as they were. ``bar``: told of every batch (inputs done)."""
    model = adapter.model
    params = [p for p in model.parameters() if p.is_floating_point()]
    grads = {p: torch.zeros_like(p, dtype=torch.float64) for p in params}
    flags = [p.requires_grad for p in params]
    device, dtype = params[0].device, params[0].dtype
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].to(device=device, dtype=dtype)
                y = labels[start:start + batch_size].to(device)
                events = adapter.events(x)
                if events.shape[1] != 1:
                    raise UpvitError("method 'taylor' needs one label per input (an image classifier); this model has "
                                     f"{events.shape[1]} outputs per input: use method 'kl'")
                logits = events[:, 0]
                logits = logits if logits.dtype == torch.float64 else logits.float()
                if not torch.isfinite(logits).all():
                    raise UpvitError("the model produced NaN or inf logits on the proxy set: "
                                     "check the weights and inputs")
                loss = F.cross_entropy(logits, y, reduction="sum")
                got = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, got):
                    if g is not None:
                        grads[p] += g.to(torch.float64)
                if bar is not None:
                    bar.update(x.shape[0])
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return grads


def _products(grads: dict[torch.nn.Parameter, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Storage address -> (parameter, w * dL/dw laid out with the parameter's strides)."""
    out = {}
    for p, g in grads.items():
        wg = torch.empty_strided(p.shape, p.stride(), dtype=torch.float64, device=p.device)
        wg.copy_(p.detach().to(torch.float64) * g)
        out[p.untyped_storage().data_ptr()] = (p, wg)
    return out


def _same_slice(t: torch.Tensor, products: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """The slice of w * dL/dw that ``t`` (a view of a parameter) covers, or None if ``t`` is not a
    parameter's view (a buffer: no gradient, contributes nothing)."""
    found = products.get(t.untyped_storage().data_ptr())
    if found is None:
        return None
    p, wg = found
    return wg.as_strided(t.shape, t.stride(), t.storage_offset() - p.storage_offset())


@register_method("taylor")
def taylor_scores(adapter: Adapter, images: torch.Tensor, labels: Any = None, batch_size: int = 64,
                  reduction: str = "weight", device: str | None = None, progress: bool = True, **meta: Any) -> Scores:
    """First-order Taylor importance of every channel (see the module doc); needs the proxy labels.
    ``progress``: a first line with the plan and one bar (with ETA) over the proxy set."""
    if reduction not in REDUCTIONS:
        raise UpvitError(f"reduction must be 'weight' (sum of |w * dL/dw|, Torch-Pruning's default) or 'channel' "
                         f"(|sum of w * dL/dw|), got {reduction!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UpvitError(f"batch_size must be a positive integer, got {batch_size!r}")
    if adapter.divergence != "kl":  # an embedding (headless backbone, sentence encoder): no logits to take CE of
        raise UpvitError(f"method 'taylor' needs a classifier's logits and labels, but this {adapter.family} model "
                         "outputs an embedding: use method 'kl' (exact 1 - cos of the embedding) or 'magnitude'")
    t0 = time.perf_counter()
    y = check_labels(labels, images.shape[0], getattr(adapter.model, "num_classes", None))
    n = int(images.shape[0])
    if not running():
        note(f"Taylor importance of {sum(s.size for s in adapter.topology().sites):,} channels: "
             "one forward and backward "
             f"pass over {n:,} labelled proxy images", progress)
    with job("taylor", 3 * n, unit="img-fwd", show=progress) as bar:  # a backward costs about two forwards
        products = _products(loss_gradients(adapter, images, y, batch_size, bar=Scaled(bar, 3.0)))
    per_site = {}
    for site in adapter.topology().sites:
        total = torch.zeros(site.size, dtype=torch.float64)
        for t, dim in adapter.channel_weights(site.key):
            wg = _same_slice(t, products)
            if wg is None:
                continue
            wg = wg.movedim(dim, 0)
            if wg.shape[0] != site.size:
                raise UpvitError(f"a weight listed for {site.key} ({site.size} channels) has {wg.shape[0]} along its "
                                 "channel axis")
            wg = wg.reshape(site.size, -1).cpu()
            total += (wg.abs() if reduction == "weight" else wg).sum(1)
        per_site[site.key] = total.abs() if reduction == "channel" else total
    info = {**meta, "criterion": "taylor", "method": "taylor", "reduction": reduction,
            "loss": "cross-entropy on the proxy labels, summed over the proxy set", "num_images": int(images.shape[0]),
            "batch_size": batch_size, "model": adapter.describe(), "wall_time_s": round(time.perf_counter() - t0, 3)}
    return Scores.from_sites(adapter.topology(), per_site, info)
