"""Screen then verify: rank with the Fisher estimate, score exactly only near the keep/drop boundaries.

For every requested target a site splits into *selection problems* (one set of channels, keep k):
``res.{s}`` (all D channels of stage s, keep embed_dim), ``ffn.b`` (all H units, keep mlp_hidden) and, because
attention dims are kept per merged head (docs/method.md section 3), one problem per merged head
group of ``attn.b`` (h_b/h_t consecutive heads, keep attn_dim/h_t). In each problem the channels are
ordered by the estimate and a band of Fisher ranks [k - w, k + w) is scored exactly with the exact
engine (:func:`upvit.importance.kl.kl_scores` with ``candidates``). Channels above the band are
taken as kept, channels below as dropped, and the band's kept channels are its best by exact KL.

Stability (when to stop widening): per site, the log-ratio exact/estimate of the exactly scored
channels (at least MIN_CALIBRATION of them, else none is trusted) gives a calibration (median mu) and
a spread sigma (the larger of the MAD-based sigma and the 95th percentile of |deviation| / 1.96, since
the estimate's errors have heavy tails). A problem is stable when every unscored channel above the
band, its estimate calibrated, is still a margin above the best exactly scored channel the problem
drops, and every unscored channel below is the margin under the worst kept one. The margin is the
larger of z sigma and ``tail`` times the largest error seen among the site's exactly scored channels:
the estimate's errors have heavy tails (on the Swin teacher 2-5% of attention dims lie beyond 3 sigma),
so a fixed number of sigmas alone lets an outlier through. This is an empirical safeguard, not a
proof: the keep sets equal exact scoring's on the small teachers in benchmarks/results/, but on the DINOv2
ViT-S/14 at 56 px with 8 proxy images 1-2 channels per target differ (estimates off by 2.4-4.2x, beyond the
margin; equal keep sets there needed tail >= 3, i.e. most channels scored exactly: benchmarks/results/scale.md);
larger ``z``/``tail`` trade speed for more safety. Otherwise the band
grows on that side by exactly the channels that fail (it doubles while the site is uncalibrated),
and the exact engine scores them; a band covering the whole problem is exact.

Returned values: exactly scored channels carry their exact KL. Every other channel carries its
calibrated estimate exp(mu) * fisher, clipped into the interval that keeps every problem's decision:
strictly above the largest exact value a problem drops where the channel is above that problem's
band, strictly under it where the channel is below the band (so under every exact value the problem
keeps, and under every unscored channel above the band). The keep sets of the result (top-k,
per merged head for attention, as :func:`upvit.plan.make_plan` computes them) are then checked
against the decisions; a channel whose interval is empty or that lands on the wrong side is scored
exactly and the procedure repeats. So the result's keep sets are exactly the hybrid's decisions.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.base import Adapter
from ..errors import UpvitError
from ..progress import job, note
from ..selection import order as _order
from ..selection import problems as selection_problems
from ..targets import Targets
from .api import register_method
from .fisher import fisher_scores
from .reference import Reference
from .scores import Scores

TINY = 1e-30
MIN_CALIBRATION = 16  # exactly scored channels a site needs before its estimate's spread is trusted


@dataclass
class Problem:
    """Keep the best ``k`` of ``channels`` (indices into ``site``); ``order`` is by estimate, best first."""

    site: str
    channels: torch.Tensor
    k: int
    order: torch.Tensor
    up: int  # the band reaches this many ranks above the boundary ...
    down: int  # ... and this many below it

    @property
    def band(self) -> tuple[int, int]:
        n = self.order.numel()
        return max(0, self.k - self.up), min(n, self.k + self.down)


def resolve_targets(adapter: Adapter, targets: Any = None, ratios: Any = None) -> list[Targets]:
    """The targets to verify, from ``targets`` (any spelling of :meth:`Targets.parse`, or a list of them) or
    ``ratios``; each is checked against the model's rules before any work is done."""
    return Targets.parse_many(adapter.topology(), targets, ratios, method="hybrid")


def build_problems(adapter: Adapter, estimate: Scores, targets: list[Targets], band: float,
                   min_band: int) -> list[Problem]:
    """One problem per (target, selection problem of :mod:`upvit.selection`) that drops something."""
    out = []
    topology = adapter.topology()
    for t in targets:
        for p in selection_problems(topology, t):
            channels = torch.tensor(p.channels, dtype=torch.long)
            n = channels.numel()
            if p.k >= n:
                continue  # everything kept: no boundary
            w = max(min_band, math.ceil(band * n))
            out.append(Problem(p.site, channels, p.k, _order(estimate[p.site], channels), w, w))
    return out


