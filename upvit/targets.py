"""Target shapes: what a pruned model should look like, per stage, checked against the family's rules.

A :class:`Targets` holds one :class:`StageTarget` per residual stage (a plain ViT has one): the
residual width, and for every block of the stage the head count, the attention width and the FFN
width (the paper uses the same ratio everywhere; every constructor we rebuild through needs these
to be equal within a stage anyway). :meth:`Targets.check` refuses, in one line naming the fix,
anything the model cannot be pruned to or the family's constructor cannot express, and runs
before any scoring or surgery work.

Names in messages follow the single-stage parameter names users know from timm and
:func:`upvit.make_plan` (``embed_dim``, ``num_heads``, ``attn_dim``, ``mlp_hidden``), with
``[s]`` for stage s of a multi-stage model.

>>> from upvit.topology import Rules, Topology
>>> topo = Topology.single_stage("vit", embed=24, heads=[4, 4], attn=[24, 24], ffn=[48, 48],
...                              rules=Rules("timm VisionTransformer", attn_tied_to_residual=True))
>>> Targets.from_ratio(topo, 0.5).stages[0]
StageTarget(residual=12, heads=2, attn=12, ffn=24)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .errors import UpvitError
from .topology import Topology

NAMES = {"residual": "embed_dim", "heads": "num_heads", "attn": "attn_dim", "ffn": "mlp_hidden"}


@dataclass(frozen=True)
class StageTarget:
    """Target widths of one stage: residual channels, and per block heads, attention dims, FFN units."""

    residual: int
    heads: int
    attn: int
    ffn: int


@dataclass(frozen=True)
class Targets:
    """One :class:`StageTarget` per stage, plus units to remove (depth pruning)."""

    stages: tuple[StageTarget, ...]
    drop_units: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.stages:
            raise UpvitError("targets need at least one stage")
        multi = len(self.stages) > 1
        for s, st in enumerate(self.stages):
            for field_name, value in asdict(st).items():
                name = _name(field_name, s, multi)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise UpvitError(f"{name} must be an integer, got {value!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_values(cls, topology: Topology, embed_dim: Any = None, num_heads: Any = None,
                    mlp_hidden: Any = None, attn_dim: Any = None) -> "Targets":
        """Targets from explicit values, each an int (every stage), a list (one per stage) or None.

        None keeps the model's own size (its first block's, per stage); ``attn_dim`` None means the
        residual target (the standard layout, where attention width equals the residual width)."""
        n = topology.num_stages
        residual = _per_stage("embed_dim", embed_dim, n, [topology.residual(s).size for s in range(n)])
        firsts = [topology.site(f"attn.{topology.blocks_of(s)[0]}") for s in range(n)]
        heads = _per_stage("num_heads", num_heads, n, [a.heads for a in firsts])
        ffn = _per_stage("mlp_hidden", mlp_hidden, n,
                         [topology.site(f"ffn.{topology.blocks_of(s)[0]}").size for s in range(n)])
        attn = _per_stage("attn_dim", attn_dim, n, residual)
        return cls(tuple(StageTarget(*v) for v in zip(residual, heads, attn, ffn)))

    @classmethod
    def from_ratio(cls, topology: Topology, ratio: float, keep_heads: bool = False) -> "Targets":
        """Keep ``ratio`` of every width (rounded), the same ratio everywhere as in the paper.

        Heads scale too (DeiT-B -> DeiT-S halves the heads and keeps the head dim) unless
        ``keep_heads`` (PVTv2-B1 -> B0 keeps the heads and halves the head dim). Residual widths are
        rounded to a multiple of the stage's target heads (the attention width equals them); where
        the family fixes the ratios of the residual widths, stage 0 is rounded and the rest follow."""
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise UpvitError(f"ratio must be in (0, 1], got {ratio!r}")
        rules, n = topology.rules, topology.num_stages
        stages = []
        widths: list[int] = []
        for s in range(n):
            first = topology.site(f"attn.{topology.blocks_of(s)[0]}")
            h_b = first.heads or 1
            h_t = h_b if keep_heads else max(1, round(h_b * ratio))
            if h_b % h_t:
                ok = ", ".join(f"{d / h_b:g}" for d in _divisors(h_b))
                raise UpvitError(f"ratio {ratio:g} gives {h_t} of {h_b} heads, which does not divide {h_b}: "
                                 f"use a ratio whose head count divides it ({ok}), keep the heads, or give the "
                                 "targets explicitly")
            width = topology.residual(s).size
            if rules.residual_ratios and s > 0:
                target = widths[0] * rules.residual_ratios[s] / rules.residual_ratios[0]
                res = int(round(target))
            else:
                res = max(h_t, round(width * ratio / h_t) * h_t)
            widths.append(res)
            ffn = topology.site(f"ffn.{first.block}").size
            stages.append(StageTarget(res, h_t, res, max(1, round(ffn * ratio))))
        return cls(tuple(stages))

    # ------------------------------------------------------------------ validation
    def check(self, topology: Topology) -> None:
        """Raise a one-line UpvitError unless the model can be pruned to these targets and the
        family's constructor can express the result."""
        n, rules = topology.num_stages, topology.rules
        multi = n > 1
        if len(self.stages) != n:
            raise UpvitError(f"targets give {len(self.stages)} stages but the model has {n}: give one value per stage")
        if rules.residual_ratios and multi:  # the family's own constraint first: it decides what else is possible
            _check_ratios(rules.family, rules.residual_ratios, [st.residual for st in self.stages])
        for s, st in enumerate(self.stages):
            nm = lambda f: _name(f, s, multi)  # noqa: E731
            _in_range(nm("residual"), st.residual, topology.residual(s).size)
            for b in topology.blocks_of(s):
                attn, ffn = topology.site(f"attn.{b}"), topology.site(f"ffn.{b}")
                h_b = attn.heads or 1
                _in_range(nm("heads"), st.heads, h_b)
                _in_range(nm("attn"), st.attn, attn.size)
                _in_range(nm("ffn"), st.ffn, ffn.size)
                if h_b % st.heads:
                    ok = ", ".join(map(str, _divisors(h_b)))
                    raise UpvitError(f"{nm('heads')}={st.heads} does not divide the model's {h_b} heads, so heads "
                                     f"cannot be merged evenly: choose one of {ok}")
            if st.attn % st.heads:
                what = (f"{nm('residual')}={st.residual} (also the attention width)" if st.attn == st.residual
                        else f"{nm('attn')}={st.attn}")
                raise UpvitError(f"{what} is not divisible by {nm('heads')}={st.heads}: choose a multiple of "
                                 f"{st.heads} (e.g. {max(st.heads, st.attn // st.heads * st.heads)})")
            if rules.attn_tied_to_residual and st.attn != st.residual:
                raise UpvitError(f"{rules.family} ties the attention width to embed_dim, so {nm('attn')} "
                                 f"({st.attn}) must equal {nm('residual')} ({st.residual}): leave attn_dim unset")
        for name in sorted(rules.uniform_across_stages):
            values = {getattr(st, name) for st in self.stages}
            if len(values) > 1:
                raise UpvitError(f"{rules.family} needs the same {NAMES[name]} in every stage, got "
                                 f"{[getattr(st, name) for st in self.stages]}")

    # ------------------------------------------------------------------ conversion
    def per_stage(self, field_name: str) -> list[int]:
        return [getattr(st, field_name) for st in self.stages]

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [asdict(st) for st in self.stages], "drop_units": list(self.drop_units)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Targets":
        try:
            return cls(tuple(StageTarget(**st) for st in d["stages"]), tuple(d.get("drop_units", ())))
        except (KeyError, TypeError) as e:
            raise UpvitError(f"not a valid targets record ({e})") from None


