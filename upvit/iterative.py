"""Iterative pruning: reach the target in k steps, re-scoring the partially pruned model each step.

The paper scores every channel once, on the intact model, and removes everything in one shot. At a
75% cut the channels' interactions dominate, so this option (beyond the paper) goes there in
``steps`` smaller cuts:

1. :func:`schedule` interpolates every width geometrically between the model's and the target's
   (step i of k keeps ``source * (target / source) ** (i / k)``, rounded), with head counts valid at
   every step: each step's head count divides the previous one (heads are merged, never split) and is
   a multiple of the target's, the one closest to the geometric value (ties: the larger, i.e. merge
   later); widths never grow, attention widths stay multiples of the head count, and the family's
   rules hold (the attention width tied to the residual width, fixed stage-width ratios).
2. each step scores the current (partially pruned) model on the proxy set with ``method`` (the
   paper's criterion by default; ``hybrid`` is told the step's target), keeps the best channels at
   the step's shape (head merging as in the paper) and rebuilds a genuine smaller model;
3. optionally, between steps, ``finetune(model, step)`` (e.g. a short distillation from the
   original) returns the model the next step scores.

With ``steps=1`` this is the paper's one-shot pruning. Without fine-tuning in between, the result
equals ``upvit.prune(model, result.plan)``: ``result.plan`` composes the steps' plans into one plan
of the original model (also recorded as the pruned model's ``extra["plan"]``).

>>> result = upvit.prune_iteratively(teacher, proxy, dict(embed_dim=48, num_heads=3, mlp_hidden=192),  # doctest: +SKIP
...                                  steps=2)
>>> [s.targets.stages[0] for s in result.steps]                                                        # doctest: +SKIP
[StageTarget(residual=96, heads=6, attn=96, ffn=384), StageTarget(residual=48, heads=3, attn=48, ffn=192)]
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .errors import UpvitError
from .plan import Plan, make_plan
from .targets import StageTarget, Targets
from .topology import Topology

FinetuneFn = Callable[[nn.Module, int], "nn.Module | None"]


def _closest(candidates: list[int], geo: float) -> int:
    """The candidate closest to ``geo`` in log scale; ties go to the larger."""
    return min(candidates, key=lambda c: (abs(math.log(c) - math.log(geo)), -c))


def _multiple_in(lo: int, hi: int, step: int, geo: float) -> int | None:
    """The multiple of ``step`` in [lo, hi] closest to ``geo`` in log scale, or None."""
    first = -(-lo // step) * step
    options = list(range(first, hi + 1, step))
    return _closest(options, geo) if options else None


def schedule(topology: Topology, targets: Targets, steps: int) -> list[Targets]:
    """The ``steps`` intermediate shapes from the model's to ``targets`` (the last one is ``targets``).

    Widths are interpolated geometrically per stage from the first block of the stage (the layout
    :meth:`Targets.from_values` assumes); see the module doc for the rules each step obeys."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UpvitError(f"steps must be a positive integer, got {steps!r}")
    if targets.drop_units:
        raise UpvitError("iterative pruning changes widths only: remove units with upvit.prune_depth instead")
    targets.check(topology)
    rules = topology.rules
    n = topology.num_stages
    current = []
    for s in range(n):
        first = topology.site(f"attn.{topology.blocks_of(s)[0]}")
        current.append(StageTarget(topology.residual(s).size, first.heads or 1, first.size,
                                   topology.site(f"ffn.{first.block}").size))
    source = list(current)
    out: list[Targets] = []
    for i in range(1, steps):
        frac = i / steps
        geo = lambda a, b: a * (b / a) ** frac  # noqa: E731
        stages: list[StageTarget] = []
        for s in range(n):
            src, tgt, prev = source[s], targets.stages[s], current[s]
            heads_options = [d for d in range(tgt.heads, prev.heads + 1) if prev.heads % d == 0 and d % tgt.heads == 0]
            # the preferred head count first; fall back when no attention width fits it
            for heads in sorted(heads_options,
                                key=lambda d: (abs(math.log(d) - math.log(geo(src.heads, tgt.heads))), -d)):
                if rules.residual_ratios and s > 0:
                    res = stages[0].residual * rules.residual_ratios[s] / rules.residual_ratios[0]
                    if res != int(res) or not tgt.residual <= res <= prev.residual:
                        raise UpvitError(f"no residual width of stage {s} keeps the family's stage ratios at step {i} "
                                         f"of {steps}: use fewer steps")
                    res = int(res)
                elif rules.attn_tied_to_residual:
                    res = _multiple_in(tgt.residual, prev.residual, heads, geo(src.residual, tgt.residual))
                else:
                    res = _closest(list(range(tgt.residual, prev.residual + 1)), geo(src.residual, tgt.residual))
                if res is None:
                    continue
                if rules.attn_tied_to_residual:
                    attn = res if res % heads == 0 else None
                else:
                    attn = _multiple_in(tgt.attn, prev.attn, heads, geo(src.attn, tgt.attn))
                if attn is None:
                    continue
                ffn = _closest(list(range(tgt.ffn, prev.ffn + 1)), geo(src.ffn, tgt.ffn))
                stages.append(StageTarget(res, heads, attn, ffn))
                break
            else:
                raise UpvitError(f"no valid shape for stage {s} at step {i} of {steps} (head counts dividing "
                                 f"{prev.heads} and multiples of {tgt.heads}): use fewer steps")
        step_targets = Targets(tuple(stages))
        out.append(step_targets)
        current = stages
    out.append(targets)
    return out


