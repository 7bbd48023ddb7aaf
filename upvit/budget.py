"""Prune to a budget: choose the shape, not only the channels.

``--budget macs=0.5`` (or ``params=``, ``latency=``) asks for a model of at most that fraction of the
original's MACs (parameters, measured batch latency). The search:

1. **Enumerate shapes the family's constructor accepts.** The widths of every stage shrink by the same
   fraction (the paper's layout; per-stage freedom is not searched): the residual width at fractions
   k/G of the original (rounded to a multiple of the stage's heads where the family ties the attention
   width to it, and following the family's fixed stage ratios, e.g. Swin's 1:2:4:8); the head count at
   every divisor of the original's (the same fraction in every stage); the attention width, where the
   family lets it differ from the residual width, either equal to the residual width or keeping the
   original head dim; the FFN width at fractions j/G. Each shape is checked by
   :meth:`upvit.targets.Targets.check` (the adapter's rules). For each (heads, residual, attention) the
   largest FFN fraction within the budget is kept (binary search: the budget grows with the FFN width),
   so only shapes on the budget's frontier become candidates.
2. **Budget use** of a shape is measured on the shape itself: the plan from the scores, rebuilt through
   the family's constructor (:func:`upvit.prune`), its MACs / parameters counted (or its latency timed).
3. **Joint divergence.** Each candidate plan's keep-masks (every site at once) run on the original model
   through the adapter's masking (the exact-removal semantics of docs/method.md), one masked forward over
   the proxy set per candidate; the divergence (KL, or 1 - cos for sentence encoders) from the original's
   outputs is summed over the proxy samples. The candidate with the lowest joint divergence wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import UpvitError
from .targets import StageTarget, Targets

KINDS = ("macs", "params", "latency")


@dataclass(frozen=True)
class Budget:
    kind: str
    fraction: float

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``macs=0.5`` -> Budget("macs", 0.5): one line naming the fix otherwise."""
        kind, sep, value = text.partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in KINDS:
            raise UpvitError(f"--budget {text!r}: write KIND=FRACTION with KIND one of {', '.join(KINDS)}, "
                             "e.g. --budget macs=0.5")
        try:
            fraction = float(value)
        except ValueError:
            fraction = float("nan")
        if not (0 < fraction <= 1):
            raise UpvitError(f"--budget {text!r}: the fraction must be a number in (0, 1], e.g. macs=0.5")
        return cls(kind, fraction)


@dataclass
class Candidate:
    targets: Targets
    use: float  # fraction of the original's MACs / params / latency
    plan: Any = None
    divergence: float = math.nan

    def shape(self) -> str:
        """``96/6/96/384`` (residual/heads/attention/FFN), stages joined by ``|``."""
        return " | ".join(f"{s.residual}/{s.heads}/{s.attn}/{s.ffn}" for s in self.targets.stages)


def _heads_options(topology) -> list[list[int]]:
    """Per-stage head counts: the same fraction of every stage's heads, each a divisor of the original's."""
    originals = [topology.site(f"attn.{topology.blocks_of(s)[0]}").heads or 1 for s in range(topology.num_stages)]
    out = []
    for d in range(1, originals[0] + 1):
        if originals[0] % d:
            continue
        heads = [h * d / originals[0] for h in originals]
        if all(x == int(x) and x >= 1 and h % int(x) == 0 for x, h in zip(heads, originals)):
            out.append([int(x) for x in heads])
    return out


