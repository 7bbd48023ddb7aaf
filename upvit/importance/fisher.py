"""Second-order estimate of the KL score: the Fisher information of a multiplicative channel mask.

For the removal of channel c, write p(m) for the model's output distribution with keep-mask m on
that channel (m = 1: original model, m = 0: channel removed; the adapter's masks interpolate
between the two, residual channels included, whose LayerNorms are renormalised with mask weights).
KL(q || p(m)) vanishes at m = 1 together with its gradient, and its second derivative there is the
Fisher information F_c = E_{y~q}[(d log p(y) / d m_c)^2]. The quadratic term of the expansion at
the removal (delta m = -1) gives

    s_c  ~  1/2 * sum_i F_{i,c}      (summed over the proxy images, like the exact score).

Per-sample masks ``[B, size]`` on every site at once make one backward pass of sum_i v_i . z_i
(z: logits) return d(v_i . z_i) / d m_{i,c} for every image i and every channel c of every
component. Since d log p(y) = d z_y - q . dz, F_i = J_i^T (diag q_i - q_i q_i^T) J_i; the expectation
over y ~ q_i is exact (one backward per eigen-component of that covariance, K - 1 of them, or the
``rank`` largest) when there are at most ``max_exact_classes`` classes, and a seeded Monte-Carlo
average over ``num_samples`` classes drawn from q_i otherwise. Sums over images are accumulated in float64.

Engines: "masks" puts the ``[B, size]`` masks in the graph (per-sample masked LayerNorms in every
backward pass). "probes" (default where the adapter supports it) runs the plain model and records,
at each point where a mask acts, the activation; at m = 1 the gradient w.r.t. a multiplicative mask
is sum over tokens of (gradient x activation) there, plus, for a renormalised LayerNorm, the terms
from d mean / d m_c and d var / d m_c (:meth:`MaskProbe.mask_grad`). Same values up to float rounding;
the last block's FFN runs on the head's tokens only (the others' gradients are zero).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..adapters.base import Adapter, Masks, forward_from
from ..errors import UpvitError
from ..progress import Scaled, job, note, running
from .api import register_method
from .directions import class_directions
from .local import check_attention_option, local_attention_sums
from .scores import Scores

CLASS_MODES = ("auto", "exact", "sample")
ENGINES = ("auto", "probes", "masks")

GradFn = Callable[[torch.Tensor, bool], dict[str, torch.Tensor]]


def _check_options(batch_size: int, classes: str, num_samples: int, max_exact_classes: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UpvitError(f"batch_size must be a positive integer, got {batch_size!r}")
    if classes not in CLASS_MODES:
        raise UpvitError(f"classes must be one of {', '.join(CLASS_MODES)}, got {classes!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise UpvitError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(max_exact_classes, int) or max_exact_classes < 1:
        raise UpvitError(f"max_exact_classes must be a positive integer, got {max_exact_classes!r}")


def fisher_sums(adapter: Adapter, images: torch.Tensor, batch_size: int = 64, classes: str = "auto",
                num_samples: int = 1, max_exact_classes: int = 32, seed: int = 0, rank: int | None = None,
                engine: str = "auto", bar: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-site sums over images of the Fisher information F_{i,c} (float64), and a record of the run.

    ``engine``: how d(v . z_i)/d m_{i,c} is obtained ("auto": "probes" where the adapter has them).
    "masks" differentiates through ``[B, size]`` masks on every site; "probes" runs the plain model
    and forms the same gradients at m = 1 from the gradients at the adapter's :class:`MaskProbe`
    points (no per-sample masked LayerNorms in the graph; same values up to float rounding). ``bar``: told of
    every batch (``bar.update(inputs done)``)."""
    _check_options(batch_size, classes, num_samples, max_exact_classes)
    if engine not in ENGINES:
        raise UpvitError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "masks" and adapter.probing() is not None:
        engine, forward = "probes", lambda x: _probes_forward(adapter, x)
    elif engine == "probes":
        raise UpvitError(f"the {adapter.family} adapter records no mask probes: use engine='masks' (or 'auto')")
    else:
        engine, forward = "masks", lambda x: _masks_forward(adapter, x)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise UpvitError(f"rank must be a positive integer or None, got {rank!r}")
    model = adapter.model
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    sites = adapter.topology().sites
    sums = {s.key: torch.zeros(s.size, dtype=torch.float64, device=device) for s in sites}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mode = None
    captured = total = 0.0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device=device, dtype=dtype)
            with torch.enable_grad():
                logits, per_sample_grads = forward(x)
                if not torch.isfinite(logits).all():
                    raise UpvitError("the model produced NaN or inf logits on the proxy set: "
                                     "check the weights and inputs")
                picks, weights, mode, cap, tot = class_directions(logits, classes, max_exact_classes, rank,
                                                                   num_samples, generator)
                captured += cap
                total += tot
                for j, (direction, w) in enumerate(zip(picks, weights)):
                    grads = per_sample_grads((logits * direction).sum(), j < len(picks) - 1)
                    for key, g in grads.items():
                        g = g.to(torch.float64)
                        sums[key] += (g * g).sum(0) if w is None else (w.view(-1, 1) * g * g).sum(0)
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        model.train(was_training)
    record = {"engine": engine, "classes": mode, "num_samples": num_samples if mode == "sample" else None,
              "seed": seed if mode == "sample" else None, "rank": rank if mode == "exact" else None,
              "captured_fraction": captured / total if mode == "exact" and total > 0 else None}
    return sums, record


