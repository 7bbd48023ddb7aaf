"""Scores + targets -> a Plan: the kept channels of every site, the merged heads, the kept units.

A :class:`Plan` is plain data (versioned JSON), replayable and writable by hand:

* ``keep``: site key -> kept channel indices of the source model (``res.{s}``, ``attn.{b}``,
  ``ffn.{b}``). Kept channels stay in their listed order; :func:`make_plan` lists them ascending.
* ``heads``: attention site -> for each new head, the source heads merged into it. The new head j
  consists of the dims ``keep[site][j*d:(j+1)*d]`` (d = kept dims / new heads).
* ``bias_heads``: for families whose heads carry a bias column (Swin's relative-position table),
  the source heads whose columns are averaged into each new head's column (None: all merged heads,
  the default "mean" rule; :func:`make_plan` with ``head_bias="best"`` lists the best one only).
* ``units``: the kept units in forward order (None: all; depth pruning removes some).
* ``source``: the source model's :class:`~upvit.topology.Topology` as JSON, so a plan is never
  applied to a model of another shape.

Version-1 plan files (single-stage timm ViT: ``keep_embed``, ``keep_attn``, ``keep_ffn``,
``num_heads``) still load. Head merging (docs/method.md section 3): h_b heads -> h_t heads merges
each run of h_b/h_t consecutive heads into one and keeps the best attn_t/h_t dims of each merged head,
in their original order.

>>> plan = make_plan(model, scores, embed_dim=384, num_heads=6, mlp_hidden=1536)  # doctest: +SKIP
>>> plan.save("plan.json")                                                         # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .adapters.timm_vit import vit_rules  # the timm ViT family's rules; re-exported for old imports
from .errors import UpvitError
from .selection import HEAD_MODES, problems, top_k, whole_head_problems
from .targets import Targets, resolve_targets
from .topology import StageShape, Topology

if TYPE_CHECKING:
    from .importance.scores import Scores

PLAN_FORMAT = "upvit-plan"
PLAN_VERSION = 2
HEAD_BIAS_RULES = ("mean", "best")


def _check_indices(name: str, idx: Any, size: int | None) -> None:
    if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise UpvitError(f"plan {name} must be a list of integer channel indices")
    if not idx:
        raise UpvitError(f"plan {name} keeps no channel: keep at least 1")
    bad = [i for i in idx if i < 0 or (size is not None and i >= size)]
    if bad:
        limit = f"0..{size - 1}" if size is not None else ">= 0"
        raise UpvitError(f"plan {name} has index {bad[0]} out of range: indices must be in {limit}")
    if len(set(idx)) != len(idx):
        dup = next(i for i in idx if idx.count(i) > 1)
        raise UpvitError(f"plan {name} lists index {dup} twice: every kept channel must appear once")


@dataclass
class Plan:
    """Kept channels per site, merged heads per attention site, kept units. See the module docstring."""

    keep: dict[str, list[int]]
    heads: dict[str, list[list[int]]]
    source: dict[str, Any] | None = None
    units: list[str] | None = None
    bias_heads: dict[str, list[list[int]]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ structure of the result
    def source_topology(self) -> Topology | None:
        return Topology.from_dict(self.source) if self.source is not None else None

    def attn_sites(self) -> list[str]:
        return sorted((k for k in self.keep if k.startswith("attn.")), key=lambda k: int(k.split(".")[1]))

    def ffn_sites(self) -> list[str]:
        return sorted((k for k in self.keep if k.startswith("ffn.")), key=lambda k: int(k.split(".")[1]))

    def residual_sites(self) -> list[str]:
        return sorted((k for k in self.keep if k.startswith("res.")), key=lambda k: int(k.split(".")[1]))

    def heads_of(self, site: str) -> int:
        return len(self.heads[site])

    def head_dim_of(self, site: str) -> int:
        return len(self.keep[site]) // len(self.heads[site])

    def kept_units(self, topology: Topology) -> list[str]:
        return list(self.units) if self.units is not None else [u.key for u in topology.units]

    # single-stage conveniences (the plain ViT layout; the names of plan format version 1)
    @property
    def depth(self) -> int:
        return len(self.attn_sites())

    @property
    def keep_embed(self) -> list[int]:
        return self.keep["res.0"]

    @property
    def keep_attn(self) -> list[list[int]]:
        return [self.keep[k] for k in self.attn_sites()]

    @property
    def keep_ffn(self) -> list[list[int]]:
        return [self.keep[k] for k in self.ffn_sites()]

    @property
    def embed_dim(self) -> int:
        return len(self.keep["res.0"])

    @property
    def num_heads(self) -> int:
        counts = {len(self.heads[k]) for k in self.attn_sites()}
        if len(counts) != 1:
            raise UpvitError("this plan has different head counts per block: use plan.heads_of(site)")
        return counts.pop()

    def attn_dim(self, block: int = 0) -> int:
        return len(self.keep[f"attn.{block}"])

    def head_dim(self, block: int = 0) -> int:
        return self.head_dim_of(f"attn.{block}")

    def ffn_dim(self, block: int = 0) -> int:
        return len(self.keep[f"ffn.{block}"])

    def target_shape(self) -> dict[str, Any]:
        """The pruned model's shape, in the layout of ``Topology.shape()`` (kept units only)."""
        attn = self.attn_sites()
        kept_blocks = None
        if self.units is not None:
            kept_blocks = {int(u.split(".")[1]) for u in self.units}
        shape = {
            "residual": [len(self.keep[k]) for k in self.residual_sites()],
            "heads": [len(self.heads[k]) for k in attn],
            "attn": [len(self.keep[k]) for k in attn],
            "ffn": [len(self.keep[k]) for k in self.ffn_sites()],
        }
        source = self.source_topology()
        if source is not None:
            blocks = source.rebuilt_blocks(self.kept_units(source))
            shape["depths"] = [sum(1 for b in blocks if b.stage == s) for s in range(source.num_stages)]
        if kept_blocks is not None:
            shape["blocks"] = sorted(kept_blocks)
        # the v1 names, for a plain ViT
        shape.update({"embed_dim": shape["residual"][0] if shape["residual"] else None,
                      "attn_dim": shape["attn"], "ffn_dim": shape["ffn"], "num_heads": shape["heads"]})
        return shape

    def stage_shapes(self, topology: Topology) -> list[StageShape]:
        """The pruned model's widths, one :class:`~upvit.topology.StageShape` per stage of ``topology``
        (the source model), for :meth:`Rules.check`. With units removed, a stage's kept attention and FFN
        units may come from different blocks (a hybrid removal pairs block i's attention with block i+1's
        FFN), so each width list follows the kept units of its kind."""
        kept = set(self.kept_units(topology))
        out = []
        for s in range(topology.num_stages):
            attn = [f"attn.{b}" for b in topology.blocks_of(s) if f"attn.{b}" in kept]
            ffn = [f"ffn.{b}" for b in topology.blocks_of(s) if f"ffn.{b}" in kept]
            out.append(StageShape(len(self.keep[f"res.{s}"]), tuple(len(self.heads[k]) for k in attn),
                                  tuple(len(self.keep[k]) for k in attn), tuple(len(self.keep[k]) for k in ffn)))
        return out

    def summary(self) -> str:
        """One line: the kept widths (per stage where they differ)."""
        shape = self.target_shape()
        heads = shape["heads"]
        dims = [a // h for a, h in zip(shape["attn"], heads)]
        if len(shape["residual"]) == 1 and len(set(heads)) == 1 and len(set(dims)) == 1 and len(set(shape["ffn"])) == 1:
            return f"embed {shape['residual'][0]}, {heads[0]} heads x {dims[0]}, FFN {shape['ffn'][0]}"
        return (f"stage widths {shape['residual']}, heads {heads}, head dims {dims}, FFN {shape['ffn']}")

    # ------------------------------------------------------------------ validation
    def validate(self, topology: Topology | None = None) -> None:
        """Raise a one-line UpvitError unless the plan is consistent (and fits ``topology``, or the
        recorded source when none is given)."""
        topology = topology or self.source_topology()
        if not isinstance(self.keep, dict) or not self.keep:
            raise UpvitError("plan keep must map site keys (res.0, attn.0, ffn.0, ...) to kept channel lists")
        if not isinstance(self.heads, dict):
            raise UpvitError("plan heads must map attention sites to lists of merged source heads")
        sizes = {s.key: s for s in topology.sites} if topology is not None else {}
        for key, idx in self.keep.items():
            site = sizes.get(key)
            if topology is not None and site is None:
                raise UpvitError(f"plan keeps channels of {key}, which the model does not have: make the plan "
                                 "for this model")
            _check_indices(f"keep[{key}]", idx, site.size if site else None)
        for key in self.attn_sites():
            groups = self.heads.get(key)
            if not isinstance(groups, list) or not groups or not all(
                    isinstance(g, list) and g and all(isinstance(h, int) and not isinstance(h, bool) for h in g)
                    for g in groups):
                raise UpvitError(f"plan heads[{key}] must list, for each new head, the source heads merged into it")
            if len(self.keep[key]) % len(groups):
                raise UpvitError(f"plan keep[{key}] has {len(self.keep[key])} dims, not divisible by its "
                                 f"{len(groups)} heads: keep a multiple of {len(groups)} dims")
            if topology is not None:
                src = sizes[key].heads or 1
                bad = [h for g in groups for h in g if not 0 <= h < src]
                if bad:
                    raise UpvitError(f"plan heads[{key}] names source head {bad[0]}, "
                                     f"but the model has {src} heads there")
        for key, groups in (self.bias_heads or {}).items():
            if key not in self.heads or len(groups) != len(self.heads[key]):
                raise UpvitError(f"plan bias_heads[{key}] must give one list of source heads per new head")
        if topology is not None:
            missing = [s.key for s in topology.sites if s.key not in self.keep and not self._dropped(s.key)]
            if missing:
                n_plan, n_model = self.depth, topology.num_blocks
                if n_plan != n_model and all(k.startswith(("attn.", "ffn.")) for k in missing):
                    raise UpvitError(f"plan has {n_plan} blocks but the model has {n_model}: "
                                     "make the plan for this model")
                raise UpvitError(f"plan has no kept channels for {missing[0]}: make the plan for this model")
            if self.units is not None:
                names = {u.key for u in topology.units}
                unknown = [u for u in self.units if u not in names]
                if unknown:
                    raise UpvitError(f"plan keeps unit {unknown[0]}, which the model does not have")
                if not self.units:
                    raise UpvitError("plan keeps no unit: keep at least one block")
                topology.rebuilt_blocks(self.units)  # the kept units must pair into ordinary blocks
        if self.units is not None:
            if not isinstance(self.units, list) or not all(isinstance(u, str) for u in self.units):
                raise UpvitError("plan units must list the kept unit keys (attn.0, ffn.0, ...) in forward order")
            stale = [k for k in self.keep if k.startswith(("attn.", "ffn.")) and k not in self.units]
            if stale:
                raise UpvitError(f"plan keeps channels of {stale[0]}, a unit it removes: drop keep[{stale[0]}] "
                                 "or keep the unit")

    def _dropped(self, site_key: str) -> bool:
        return self.units is not None and site_key.startswith(("attn.", "ffn.")) and site_key not in self.units

    def check_fits(self, topology: Topology) -> None:
        """Refuse a model whose shape differs from the one the plan records (if it records one)."""
        self.validate(topology)
        if self.source is not None:
            want, got = self.source_topology().shape(), topology.shape()
            if want != got:
                diff = next(k for k in want if want[k] != got[k])
                raise UpvitError(f"plan was made for a model with {diff}={want[diff]}, this model has {got[diff]}: "
                                 "make the plan for this model")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "keep": self.keep, "heads": self.heads,
                "bias_heads": self.bias_heads, "units": self.units, "source": self.source, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict) or d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise UpvitError("not an upvit plan (expected a JSON object with format 'upvit-plan')")
        version = d.get("version", 1 if "keep_embed" in d else PLAN_VERSION)
        if not isinstance(version, int) or version > PLAN_VERSION:
            raise UpvitError(f"plan has version {version}, newer than this upvit ({PLAN_VERSION}): upgrade upvit")
        if version == 1 or "keep_embed" in d:
            return cls.from_v1(d)
        missing = [k for k in ("keep", "heads") if k not in d]
        if missing:
            raise UpvitError(f"plan is missing {', '.join(missing)}: a plan needs keep and heads")
        return cls(keep=d["keep"], heads=d["heads"], source=d.get("source"), units=d.get("units"),
                   bias_heads=d.get("bias_heads"), meta=dict(d.get("meta") or {}))

    @classmethod
    def from_v1(cls, d: dict[str, Any]) -> "Plan":
        """A version-1 plan (single-stage timm ViT): keep_embed, keep_attn, keep_ffn, num_heads,
        optional source ``{embed_dim, depth, num_heads, attn_dim, ffn_dim}``."""
        missing = [k for k in ("keep_embed", "keep_attn", "keep_ffn", "num_heads") if k not in d]
        if missing:
            raise UpvitError(f"plan is missing {', '.join(missing)}: a plan needs keep_embed, keep_attn, "
                             "keep_ffn and num_heads")
        heads, attn, ffn, source = d["num_heads"], d["keep_attn"], d["keep_ffn"], d.get("source")
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            raise UpvitError(f"plan num_heads must be an integer >= 1, got {heads!r}")
        if not isinstance(attn, list) or not isinstance(ffn, list):
            raise UpvitError("plan keep_attn and keep_ffn must be lists with one index list per block")
        if len(attn) != len(ffn):
            raise UpvitError(f"plan has {len(attn)} keep_attn blocks but {len(ffn)} keep_ffn blocks: give one list "
                             "per block for both")
        if not attn:
            raise UpvitError("plan has no blocks: keep_attn and keep_ffn need one list per block")
        if source is not None and source.get("depth") is not None and source["depth"] != len(attn):
            raise UpvitError(f"plan has {len(attn)} blocks but the model has {source['depth']}: "
                             "make the plan for this model")
        _check_indices("keep_embed", d["keep_embed"], source and source.get("embed_dim"))
        for b, (a, f) in enumerate(zip(attn, ffn)):
            _check_indices(f"keep_attn[{b}]", a, source and source["attn_dim"][b])
            _check_indices(f"keep_ffn[{b}]", f, source and source["ffn_dim"][b])
            if len(a) % heads:
                raise UpvitError(f"plan keep_attn[{b}] has {len(a)} dims, not divisible by num_heads={heads}: "
                                 f"keep a multiple of {heads} dims per block")
        topo = None
        if source is not None:
            topo = Topology.single_stage("timm_vit", source["embed_dim"], list(source["num_heads"]),
                                         list(source["attn_dim"]), list(source["ffn_dim"]), vit_rules())
        keep = {"res.0": list(d["keep_embed"])}
        head_groups: dict[str, list[list[int]]] = {}
        for b, (a, f) in enumerate(zip(attn, ffn)):
            keep[f"attn.{b}"], keep[f"ffn.{b}"] = list(a), list(f)
            per = len(a) // heads
            src_hd = (source["attn_dim"][b] // source["num_heads"][b]) if source else None
            head_groups[f"attn.{b}"] = [sorted({i // src_hd for i in a[j * per:(j + 1) * per]}) if src_hd else [j]
                                        for j in range(heads)]
        meta = dict(d.get("meta") or {})
        meta.setdefault("converted_from_version", 1)
        return cls(keep=keep, heads=head_groups, source=topo.to_dict() if topo else None, meta=meta)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise UpvitError(f"plan is not valid JSON ({e})") from None

    def save(self, path: str) -> None:
        from .io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise UpvitError(f"cannot read plan {path}: {e.strerror}") from None
        return cls.from_json(text)


# ---------------------------------------------------------------------------------- make_plan
def make_plan(model: nn.Module, scores: "Scores", embed_dim: Any = None, num_heads: Any = None,
              mlp_hidden: Any = None, attn_dim: Any = None, ratio: float | None = None,
              targets: Targets | None = None, head_bias: str = "mean", keep_heads: bool = False,
              drop_units: Sequence[str] | None = None, heads: str = "merge",
              head_scores: dict[str, torch.Tensor] | None = None) -> Plan:
    """A plan keeping the best-scoring channels at the given targets (and, with ``drop_units``,
    removing those units: width and depth pruning in one plan).

    Targets: explicit values (an int for every stage or a list with one per stage; None keeps the
    model's size, ``attn_dim`` None means the residual width, the standard layout), ``ratio`` (the
    same fraction of every width, as in the paper) or a :class:`~upvit.targets.Targets`.
    ``head_bias`` ("mean" or "best"): for families whose heads carry a bias column (Swin), a merged
    head's column is the mean of its source heads' columns, or the column of its best source head
    (the one whose kept dims have the largest summed score; ties: the lower head).
    ``heads``: "merge" (the paper: each new head takes the best dims of h_b/h_t consecutive source
    heads) or "whole" (each attention site keeps its h_t best *whole* source heads, their attention
    patterns intact; :func:`upvit.selection.whole_head_problems`). The heads are ranked by
    ``head_scores`` (site -> one value per source head, e.g. the exact divergence of removing the head:
    :func:`upvit.importance.heads.head_scores`), by default by the sum of the head's channel scores.
    ``drop_units`` (or ``targets.drop_units``): unit keys to remove, e.g. ``["ffn.2", "attn.3"]`` for
    a hybrid block; the kept units must pair into ordinary blocks (:meth:`Topology.rebuilt_blocks`)
    and the family must be able to rebuild them (``adapter.check_units``). The channels of the
    remaining units are chosen by the same scores (computed on the model before removal).

    >>> plan = make_plan(deit_base, scores, embed_dim=384, num_heads=6, mlp_hidden=1536)  # doctest: +SKIP
    >>> plan.num_heads, len(plan.keep_embed), len(plan.keep_attn[0])                       # doctest: +SKIP
    (6, 384, 384)
    """
    from .adapters import get_adapter

    if heads not in HEAD_MODES:
        raise UpvitError(f"heads must be one of {', '.join(HEAD_MODES)}, got {heads!r}")
    if head_bias not in HEAD_BIAS_RULES:
        raise UpvitError(f"head_bias must be one of {', '.join(HEAD_BIAS_RULES)}, got {head_bias!r}")
    adapter = get_adapter(model)
    topology = adapter.topology()
    scores.check_matches(topology)
    for key, tensor in scores.items():
        if not torch.isfinite(tensor).all():
            raise UpvitError(f"scores for {key} contain NaN or infinite values: re-run the scoring")
    targets = resolve_targets(topology, embed_dim, num_heads, mlp_hidden, attn_dim, ratio, targets, keep_heads)
    drop = tuple(dict.fromkeys([*targets.drop_units, *(drop_units or ())]))
    units = None
    if drop:
        for key in drop:
            topology.unit_index(key)  # one clear line for a unit the model does not have
        units = [u.key for u in topology.units if u.key not in drop]
        adapter.check_units(units)
        targets = dataclasses.replace(targets, drop_units=drop)
    if heads == "whole":
        head_scores = head_scores if head_scores is not None else summed_head_scores(topology, scores)
        selection = whole_head_problems(topology, targets, head_scores)
    else:
        selection = problems(topology, targets)
    keep: dict[str, list[int]] = {}
    groups: dict[str, list[list[int]]] = {}
    bias: dict[str, list[list[int]]] = {}
    for p in selection:
        if p.site in drop:
            continue
        kept = top_k(scores[p.site], p.channels, p.k)
        keep.setdefault(p.site, []).extend(kept)
        if p.head is not None:
            groups.setdefault(p.site, []).append(list(p.source_heads))
            if head_bias == "best":
                hd = topology.site(p.site).head_dim
                values = scores[p.site].detach().to(torch.float64).cpu()
                sums = [float(sum(values[i] for i in kept if i // hd == h)) for h in p.source_heads]
                best = max(range(len(sums)), key=lambda i: (sums[i], -i))
                bias.setdefault(p.site, []).append([p.source_heads[best]])
    plan = Plan(keep=keep, heads=groups, source=topology.to_dict(), units=units,
                bias_heads=bias if head_bias == "best" and topology.rules.head_bias else None,
                meta={"criterion": scores.meta.get("criterion"), "targets": targets.to_dict(),
                      "head_bias": head_bias if topology.rules.head_bias else None,
                      **({"heads": "whole"} if heads == "whole" else {})})
    adapter.check_plan(plan)
    return plan


def summed_head_scores(topology: Topology, scores: "Scores") -> dict[str, torch.Tensor]:
    """Per attention site, one value per source head: the sum of its dims' scores (the default ranking
    of ``make_plan(heads="whole")`` when no whole-head scores are given)."""
    out = {}
    for site in topology.sites:
        if site.kind == "attn" and site.key in scores:
            values = scores[site.key].detach().to(torch.float64).cpu()
            out[site.key] = values.view(site.heads, site.head_dim).sum(1)
    return out


__all__ = ["Plan", "make_plan", "summed_head_scores", "vit_rules", "PLAN_FORMAT", "PLAN_VERSION"]