def enumerate_shapes(topology, grid: int = 8) -> list[tuple[list[int], list[int], list[int], Callable[[int], Targets]]]:
    """(heads, residual, attention) per stage, with a function FFN level j (1..grid) -> Targets."""
    n, rules = topology.num_stages, topology.rules
    widths = [topology.residual(s).size for s in range(n)]
    firsts = [topology.site(f"attn.{topology.blocks_of(s)[0]}") for s in range(n)]
    ffns = [topology.site(f"ffn.{topology.blocks_of(s)[0]}").size for s in range(n)]
    head_dims = [a.size // (a.heads or 1) for a in firsts]
    seen, out = set(), []
    for heads in _heads_options(topology):
        for k in range(1, grid + 1):
            f = k / grid
            residual = []
            for s in range(n):
                if rules.residual_ratios and s > 0:
                    exact = residual[0] * rules.residual_ratios[s] / rules.residual_ratios[0]
                    residual.append(int(round(exact)) if abs(exact - round(exact)) < 1e-9 else -1)
                elif rules.attn_tied_to_residual:
                    residual.append(max(heads[s], round(widths[s] * f / heads[s]) * heads[s]))
                else:
                    residual.append(max(1, round(widths[s] * f)))
            if min(residual) < 1:
                continue
            attn_options = [residual] if rules.attn_tied_to_residual else [
                [max(h, round(r / h) * h) for r, h in zip(residual, heads)],  # as wide as the residual stream
                [h * hd for h, hd in zip(heads, head_dims)]]  # the original head dim
            for attn in attn_options:
                key = (tuple(heads), tuple(residual), tuple(attn))
                if key in seen:
                    continue
                seen.add(key)

                def targets(j: int, heads=heads, residual=residual, attn=attn) -> Targets:
                    return Targets(tuple(StageTarget(r, h, a, max(1, round(F * j / grid)))
                                         for r, h, a, F in zip(residual, heads, attn, ffns)))

                try:
                    targets(grid).check(topology)
                except UpvitError:
                    continue
                out.append((heads, residual, attn, targets))
    return out


def _measure_fn(model: nn.Module, budget: Budget, scores, batch_size: int, runtime: str) -> Callable[[Any], float]:
    """Budget use of a shape: its plan rebuilt through the family's constructor, measured, / the original's."""
    from .bench import count_macs, count_params, throughput
    from .plan import make_plan
    from .surgery import prune

    def measure(m: nn.Module) -> float:
        if budget.kind == "macs":
            return float(count_macs(m))
        if budget.kind == "params":
            return float(count_params(m))
        return throughput(m, batch_size=batch_size, runs=5, warmup=1, runtime=runtime)["median_batch_seconds"]

    base = measure(model)
    cache: dict = {}

    def use(targets: Targets) -> tuple[float, Any]:
        key = targets.to_dict().__repr__()
        if key not in cache:
            plan = make_plan(model, scores, targets=targets)
            cache[key] = (measure(prune(model, plan)) / base, plan)
        return cache[key]

    return use


def candidates_within(model: nn.Module, scores, budget: Budget, grid: int = 8, batch_size: int = 64,
                      runtime: str = "torch") -> list[Candidate]:
    """The frontier shapes within ``budget`` (largest FFN per heads/residual/attention), with their plans."""
    from .adapters import get_adapter

    topology = get_adapter(model).topology()
    use = _measure_fn(model, budget, scores, batch_size, runtime)
    out = []
    for _, _, _, targets in enumerate_shapes(topology, grid):
        lo, hi, best = 1, grid, None  # largest FFN level whose use is within the budget
        while lo <= hi:
            mid = (lo + hi) // 2
            u, plan = use(targets(mid))
            if u <= budget.fraction + 1e-12:
                best, lo = (mid, u, plan), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            out.append(Candidate(targets(best[0]), best[1], best[2]))
    if not out:
        raise UpvitError(f"no shape of this {topology.rules.family} fits {budget.kind}={budget.fraction:g} of the "
                         f"original: raise the budget or refine the grid (--budget-grid)")
    return out


def plan_masks(model: nn.Module, plan):
    """Keep-masks on the original model for every site a plan keeps channels of (1 kept, 0 removed)."""
    from .adapters import Masks, get_adapter

    masks = {}
    for site in get_adapter(model).topology().sites:
        if site.key in plan.keep:
            m = torch.zeros(site.size)
            m[list(plan.keep[site.key])] = 1.0
            masks[site.key] = m
    return Masks(masks)


@torch.no_grad()
def joint_divergences(model: nn.Module, plans: list, proxy, batch_size: int = 64) -> list[float]:
    """For each plan: the divergence of the original with all the plan's keep-masks applied at once from
    the original, summed over the proxy samples (one masked forward over the proxy set per plan)."""
    from .adapters import get_adapter
    from .adapters.base import batch_len, batch_slice, batch_to

    adapter = get_adapter(model.eval())
    device = next(model.parameters()).device
    n = batch_len(proxy)
    totals = [0.0] * len(plans)
    masks = [plan_masks(model, p) for p in plans]
    for start in range(0, n, batch_size):
        x = batch_to(batch_slice(proxy, start, min(n, start + batch_size)), device)
        ref = adapter.output_reference(adapter.events(x))
        weights = adapter.event_weights(x)
        for i, m in enumerate(masks):
            m = type(m)({k: v.to(device) for k, v in m.by_site.items()})
            totals[i] += float(adapter.output_divergence(ref, adapter.events(x, m).unsqueeze(0), weights)[0])
    return totals


def choose(model: nn.Module, scores, proxy, budget: Budget, grid: int = 8, batch_size: int = 64,
           latency_batch: int = 64, runtime: str = "torch") -> list[Candidate]:
    """All candidates with their joint divergence, the lowest first (ties: the larger budget use)."""
    cands = candidates_within(model, scores, budget, grid, latency_batch, runtime)
    for c, d in zip(cands, joint_divergences(model, [c.plan for c in cands], proxy, batch_size)):
        c.divergence = d
    return sorted(cands, key=lambda c: (c.divergence, -c.use))


def format_candidates(cands: list[Candidate], budget: Budget, criterion: str = "joint KL") -> str:
    lines = [f"| shape (residual/heads/attention/FFN) | {budget.kind} use | {criterion} |", "|---|---:|---:|"]
    for i, c in enumerate(cands):
        mark = " (chosen)" if i == 0 else ""
        lines.append(f"| {c.shape()}{mark} | {c.use:.1%} | {c.divergence:.5g} |")
    return "\n".join(lines)