def compose_plans(first: Plan, second: Plan) -> Plan:
    """One plan of ``first``'s source model equivalent to applying ``first`` and then ``second``:
    kept channels ``first.keep[site][i]`` for ``i`` in ``second.keep[site]``, and each new head merges
    the source heads of the heads it merges. Bias columns compose as the union of the merged columns
    (for uniform merging, the mean of equal-size means is the mean of the union)."""
    keep = {}
    for site, idx in second.keep.items():
        if site not in first.keep:
            raise UpvitError(f"the second plan keeps channels of {site}, which the first one removed")
        keep[site] = [first.keep[site][i] for i in idx]
    heads = {site: [sorted({h for m in groups for h in first.heads[site][m]}) for groups in second.heads[site]]
             for site in second.heads}
    bias = None
    if first.bias_heads is not None or second.bias_heads is not None:
        bias = {}
        for site in second.heads:
            b_groups = (second.bias_heads or {}).get(site) or second.heads[site]
            a_groups = (first.bias_heads or {}).get(site) or first.heads[site]
            bias[site] = [sorted(h for m in groups for h in a_groups[m]) for groups in b_groups]
    if first.units is not None or second.units is not None:
        raise UpvitError("composing plans that remove units is not supported: prune depth separately")
    return Plan(keep=keep, heads=heads, source=first.source, bias_heads=bias,
                meta={"composed_from": [first.meta, second.meta], "criterion": second.meta.get("criterion")})


@dataclass
class IterativeStep:
    """What one step did: its target shape, its plan (relative to the previous step's model), the
    scores' metadata (method, wall time) and the seconds spent scoring and fine-tuning."""

    targets: Targets
    plan: Plan
    scores_meta: dict[str, Any]
    score_seconds: float
    finetune_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        meta = {k: v for k, v in self.scores_meta.items() if k in ("criterion", "method", "num_images", "wall_time_s")}
        return {"targets": self.targets.to_dict(), "shape": self.plan.summary(), "scores": meta,
                "score_seconds": round(self.score_seconds, 3), "finetune_seconds": round(self.finetune_seconds, 3)}


@dataclass
class IterativeResult:
    """The pruned model, the steps, and the plan of the original model composed from the steps'."""

    model: nn.Module
    plan: Plan
    steps: list[IterativeStep] = field(default_factory=list)


