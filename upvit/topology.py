"""A model's prunable structure as plain data: sites, units, stages and the family's rules.

Every adapter declares its model's :class:`Topology`; everything downstream (scores, plans, targets,
the scoring engines, depth pruning) is keyed by it, so no module outside ``upvit/adapters/`` needs
to know a family's layout.

* A :class:`Site` is one group of channels scored together (docs/method.md section 1):
  ``res.{s}`` the residual stream of stage s (one stage for a plain ViT, one per resolution for
  Swin/PVT), ``attn.{b}`` the attention dims of block b, ``ffn.{b}`` the FFN hidden units of block b.
* A :class:`Unit` is one residual branch in forward order (``attn.{b}`` or ``ffn.{b}``): the
  engines run a model unit by unit, and depth pruning removes units. A stage transition (Swin's
  patch merging, PVT's strided patch embedding) belongs to the first unit of the new stage.
* :class:`Rules` say what the family's constructor can express (which widths must be equal within
  a stage, whether the attention width is tied to the residual width, whether residual widths must
  keep fixed ratios): targets and plans are checked against them before any work is done.

>>> topo = Topology.single_stage("demo", embed=8, heads=[2, 2], attn=[8, 8], ffn=[16, 16],
...                              rules=Rules("demo model"))
>>> [s.key for s in topo.sites]
['res.0', 'attn.0', 'ffn.0', 'attn.1', 'ffn.1']
>>> [u.key for u in topo.units]
['attn.0', 'ffn.0', 'attn.1', 'ffn.1']
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Sequence

from .errors import UpvitError

SiteKind = Literal["residual", "attn", "ffn"]
UnitKind = Literal["attn", "ffn"]


def residual_key(stage: int) -> str:
    return f"res.{stage}"


@dataclass(frozen=True)
class Site:
    """One scored group of channels; ``key`` is the only name downstream code uses."""

    key: str
    kind: SiteKind
    size: int
    stage: int
    block: int | None = None  # attn/ffn: the block (global index, counted over all stages)
    heads: int | None = None  # attn: number of heads (head dim = size // heads)

    @property
    def head_dim(self) -> int:
        if not self.heads:
            raise UpvitError(f"site {self.key} has no heads")
        return self.size // self.heads


@dataclass(frozen=True)
class Unit:
    """One residual branch in forward order: a depth-pruning candidate and a step of the engines."""

    key: str
    kind: UnitKind
    block: int
    stage: int


@dataclass(frozen=True)
class PairedBlock:
    """One block of a model rebuilt without some units: the attention unit and the FFN unit (source
    names) that become the ``stage``'s next block (see :meth:`Topology.rebuilt_blocks`)."""

    stage: int
    attn: str
    ffn: str


# what the rules and targets call each width in messages: the single-stage parameter names users know from
# timm and :func:`upvit.make_plan`, with ``[s]`` for stage s of a multi-stage model
WIDTH_NAMES = {"residual": "embed_dim", "heads": "num_heads", "attn": "attn_dim", "ffn": "mlp_hidden"}
_WHAT = {"heads": "head count", "attn": "attention width", "ffn": "FFN width"}


def width_name(field_name: str, stage: int, multi: bool) -> str:
    return f"{WIDTH_NAMES[field_name]}[{stage}]" if multi else WIDTH_NAMES[field_name]


@dataclass(frozen=True)
class StageShape:
    """The widths of one stage of a (pruned) model, what :meth:`Rules.check` judges: the residual width
    and, per unit the stage keeps (forward order), the head count and attention width of each attention
    unit and the width of each FFN unit. Targets give one entry per stage; a plan one per kept unit."""

    residual: int
    heads: tuple[int, ...] = ()
    attn: tuple[int, ...] = ()
    ffn: tuple[int, ...] = ()