def pass_cost(directions: int) -> float:
    """Work of one input's Fisher (or local) pass in forward passes of the model: one forward and one
    backward (about two forwards) per class direction. Used for progress only."""
    return 1.0 + 2.0 * directions


def expected_directions(adapter: Adapter, classes: str, max_exact_classes: int, rank: int | None,
                        num_samples: int) -> int:
    """The class directions per input :func:`class_directions` will use (for the progress total)."""
    k = getattr(adapter.model, "num_classes", None) or getattr(getattr(adapter.model, "config", None), "num_labels", 2)
    exact = classes == "exact" or (classes == "auto" and k <= max_exact_classes)
    return max(1, min(k - 1, rank or k)) if exact else num_samples


def _masks_forward(adapter: Adapter, x: torch.Tensor) -> tuple[torch.Tensor, GradFn]:
    """Logits with all-ones ``[B, size]`` leaf masks on every site, and target -> d target / d masks."""
    param = next(adapter.model.parameters())
    leaves = {s.key: torch.ones(x.shape[0], s.size, dtype=param.dtype, device=param.device, requires_grad=True)
              for s in adapter.topology().sites}
    logits = _single_event(adapter, adapter.events(x, Masks(dict(leaves))))

    def grads(target: torch.Tensor, retain: bool) -> dict[str, torch.Tensor]:
        return dict(zip(leaves, torch.autograd.grad(target, list(leaves.values()), retain_graph=retain)))

    return logits, grads


def require_kl(adapter: Adapter, method: str, inputs=None) -> None:
    """Refuse a model whose output is not one distribution per input (the estimates are of that KL):
    an encoder scored by an embedding divergence, or a language model (one distribution per token)."""
    if adapter.divergence != "kl":
        raise UpvitError(f"method {method!r} estimates the KL between output distributions, but this {adapter.family} "
                         f"model is scored by the {adapter.divergence} divergence of its embeddings: use method 'kl' "
                         "(exact)")
    if isinstance(inputs, dict):  # token inputs: check the event count on one sample before any work
        from ..adapters.base import batch_slice, batch_to

        param = next(adapter.model.parameters())
        with torch.no_grad():
            _single_event(adapter, adapter.events(batch_to(batch_slice(inputs, 0, 1), param.device, param.dtype)))


def _single_event(adapter: Adapter, events: torch.Tensor) -> torch.Tensor:
    if events.shape[1] != 1:
        raise UpvitError(f"the Fisher estimate needs one output distribution per input; this {adapter.family} model "
                         f"has {events.shape[1]} (a language model): use method 'kl'")
    return events[:, 0]