def prune_iteratively(model: nn.Module, proxy: Any, targets: Targets | dict[str, Any] | None = None, *,
                      steps: int = 2, method: str = "kl", score_options: dict[str, Any] | None = None,
                      finetune: FinetuneFn | None = None, first_scores: Any = None, labels: Any = None,
                      ratio: float | None = None,
                      callback: Callable[[int, nn.Module, IterativeStep], None] | None = None) -> IterativeResult:
    """Prune ``model`` to ``targets`` in ``steps`` steps, re-scoring the partially pruned model each step.

    Args:
        model: the model to prune (not modified).
        proxy: the proxy set every step is scored on (as for :func:`upvit.score`).
        targets: a :class:`~upvit.targets.Targets` or a dict of make_plan's keywords
            (``embed_dim``, ``num_heads``, ``mlp_hidden``, ``attn_dim``); or give ``ratio``.
        steps: k; 1 is the paper's one-shot pruning.
        method: the scorer of every step (``kl`` exact by default; ``hybrid`` gets the step's target).
        score_options: extra options for the scorer.
        finetune: optional ``finetune(model, step)`` run after steps 1..k-1 (not after the last);
            it may train the model in place (return None) or return the model to continue from.
        first_scores: scores of the intact model to use for step 1 instead of scoring it again
            (e.g. a saved exact-KL file: step 1 of k scores the same model as one-shot pruning).
        labels: the proxy labels, for scorers that need them (``taylor``).
        callback: called as ``callback(step, model, record)`` after each step's pruning.

    >>> result = prune_iteratively(teacher, proxy, dict(embed_dim=48, num_heads=3, mlp_hidden=192),  # doctest: +SKIP
    ...                            steps=2)
    >>> result.model, result.plan.summary()                                                          # doctest: +SKIP
    """
    from .adapters import get_adapter

    topology = get_adapter(model).topology()
    if (targets is None) == (ratio is None):
        raise UpvitError("give exactly one of targets=dict(embed_dim=..., num_heads=..., mlp_hidden=...) or ratio=...")
    targets = Targets.parse(topology, targets, ratio=ratio)
    if finetune is not None and not callable(finetune):
        raise UpvitError("finetune must be a callable finetune(model, step) or None")
    shapes = schedule(topology, targets, steps)
    from .adapters.base import batch_len
    from .progress import job, note

    count = batch_len(proxy) if isinstance(proxy, dict) else len(getattr(proxy, "dataset", proxy))
    note(f"iterative pruning in {len(shapes)} step(s): each step scores the current model with "
         f"method {method!r} on {count:,} proxy samples, then prunes it"
         f"{', then fine-tunes it (before the next step)' if finetune is not None else ''}")
    with job("iterative", unit="img-fwd", estimate=False) as bar:
        bar.extend(0, growing=len(shapes) > 1)
        return _steps(model, proxy, shapes, method, score_options, finetune, first_scores, labels, callback, topology,
                      bar)


def _steps(model: nn.Module, proxy: Any, shapes: list[Targets], method: str, score_options: dict[str, Any] | None,
           finetune: FinetuneFn | None, first_scores: Any, labels: Any,
           callback: Callable[[int, nn.Module, IterativeStep], None] | None, topology: Topology,
           bar: Any) -> IterativeResult:
    from .importance.api import score
    from .surgery import prune

    current, composed = model, None
    records: list[IterativeStep] = []
    for i, step_targets in enumerate(shapes, start=1):
        t0 = time.perf_counter()
        bar.phase(f"step {i}/{len(shapes)}")
        if i == 1 and first_scores is not None:
            scores = first_scores
            scores.check_matches(topology)
        else:
            options = dict(score_options or {})
            if method == "hybrid" and "targets" not in options and "ratios" not in options:
                options["targets"] = [step_targets]
            scores = score(current, proxy, method=method, labels=labels, **options)
            bar.arm()  # after the first step's scores: its rate is the best guess for the next steps
        t_score = time.perf_counter() - t0
        plan = make_plan(current, scores, targets=step_targets)
        current = prune(current, plan)
        composed = plan if composed is None else compose_plans(composed, plan)
        record = IterativeStep(step_targets, plan, dict(scores.meta), t_score)
        records.append(record)
        if callback is not None:
            callback(i, current, record)
        if finetune is not None and i < len(shapes):
            t1 = time.perf_counter()
            returned = finetune(current, i)
            current = returned if returned is not None else current
            record.finetune_seconds = time.perf_counter() - t1
    current.upvit_config.extra["plan"] = composed.to_dict()
    current.upvit_config.extra["iterative"] = {"steps": [r.to_dict() for r in records], "method": method,
                                               "finetune_between_steps": finetune is not None}
    return IterativeResult(current, composed, records)


__all__ = ["IterativeResult", "IterativeStep", "compose_plans", "prune_iteratively", "schedule"]