def _calibration(est: torch.Tensor, exact: torch.Tensor, known: torch.Tensor) -> tuple[float, float, float]:
    """Median, robust spread and largest deviation of log(exact / estimate) over the exactly scored
    channels (an infinite spread, i.e. no confidence, until MIN_CALIBRATION channels or all of them
    are scored)."""
    if int(known.sum()) < min(MIN_CALIBRATION, known.numel()):
        return 0.0, float("inf"), float("inf")
    r = torch.log(exact[known].clamp_min(TINY)) - torch.log(est[known].clamp_min(TINY))
    mu = float(r.median())
    dev = (r - mu).abs()
    # robust but tail-aware: the larger of the MAD-based sigma and the 95th-percentile deviation / 1.96
    sigma = max(1.4826 * float(dev.median()), float(torch.quantile(dev, 0.95)) / 1.96)
    return mu, sigma, float(dev.max())


def _decide(p: Problem, exact: torch.Tensor, known: torch.Tensor) -> dict[str, Any]:
    """The problem's decision from its band: kept channels, and the exact thresholds it implies."""
    lo, hi = p.band
    above, below = p.order[:lo], p.order[hi:]
    scored = p.order[known[p.order]]
    unscored_above = above[~known[above]]
    unscored_below = below[~known[below]]
    slots = p.k - unscored_above.numel()
    ranked = _order(exact, scored)  # equal exact values: the lower index first, as make_plan
    kept_scored, dropped_scored = ranked[:slots], ranked[slots:]
    return {
        "keep": set(unscored_above.tolist()) | set(kept_scored.tolist()),
        "unscored_above": unscored_above, "unscored_below": unscored_below,
        "t_keep": float(exact[kept_scored].min()) if kept_scored.numel() else math.inf,
        "t_drop": float(exact[dropped_scored].max()) if dropped_scored.numel() else -math.inf,
        "valid": 0 <= slots <= scored.numel(),
    }


def _widen(p: Problem, d: dict[str, Any], est: torch.Tensor, mu: float, sigma: float, z: float,
           max_dev: float = 0.0, tail: float = 0.0) -> bool:
    """Widen an unstable problem's band; False if it is stable. Uncalibrated sites (infinite sigma) and
    invalid decisions double the band; otherwise each side grows to take in exactly the unscored
    channels whose calibrated estimate is within the margin of the exact threshold they must clear:
    the larger of z sigma and ``tail`` times the largest error seen among the exactly scored channels
    (the estimate's errors have heavy tails: a fixed number of sigmas alone let outliers through)."""
    margin = max(z * sigma, tail * max_dev)
    if not d["valid"] or not math.isfinite(sigma):
        if not d["valid"] or d["unscored_above"].numel() or d["unscored_below"].numel():
            p.up, p.down = 2 * p.up, 2 * p.down
            return True
        return False
    widened = False
    above, below = d["unscored_above"], d["unscored_below"]
    if above.numel():  # ordered best first: the ones nearest the band are last
        log_est = torch.log(est[above].clamp_min(TINY)) + mu - margin
        close = int((log_est <= math.log(max(d["t_drop"], TINY))).sum())
        if close:
            p.up += close
            widened = True
    if below.numel():
        log_est = torch.log(est[below].clamp_min(TINY)) + mu + margin
        close = int((log_est >= math.log(max(d["t_keep"], TINY))).sum())
        if close:
            p.down += close
            widened = True
    return widened


def _top_k_set(values: torch.Tensor, channels: torch.Tensor, k: int) -> set[int]:
    return set(_order(values, channels)[:k].tolist())