def _probes_forward(adapter: Adapter, x: torch.Tensor) -> tuple[torch.Tensor, GradFn]:
    """Logits of the plain model recording the adapter's mask probes, and target -> d target / d masks
    at m = 1 (per site, summed over its probes)."""
    with adapter.probing() as probes:  # the last FFN runs on the head's tokens only (forward_from): the
        logits = _single_event(adapter, forward_from(adapter, adapter.begin(x), 0))  # others' gradients are zero
    probes = list(probes)
    sizes = {s.key: s.size for s in adapter.topology().sites}
    missing = sorted(set(sizes) - {p.site for p in probes})
    if missing:
        raise UpvitError(f"the {adapter.family} adapter recorded no mask probe for site {missing[0]}: "
                         "use engine='masks'")
    tensors = [p.tensor for p in probes]

    def grads(target: torch.Tensor, retain: bool) -> dict[str, torch.Tensor]:
        got = torch.autograd.grad(target, tensors, retain_graph=retain, allow_unused=True)
        out: dict[str, torch.Tensor] = {}
        for p, g in zip(probes, got):
            if g is None:
                continue
            d = p.mask_grad(g)
            out[p.site] = d if p.site not in out else out[p.site] + d
        return {k: out.get(k, torch.zeros(x.shape[0], n, dtype=logits.dtype, device=logits.device))
                for k, n in sizes.items()}

    return logits, grads


@register_method("fisher")
def fisher_scores(adapter: Adapter, images: torch.Tensor, batch_size: int = 64, classes: str = "auto",
                  num_samples: int = 1, max_exact_classes: int = 32, seed: int = 0, rank: int | None = None,
                  engine: str = "auto", attention: str = "fisher", progress: bool = True, **meta: Any) -> Scores:
    """Estimated KL score of every channel: 1/2 * sum over images of the mask's Fisher information.

    ``classes``: "exact" (sum over all classes weighted by q), "sample" (``num_samples`` classes
    drawn from q per image, seeded by ``seed``) or "auto" (exact up to ``max_exact_classes`` classes).
    The exact expectation is J^T (diag q - q q^T) J, computed with one backward pass per eigen-
    component of the class covariance (K - 1 of them); ``rank=r`` keeps only each image's r largest
    (deterministic truncation; meta ``captured_fraction`` = kept share of the covariance's trace).
    ``engine``: "probes" (plain forward, gradients at the adapter's mask probes; the default where
    the adapter has them) or "masks" (autograd through per-sample masks; same values, slower).
    ``attention``: "fisher" (the mask's Fisher information, as for the other components) or "local"
    (the dim's removal computed exactly inside its block and linearised after it,
    :mod:`upvit.importance.local`: closer to exact KL, slower; hybrid scoring screens with it).
    ``progress``: one bar for both passes (with ETA) and, for a run of its own, a first line with the plan.
    Extra keyword arguments are recorded in the metadata (e.g. the proxy set's description).
    """
    check_attention_option(attention)
    require_kl(adapter, "fisher", images)
    t0 = time.perf_counter()
    n = int(images.shape[0])
    directions = expected_directions(adapter, classes, max_exact_classes, rank, num_samples)
    passes = 2 if attention == "local" else 1
    if not running():
        sizes = sum(s.size for s in adapter.topology().sites)
        note(f"Fisher estimate of {sizes:,} channels on {n:,} proxy images: one forward and {directions} backward "
             f"passes per image{', and a second such pass for the attention dims (local)' if passes == 2 else ''}",
             progress)
    with job("fisher", passes * n * pass_cost(directions), unit="img-fwd", show=progress) as bar:
        per_input = Scaled(bar, pass_cost(directions))  # the bar counts forward-pass equivalents
        bar.phase("Fisher information")
        sums, record = fisher_sums(adapter, images, batch_size, classes, num_samples, max_exact_classes, seed, rank,
                                   engine, bar=per_input)
        if attention == "local":
            bar.phase("local attention estimate")
            sums.update(local_attention_sums(adapter, images, batch_size, classes, max_exact_classes, rank,
                                             num_samples, seed, bar=per_input))
    scores = {k: 0.5 * v.cpu() for k, v in sums.items()}
    info = {"criterion": "kl", "method": "fisher", "estimate": "0.5 * sum_i E_{y~q_i}[(d log p_i(y)/d m_c)^2] at m=1",
            "num_images": int(images.shape[0]), "batch_size": batch_size, "attention": attention, **record,
            "model": adapter.describe(), "wall_time_s": time.perf_counter() - t0, **meta}
    return Scores.from_sites(adapter.topology(), scores, info)