@dataclass(frozen=True)
class Rules:
    """What the family's constructor can express (checked before scoring and before surgery).

    ``uniform`` names the per-block widths that must be equal across the blocks of a stage
    ("heads", "attn", "ffn"); ``uniform_across_stages`` those that must be equal everywhere
    (a plain ViT has one stage, so the two coincide). ``attn_tied_to_residual``: the attention
    width equals the stage's residual width (timm ViT/DeiT, PVTv2, BERT, GPT-2).
    ``residual_ratios``: residual widths must keep these proportions (timm Swin: 1, 2, 4, 8).
    ``head_bias``: attention heads carry a per-head bias column (Swin's relative-position table)
    that head merging must merge. ``depth_pruning``: units may be removed at all; which sets of
    removed units the family can rebuild is decided by :meth:`Topology.rebuilt_blocks` (the kept
    units must pair into ordinary blocks) and the adapter's ``check_units`` (e.g. Swin keeps the
    shift of every remaining block, so blocks inside a shifted stage leave in pairs).
    """

    family: str
    uniform: frozenset[str] = frozenset({"heads", "attn", "ffn"})
    uniform_across_stages: frozenset[str] = frozenset()
    attn_tied_to_residual: bool = False
    residual_ratios: tuple[float, ...] | None = None
    head_bias: bool = False
    depth_pruning: bool = True
    notes: tuple[str, ...] = ()

    def check(self, stages: "Sequence[StageShape]") -> None:
        """Raise a one-line UpvitError unless the family's constructor can express a model of this shape
        (one :class:`StageShape` per stage). The one statement of the rules: targets
        (:meth:`upvit.targets.Targets.check`) and plans (:meth:`upvit.adapters.base.Adapter.check_plan`)
        both come here."""
        multi = len(stages) > 1
        if self.residual_ratios and multi:  # the family's own constraint first: it decides what else is possible
            check_ratios(self.family, self.residual_ratios, [st.residual for st in stages])
        for s, st in enumerate(stages):
            for name in ("heads", "attn", "ffn"):
                seen = list(getattr(st, name))
                if name in self.uniform and len(set(seen)) > 1:
                    where = "every block of a stage" if multi else "every block"
                    raise UpvitError(f"{self.family} needs the same {_WHAT[name]} in {where}: keep the same number "
                                     f"in every block (got {seen})")
            bad = next((a for a in st.attn if a != st.residual), None)
            if self.attn_tied_to_residual and bad is not None:
                raise UpvitError(f"{self.family} ties the attention width to embed_dim, "
                                 f"so {width_name('attn', s, multi)} "
                                 f"({bad}) must equal {width_name('residual', s, multi)} ({st.residual}): "
                                 "leave attn_dim "
                                 "unset")
        for name in sorted(self.uniform_across_stages):
            seen = [getattr(st, name)[0] for st in stages if getattr(st, name)]
            if len(set(seen)) > 1:
                raise UpvitError(f"{self.family} needs the same {WIDTH_NAMES[name]} in every stage, got {seen}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["uniform"] = sorted(self.uniform)
        d["uniform_across_stages"] = sorted(self.uniform_across_stages)
        d["residual_ratios"] = list(self.residual_ratios) if self.residual_ratios else None
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rules":
        d = dict(d)
        d["uniform"] = frozenset(d.get("uniform", ()))
        d["uniform_across_stages"] = frozenset(d.get("uniform_across_stages", ()))
        if d.get("residual_ratios") is not None:
            d["residual_ratios"] = tuple(d["residual_ratios"])
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Topology:
    """A model's sites, units and rules. JSON round-trip with :meth:`to_dict` / :meth:`from_dict`.

    ``head_tokens``: the number of leading tokens the head reads (class/distillation tokens), when
    the tokens after them stop mattering once the last attention has run (the last FFN may then run
    on those tokens only); None when the head reads every token (Swin, PVT: average pooling; LMs).
    """

    family: str
    sites: tuple[Site, ...]
    units: tuple[Unit, ...]
    rules: Rules
    head_tokens: int | None = None
    _index: dict[str, Site] = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s.key: s for s in self.sites})
        if len(self._index) != len(self.sites):
            raise UpvitError(f"topology of {self.family} lists a site twice")

    # ------------------------------------------------------------------ lookup
    def site(self, key: str) -> Site:
        try:
            return self._index[key]
        except KeyError:
            raise UpvitError(f"this {self.family} model has no site {key!r}: its sites are "
                             f"{_summarise(s.key for s in self.sites)}") from None

    def has_site(self, key: str) -> bool:
        return key in self._index

    def sites_of(self, kind: SiteKind) -> list[Site]:
        return [s for s in self.sites if s.kind == kind]

    @property
    def num_stages(self) -> int:
        return len(self.sites_of("residual"))

    @property
    def num_blocks(self) -> int:
        return len(self.sites_of("attn"))

    def residual(self, stage: int) -> Site:
        return self.site(residual_key(stage))

    def blocks_of(self, stage: int) -> list[int]:
        return [s.block for s in self.sites_of("attn") if s.stage == stage]  # type: ignore[misc]

    def unit_index(self, key: str) -> int:
        for i, u in enumerate(self.units):
            if u.key == key:
                return i
        raise UpvitError(f"this {self.family} model has no unit {key!r}")

    def start_unit(self, key: str) -> int:
        """Index of the unit from which the mask of site ``key`` first acts (-1: from the input).

        Residual stage 0 acts in the stem; residual stage s > 0 from the first unit of stage s
        (which begins with the stage transition); an attention or FFN site in its own unit."""
        site = self.site(key)
        if site.kind == "residual":
            if site.stage == 0:
                return -1
            return min(i for i, u in enumerate(self.units) if u.stage == site.stage)
        return self.unit_index(key)

    # ------------------------------------------------------------------ depth: removable units
    def rebuilt_blocks(self, kept: Iterable[str]) -> list[PairedBlock]:
        """The ordinary blocks that ``kept`` units form, in forward order (raises unless they pair up).

        Every residual branch reads the stream and adds to it, so removing units leaves a sequence of
        branches; within each stage it must read attention, FFN, attention, FFN, ... so that the k-th
        attention and the k-th FFN form the stage's new block k. Removing a whole block (``attn.i`` +
        ``ffn.i``) or a hybrid block (``ffn.i`` + ``attn.i+1``) keeps that pattern: after a hybrid,
        block i's attention (with its norm) and block i+1's FFN (with its norm) form one pre-norm
        block. Each stage keeps at least one block; a stage transition stays with its stage.

        >>> topo = Topology.single_stage("demo", embed=8, heads=[2] * 3, attn=[8] * 3, ffn=[16] * 3,
        ...                              rules=Rules("demo model"))
        >>> [(b.attn, b.ffn) for b in topo.rebuilt_blocks(["attn.0", "ffn.1", "attn.2", "ffn.2"])]
        [('attn.0', 'ffn.1'), ('attn.2', 'ffn.2')]
        """
        kept = list(kept)
        index = {u.key: i for i, u in enumerate(self.units)}
        unknown = [k for k in kept if k not in index]
        if unknown:
            raise UpvitError(f"this {self.family} model has no unit {unknown[0]!r}: its units are "
                             f"{_summarise(u.key for u in self.units)}")
        if len(set(kept)) != len(kept):
            dup = next(k for k in kept if kept.count(k) > 1)
            raise UpvitError(f"unit {dup} is listed twice: list every kept unit once")
        if [index[k] for k in kept] != sorted(index[k] for k in kept):
            raise UpvitError("kept units must be listed in forward order (attn.0, ffn.0, attn.1, ...)")
        keep = set(kept)
        multi = self.num_stages > 1
        out: list[PairedBlock] = []
        for s in range(self.num_stages):
            where = f" of stage {s}" if multi else ""
            seq = [u for u in self.units if u.stage == s and u.key in keep]
            if not seq:
                raise UpvitError(f"every block{where} would be removed: keep at least one block"
                                 + (" per stage" if multi else ""))
            for j, u in enumerate(seq):
                want = "attn" if j % 2 == 0 else "ffn"
                if u.kind != want:
                    after = f"{u.key} follows {seq[j - 1].key}" if j else f"{u.key} comes first"
                    raise UpvitError(f"the kept units{where} do not pair into blocks ({after}): remove units in "
                                     "consecutive pairs, a block (attn.i, ffn.i) or a hybrid (ffn.i, attn.i+1)")
            if len(seq) % 2:
                raise UpvitError(f"the kept units{where} do not pair into blocks ({seq[-1].key} comes last): remove "
                                 "units in consecutive pairs, a block (attn.i, ffn.i) or a hybrid (ffn.i, attn.i+1)")
            out += [PairedBlock(s, seq[j].key, seq[j + 1].key) for j in range(0, len(seq), 2)]
        return out

    def unit_runs(self, length: int) -> list[tuple[str, ...]]:
        """Every run of ``length`` consecutive units inside one stage, in forward order (depth-pruning
        candidates: length 2 gives the blocks and hybrid blocks, 2 * depth - 1 of them per stage)."""
        out = []
        for s in range(self.num_stages):
            keys = [u.key for u in self.units if u.stage == s]
            out += [tuple(keys[i:i + length]) for i in range(len(keys) - length + 1)]
        return out

    # ------------------------------------------------------------------ shape summaries
    def shape(self) -> dict[str, Any]:
        """Per-stage widths and per-block sizes (for messages, metadata and fingerprints)."""
        return {
            "residual": [s.size for s in self.sites_of("residual")],
            "depths": [len(self.blocks_of(s)) for s in range(self.num_stages)],
            "heads": [s.heads for s in self.sites_of("attn")],
            "attn": [s.size for s in self.sites_of("attn")],
            "ffn": [s.size for s in self.sites_of("ffn")],
        }

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "head_tokens": self.head_tokens,
                "sites": [{k: v for k, v in asdict(s).items() if v is not None} for s in self.sites],
                "units": [asdict(u) for u in self.units], "rules": self.rules.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Topology":
        try:
            return cls(family=d["family"], sites=tuple(Site(**s) for s in d["sites"]),
                       units=tuple(Unit(**u) for u in d["units"]), rules=Rules.from_dict(d["rules"]),
                       head_tokens=d.get("head_tokens"))
        except (KeyError, TypeError) as e:
            raise UpvitError(f"not a valid upvit topology record ({e}): re-create the file with this upvit") from None

    # ------------------------------------------------------------------ builders
    @classmethod
    def single_stage(cls, family: str, embed: int, heads: list[int], attn: list[int], ffn: list[int],
                     rules: Rules, head_tokens: int | None = None) -> "Topology":
        """The plain ViT layout: one residual stream and ``len(attn)`` pre-norm blocks."""
        return cls.staged(family, [embed], [len(attn)], heads, attn, ffn, rules, head_tokens)

    @classmethod
    def staged(cls, family: str, residual: list[int], depths: list[int], heads: list[int], attn: list[int],
               ffn: list[int], rules: Rules, head_tokens: int | None = None) -> "Topology":
        """Stages of ``depths[s]`` blocks on residual width ``residual[s]``; per-block lists in forward order."""
        if len(residual) != len(depths) or not (len(heads) == len(attn) == len(ffn) == sum(depths)):
            raise UpvitError("topology lists disagree: one residual width per stage and one entry per block")
        sites: list[Site] = [Site(residual_key(s), "residual", w, s) for s, w in enumerate(residual)]
        units: list[Unit] = []
        b = 0
        for s, depth in enumerate(depths):
            for _ in range(depth):
                sites += [Site(f"attn.{b}", "attn", attn[b], s, b, heads[b]), Site(f"ffn.{b}", "ffn", ffn[b], s, b)]
                units += [Unit(f"attn.{b}", "attn", b, s), Unit(f"ffn.{b}", "ffn", b, s)]
                b += 1
        # scoring order: residual stage s, then its blocks (keeps "res.0, attn.0, ffn.0, ..." for a ViT)
        ordered = []
        for s in range(len(residual)):
            ordered.append(sites[s])
            ordered += [x for x in sites[len(residual):] if x.stage == s]
        return cls(family, tuple(ordered), tuple(units), rules, head_tokens)


def check_ratios(family: str, ratios: Sequence[float], widths: list[int]) -> None:
    """Refuse residual widths that do not keep the family's fixed proportions (timm Swin: 1:2:4:8)."""
    base = widths[0] / ratios[0]
    expected = [base * r for r in ratios]
    if any(abs(w - e) > 1e-9 for w, e in zip(widths, expected)):
        pattern = ":".join(f"{r:g}" for r in ratios)
        suggestion = [int(round(widths[0] * r / ratios[0])) for r in ratios]
        raise UpvitError(f"{family} keeps the stage widths in the ratio {pattern} (timm builds them from one "
                         f"embed_dim), so embed_dim={widths} cannot be built: use e.g. {suggestion}")


def _summarise(keys: Iterable[str], limit: int = 6) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


__all__ = ["PairedBlock", "Site", "StageShape", "Unit", "Rules", "Topology", "WIDTH_NAMES", "check_ratios",
           "residual_key", "width_name"]