@register_method("hybrid")
def hybrid_scores(adapter: Adapter, images: torch.Tensor, targets: Any = None, ratios: Any = None,
                  band: float = 0.005, min_band: int = 2, z: float = 3.0, tail: float = 1.6, batch_size: int = 64,
                  fisher_options: dict[str, Any] | None = None, progress: bool = True,
                  max_rounds: int = 64, **meta: Any) -> Scores:
    """KL scores whose keep sets at ``targets`` (or ``ratios``) are those of exact scoring, computing
    the exact KL only near each boundary (see the module doc for the rule and the returned values).

    Options: ``band`` initial half-width of each band as a fraction of the problem's channels
    (at least ``min_band``); ``z`` how many robust standard deviations of log(exact/estimate) an
    unscored channel must clear, and ``tail`` how many times the largest such error seen so far (the
    margin is the larger of the two); ``fisher_options`` passed to the estimate (default
    ``{"attention": "local"}``: attention dims screened with :mod:`upvit.importance.local`, whose
    ranking is far closer to exact's, so their bands stay narrow). ``progress``: one bar for the whole
    job (screen and every exact round), a first line with the plan and the time estimate of the first
    exact round once it has run for a moment.
    """
    from .fisher import require_kl

    require_kl(adapter, "hybrid", images)
    if not isinstance(band, (int, float)) or not 0 < band <= 1:
        raise UpvitError(f"band must be a fraction in (0, 1], got {band!r}")
    if not isinstance(min_band, int) or min_band < 1:
        raise UpvitError(f"min_band must be a positive integer, got {min_band!r}")
    if not isinstance(z, (int, float)) or z < 0:
        raise UpvitError(f"z must be a non-negative number, got {z!r}")
    if not isinstance(tail, (int, float)) or tail < 0:
        raise UpvitError(f"tail must be a non-negative number, got {tail!r}")
    with job("hybrid", unit="img-fwd", show=progress, estimate=False) as bar:
        return _hybrid(adapter, images, targets, ratios, band, min_band, z, tail, batch_size, fisher_options, progress,
                       max_rounds, meta, bar)


def _hybrid(adapter: Adapter, images: torch.Tensor, targets: Any, ratios: Any, band: float, min_band: int, z: float,
            tail: float, batch_size: int, fisher_options: dict[str, Any] | None, progress: bool, max_rounds: int,
            meta: dict[str, Any], bar: Any) -> Scores:
    from .kl import kl_scores

    t0 = time.perf_counter()
    target_list = resolve_targets(adapter, targets, ratios)
    sizes = {s.key: s.size for s in adapter.topology().sites}
    fisher_options = {"attention": "local", **(fisher_options or {})}
    note(f"hybrid scores for {len(target_list)} target(s): a Fisher screen (attention: {fisher_options['attention']}) "
         f"on {images.shape[0]:,} proxy images, then exact KL of the channels near each keep/drop boundary in rounds "
         f"until every decision is stable (at most {max_rounds}); {sum(sizes.values()):,} channels in all", progress)
    bar.phase("Fisher screen")
    estimate = fisher_scores(adapter, images, batch_size=batch_size, progress=progress, **fisher_options)
    t_fisher = time.perf_counter() - t0

    est = {k: v.to(torch.float64) for k, v in estimate.items()}
    exact = {k: torch.full((n,), math.nan, dtype=torch.float64) for k, n in sizes.items()}
    known = {k: torch.zeros(n, dtype=torch.bool) for k, n in sizes.items()}
    problems = build_problems(adapter, estimate, target_list, band, min_band)
    extra: dict[str, set[int]] = {k: set() for k in sizes}  # channels scored to repair the values
    t_exact, rounds, exact_calls = 0.0, 0, 0
    values: dict[str, torch.Tensor] = {}
    reference = None  # the original's outputs: computed at the first exact round, kept for every later one
    while True:
        rounds += 1
        if rounds > max_rounds:
            raise UpvitError(f"hybrid scoring did not settle in {max_rounds} rounds: "
                             "raise max_rounds or use method='kl'")
        need: dict[str, set[int]] = {k: set(extra[k]) for k in sizes}
        for p in problems:
            lo, hi = p.band
            need[p.site].update(p.order[lo:hi].tolist())
        need = {k: sorted(i for i in v if not known[k][i]) for k, v in need.items()}
        need = {k: v for k, v in need.items() if v}
        if need:
            count = sum(len(v) for v in need.values())
            if exact_calls == 0:
                note(f"round 1: exact KL of {count:,} channels x {images.shape[0]:,} images "
                     f"({count / sum(sizes.values()):.1%} of the channels); later rounds add the channels whose "
                     "decision is not yet stable", progress)
                bar.arm()  # the estimate covers the exact work known now
            bar.extend(0, growing=exact_calls > 0)
            bar.phase(f"round {rounds}, exact KL of {count:,} channels")
            t1 = time.perf_counter()
            reference = reference or Reference(adapter, images, batch_size)
            got = kl_scores(adapter, images, batch_size=batch_size, candidates=need, progress=progress,
                            reference=reference)
            t_exact += time.perf_counter() - t1
            exact_calls += 1
            for k, idx in need.items():
                ix = torch.tensor(idx)
                exact[k][ix] = got[k].to(torch.float64)[ix]
                known[k][ix] = True
        calib = {k: _calibration(est[k], exact[k], known[k]) for k in sizes}
        decisions = [_decide(p, exact[p.site], known[p.site]) for p in problems]
        widened = [_widen(p, d, est[p.site], calib[p.site][0], calib[p.site][1], z, calib[p.site][2], tail)
                   for p, d in zip(problems, decisions)]
        if any(widened):
            continue
        values, repairs = _assign_values(sizes, est, exact, known, calib, problems, decisions)
        if not repairs:
            break
        for k, idx in repairs.items():
            extra[k].update(idx)

    scored = {k: int(v.sum()) for k, v in known.items()}
    info = {"criterion": "kl", "method": "hybrid", "targets": [t.to_dict() for t in target_list],
            "num_images": int(images.shape[0]),
            "band": band, "min_band": min_band, "z": z, "tail": tail, "screen": estimate.meta.get("attention"),
            "rounds": rounds, "exact_calls": exact_calls,
            "exact_channels": {k: torch.nonzero(v).view(-1).tolist() for k, v in known.items()},
            "exact_counts": scored, "exact_fraction": sum(scored.values()) / sum(sizes.values()),
            "final_bands": {f"{p.site}[{int(p.channels[0])}:{int(p.channels[-1]) + 1}]k{p.k}": list(p.band)
                            for p in problems},
            "fisher": {k: v for k, v in estimate.meta.items() if k in ("classes", "num_samples", "seed")},
            "fisher_time_s": t_fisher, "exact_time_s": t_exact, "wall_time_s": time.perf_counter() - t0,
            "model": adapter.describe(), **meta}
    return Scores.from_sites(adapter.topology(), values, info)


