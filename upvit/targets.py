"""Target shapes: what a pruned model should look like, per stage, checked against the family's rules.

A :class:`Targets` holds one :class:`StageTarget` per residual stage (a plain ViT has one): the
residual width, and for every block of the stage the head count, the attention width and the FFN
width (the paper uses the same ratio everywhere; every constructor we rebuild through needs these
to be equal within a stage anyway). :meth:`Targets.parse` is the one door for every accepted spelling
(a :class:`Targets`, a dict of :func:`upvit.make_plan`'s keywords, the CLI's ``EMBED,HEADS,MLP`` text, a
ratio); :meth:`Targets.check` refuses, in one line naming the fix, anything the model cannot be pruned
to (and, through :meth:`upvit.topology.Rules.check`, anything the family's constructor cannot
express), before any scoring or surgery work.

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

from dataclasses import asdict, dataclass
from typing import Any

from .errors import UpvitError
from .topology import StageShape, Topology, check_ratios
from .topology import width_name as _name

TARGET_KEYS = ("embed_dim", "num_heads", "mlp_hidden", "attn_dim")


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
        """Raise a one-line UpvitError unless the model can be pruned to these targets (counts in range,
        heads that merge evenly) and the family's constructor can express the result (its
        :meth:`~upvit.topology.Rules.check`)."""
        n, rules = topology.num_stages, topology.rules
        multi = n > 1
        if len(self.stages) != n:
            raise UpvitError(f"targets give {len(self.stages)} stages but the model has {n}: give one value per stage")
        if rules.residual_ratios and multi:  # the family's own constraint first: it decides what else is possible
            check_ratios(rules.family, rules.residual_ratios, [st.residual for st in self.stages])
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
        rules.check(self.shape())

    def shape(self) -> list[StageShape]:
        """The widths these targets give, one :class:`~upvit.topology.StageShape` per stage."""
        return [StageShape(st.residual, (st.heads,), (st.attn,), (st.ffn,)) for st in self.stages]

    # ------------------------------------------------------------------ the one door
    @classmethod
    def parse(cls, topology: Topology, spec: Any = None, *, ratio: Any = None, keep_heads: bool = False) -> "Targets":
        """Checked targets from any accepted spelling: a :class:`Targets`; a dict of
        :func:`upvit.make_plan`'s keywords (``embed_dim``, ``num_heads``, ``mlp_hidden``, ``attn_dim``,
        each an int or one value per stage); the CLI's text ``EMBED,HEADS,MLP`` (per stage
        ``16/32/64/128,1/2/4/8,64/128/256/512``); or None with ``ratio`` (None and no ratio: the model's
        own shape)."""
        if isinstance(spec, str):
            try:
                spec = parse_target_text(spec)
            except UpvitError:
                raise UpvitError(f"each target must be a dict like {{'embed_dim': 96, 'num_heads': 6, 'mlp_hidden': "
                                 f"384}} or the text 'EMBED,HEADS,MLP' (e.g. '96,6,384'), got {spec!r}") from None
        if spec is not None and ratio is not None:
            raise UpvitError("give either ratio or explicit targets (embed_dim, num_heads, mlp_hidden, attn_dim), "
                             "not both")
        if isinstance(spec, Targets):
            targets = spec
        elif isinstance(spec, dict):
            unknown = set(spec) - set(TARGET_KEYS)
            if unknown:
                raise UpvitError(f"unknown target key(s) {', '.join(sorted(unknown))}: use "
                                 f"{', '.join(sorted(TARGET_KEYS))}")
            targets = cls.from_values(topology, **spec)
        elif spec is None:
            targets = (cls.from_ratio(topology, ratio, keep_heads=keep_heads) if ratio is not None
                       else cls.from_values(topology))
        else:
            raise UpvitError(f"each target must be a dict like {{'embed_dim': 96, 'num_heads': 6, 'mlp_hidden': 384}}, "
                             f"got {spec!r}")
        targets.check(topology)
        return targets

    @classmethod
    def parse_many(cls, topology: Topology, targets: Any = None, ratios: Any = None,
                   method: str = "hybrid") -> list["Targets"]:
        """Checked targets for the scorers that serve several shapes (hybrid, greedy): exactly one of
        ``targets`` (one spelling of :meth:`parse`, or a list of them) or ``ratios`` (a number or a list)."""
        if (targets is None) == (ratios is None):
            raise UpvitError(f"method {method!r} needs exactly one of targets=[{{embed_dim, num_heads, mlp_hidden}}, "
                             "...] or ratios=[0.5, ...]")
        if ratios is not None:
            if isinstance(ratios, (int, float)):
                ratios = [ratios]
            if not isinstance(ratios, (list, tuple)) or not ratios:
                raise UpvitError(f"ratios must be a non-empty list of numbers in (0, 1], got {ratios!r}")
            return [cls.parse(topology, ratio=r) for r in ratios]
        if isinstance(targets, (dict, Targets, str)):
            targets = [targets]
        if not isinstance(targets, (list, tuple)) or not targets:
            raise UpvitError(f"targets must be a non-empty list of dicts, got {targets!r}")
        return [cls.parse(topology, t) for t in targets]

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
    """:meth:`Targets.parse` for :func:`upvit.make_plan`'s keywords (explicit values, a ratio, or Targets)."""
    explicit = {k: v for k, v in zip(TARGET_KEYS, (embed_dim, num_heads, mlp_hidden, attn_dim)) if v is not None}
    if targets is not None and (explicit or ratio is not None):
        raise UpvitError("give either targets or explicit values / a ratio, not both")
    return Targets.parse(topology, targets if targets is not None else (explicit or None), ratio=ratio,
                         keep_heads=keep_heads)


def parse_target_text(text: str) -> dict[str, Any]:
    """``"96,6,384"`` -> ``{"embed_dim": 96, "num_heads": 6, "mlp_hidden": 384}``; a field may give one value
    per stage separated by ``/`` (``16/32/64/128,1/2/4/8,64/128/256/512``). Syntax only: the CLI checks
    its arguments with it before loading the model."""
    parts = text.split(",")
    fields = [p.strip().split("/") for p in parts]
    if len(parts) != 3 or not all(x.isdigit() for f in fields for x in f):
        raise UpvitError(f"--target {text!r}: write EMBED,HEADS,MLP, e.g. --target 96,6,384 (per stage: "
                         "16/32/64/128,1/2/4/8,64/128/256/512)")
    values = [int(f[0]) if len(f) == 1 else [int(x) for x in f] for f in fields]
    return dict(zip(("embed_dim", "num_heads", "mlp_hidden"), values))


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


__all__ = ["StageTarget", "TARGET_KEYS", "Targets", "parse_target_text", "resolve_targets"]