def resolve_targets(topology: Topology, embed_dim: Any = None, num_heads: Any = None, mlp_hidden: Any = None,
                    attn_dim: Any = None, ratio: float | None = None, targets: Targets | None = None,
                    keep_heads: bool = False) -> Targets:
    """One :class:`Targets` from whichever form was given (explicit values, a ratio, or Targets), checked."""
    explicit = [v is not None for v in (embed_dim, num_heads, mlp_hidden, attn_dim)]
    if targets is not None:
        if any(explicit) or ratio is not None:
            raise UpvitError("give either targets or explicit values / a ratio, not both")
    elif ratio is not None:
        if any(explicit):
            raise UpvitError("give either ratio or explicit targets (embed_dim, num_heads, mlp_hidden, attn_dim), not both")
        targets = Targets.from_ratio(topology, ratio, keep_heads=keep_heads)
    else:
        targets = Targets.from_values(topology, embed_dim, num_heads, mlp_hidden, attn_dim)
    targets.check(topology)
    return targets


def _check_ratios(family: str, ratios: Sequence[float], widths: list[int]) -> None:
    base = widths[0] / ratios[0]
    expected = [base * r for r in ratios]
    if any(abs(w - e) > 1e-9 for w, e in zip(widths, expected)):
        pattern = ":".join(f"{r:g}" for r in ratios)
        suggestion = [int(round(widths[0] * r / ratios[0])) for r in ratios]
        raise UpvitError(f"{family} keeps the stage widths in the ratio {pattern} (timm builds them from one "
                         f"embed_dim), so embed_dim={widths} cannot be built: use e.g. {suggestion}")


def _name(field_name: str, stage: int, multi: bool) -> str:
    return f"{NAMES[field_name]}[{stage}]" if multi else NAMES[field_name]


def _in_range(name: str, value: int, source: int) -> None:
    if value < 1 or value > source:
        raise UpvitError(f"{name}={value} is impossible: the model has {source}, choose 1..{source}")


def _per_stage(name: str, value: Any, n: int, default: list[int]) -> list[Any]:
    if value is None:
        return list(default)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UpvitError(f"{name} gives {len(value)} values but the model has {n} stages: give one per stage")
        return list(value)
    return [value] * n


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def geometric_check(ratios: Sequence[float], widths: Sequence[int]) -> bool:
    """Whether ``widths`` keep the proportions ``ratios`` (used by adapters for plan checks)."""
    return all(math.isclose(w * ratios[0], widths[0] * r) for w, r in zip(widths, ratios))


__all__ = ["StageTarget", "Targets", "resolve_targets"]