def _assign_values(sizes: dict[str, int], est: dict[str, torch.Tensor], exact: dict[str, torch.Tensor],
                   known: dict[str, torch.Tensor], calib: dict[str, tuple[float, float]], problems: list[Problem],
                   decisions: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Exact values where known, clipped calibrated estimates elsewhere; channels to score exactly
    where no value can honour every decision."""
    lower = {k: torch.full((n,), -math.inf, dtype=torch.float64) for k, n in sizes.items()}
    upper = {k: torch.full((n,), math.inf, dtype=torch.float64) for k, n in sizes.items()}
    for p, d in zip(problems, decisions):
        if d["unscored_above"].numel():
            ix = d["unscored_above"]
            lower[p.site][ix] = lower[p.site][ix].clamp_min(d["t_drop"])
        if d["unscored_below"].numel():  # under the best dropped exact value, so under every kept one
            ix = d["unscored_below"]
            cap = d["t_drop"] if math.isfinite(d["t_drop"]) else d["t_keep"]
            upper[p.site][ix] = upper[p.site][ix].clamp_max(cap)
    values, repairs = {}, {}
    for k in sizes:
        v = est[k] * math.exp(calib[k][0])
        lo_open = torch.nextafter(lower[k], torch.full_like(lower[k], math.inf))
        hi_open = torch.nextafter(upper[k], torch.full_like(upper[k], -math.inf))
        v = torch.minimum(torch.maximum(v, lo_open), hi_open)
        v = torch.where(known[k], exact[k], v)
        values[k] = v
        bad = (~known[k]) & (lo_open > hi_open)
        if bad.any():
            repairs[k] = torch.nonzero(bad).view(-1).tolist()
    for p, d in zip(problems, decisions):
        if _top_k_set(values[p.site], p.channels, p.k) != d["keep"]:
            wrong = _top_k_set(values[p.site], p.channels, p.k) ^ d["keep"]
            unscored = [i for i in wrong if not known[p.site][i]]
            repairs.setdefault(p.site, []).extend(unscored or p.order[~known[p.site][p.order]].tolist())
    return values, repairs
