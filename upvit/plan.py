"""Scores + targets -> a Plan: which channels of every site survive (docs/method.md section 3).

A :class:`Plan` is plain data (JSON-serialisable, versioned), replayable and writable by hand:

* ``keep_embed``: kept residual channels (component 1), top-k by score, in original order;
* ``keep_attn[b]``: kept attention dims of block b (component 2), ordered head by head: new head j
  is ``keep_attn[b][j * d : (j + 1) * d]`` with ``d = len(keep_attn[b]) // num_heads``;
* ``keep_ffn[b]``: kept FFN hidden units of block b (component 3), top-k by score, in original order;
* ``num_heads``: heads of every pruned block.

Head merging: ``h_b`` source heads become ``h_t`` heads by merging each run of ``h_b / h_t``
consecutive heads into one (12 -> 3 merges heads 0-3, 4-7, 8-11); inside each merged head the
``attn_dim / h_t`` highest-scoring dims are kept, in original order.

>>> plan = Plan(keep_embed=[0, 2], keep_attn=[[0, 2]], keep_ffn=[[1, 3, 5]], num_heads=1)
>>> Plan.from_json(plan.to_json()) == plan
True
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UpvitError

PLAN_FORMAT = "upvit-plan"
PLAN_VERSION = 1


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
    """Kept channel indices per site plus the new head count. See the module docstring.

    ``source`` optionally records the shape the plan was made for (``Adapter.describe()``); when
    present, applying the plan to a model of another shape is refused.
    """

    keep_embed: list[int]
    keep_attn: list[list[int]]
    keep_ffn: list[list[int]]
    num_heads: int
    source: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ shape of the result
    @property
    def depth(self) -> int:
        return len(self.keep_attn)

    @property
    def embed_dim(self) -> int:
        return len(self.keep_embed)

    def attn_dim(self, block: int = 0) -> int:
        return len(self.keep_attn[block])

    def head_dim(self, block: int = 0) -> int:
        return len(self.keep_attn[block]) // self.num_heads

    def ffn_dim(self, block: int = 0) -> int:
        return len(self.keep_ffn[block])

    def target_shape(self) -> dict[str, Any]:
        """The pruned model's shape, in the form of ``Adapter.describe()``'s size entries."""
        return {"embed_dim": self.embed_dim, "depth": self.depth, "num_heads": [self.num_heads] * self.depth,
                "attn_dim": [len(a) for a in self.keep_attn], "ffn_dim": [len(f) for f in self.keep_ffn]}

    # ------------------------------------------------------------------ validation
    def validate(self, source: dict[str, Any] | None = None) -> None:
        """Raise a one-line UpvitError unless the plan is consistent (and fits ``source``, if given).

        ``source`` defaults to the recorded ``self.source``; it is a dict like ``Adapter.describe()``.
        """
        source = source if source is not None else self.source
        if not isinstance(self.num_heads, int) or isinstance(self.num_heads, bool) or self.num_heads < 1:
            raise UpvitError(f"plan num_heads must be an integer >= 1, got {self.num_heads!r}")
        if not isinstance(self.keep_attn, list) or not isinstance(self.keep_ffn, list):
            raise UpvitError("plan keep_attn and keep_ffn must be lists with one index list per block")
        if len(self.keep_attn) != len(self.keep_ffn):
            raise UpvitError(f"plan has {len(self.keep_attn)} keep_attn blocks but {len(self.keep_ffn)} keep_ffn "
                             "blocks: give one list per block for both")
        if not self.keep_attn:
            raise UpvitError("plan has no blocks: keep_attn and keep_ffn need one list per block")
        if source is not None and source.get("depth") is not None and source["depth"] != self.depth:
            raise UpvitError(f"plan has {self.depth} blocks but the model has {source['depth']}: "
                             "make the plan for this model")
        _check_indices("keep_embed", self.keep_embed, source and source.get("embed_dim"))
        for b, (attn, ffn) in enumerate(zip(self.keep_attn, self.keep_ffn)):
            _check_indices(f"keep_attn[{b}]", attn, source and source["attn_dim"][b])
            _check_indices(f"keep_ffn[{b}]", ffn, source and source["ffn_dim"][b])
            if len(attn) % self.num_heads:
                raise UpvitError(f"plan keep_attn[{b}] has {len(attn)} dims, not divisible by num_heads="
                                 f"{self.num_heads}: keep a multiple of {self.num_heads} dims per block")

    def check_fits(self, source: dict[str, Any]) -> None:
        """Refuse a model whose shape differs from the one the plan records (if it records one)."""
        self.validate(source)
        if self.source is not None:
            keys = ("embed_dim", "depth", "num_heads", "attn_dim", "ffn_dim")
            want = {k: self.source.get(k) for k in keys}
            got = {k: source.get(k) for k in keys}
            if want != got:
                diff = next(k for k in keys if want[k] != got[k])
                raise UpvitError(f"plan was made for a model with {diff}={want[diff]}, this model has "
                                 f"{got[diff]}: make the plan for this model")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict) or d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise UpvitError("not an upvit plan (expected a JSON object with format 'upvit-plan')")
        if d.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise UpvitError(f"plan has version {d['version']}, newer than this upvit ({PLAN_VERSION}): upgrade upvit")
        missing = [k for k in ("keep_embed", "keep_attn", "keep_ffn", "num_heads") if k not in d]
        if missing:
            raise UpvitError(f"plan is missing {', '.join(missing)}: a plan needs keep_embed, keep_attn, "
                             "keep_ffn and num_heads")
        return cls(keep_embed=d["keep_embed"], keep_attn=d["keep_attn"], keep_ffn=d["keep_ffn"],
                   num_heads=d["num_heads"], source=d.get("source"), meta=dict(d.get("meta") or {}))

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
def _top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending (original) order; ties go to the lower index."""
    order = torch.argsort(-scores.detach().to(torch.float64).cpu(), stable=True)
    return sorted(order[:k].tolist())


def _check_target(name: str, value: Any, source: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UpvitError(f"{name} must be an integer, got {value!r}")
    if value < 1 or value > source:
        raise UpvitError(f"{name}={value} is impossible: the model has {source}, choose 1..{source}")
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def targets_from_ratio(adapter, ratio: float) -> dict[str, int]:
    """Targets keeping ``ratio`` of embed dims, heads and FFN units (rounded); attn_dim = embed_dim."""
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise UpvitError(f"ratio must be in (0, 1], got {ratio!r}")
    heads = adapter.num_heads(0)
    h_t = max(1, round(heads * ratio))
    if heads % h_t:
        ok = ", ".join(f"{d / heads:g}" for d in _divisors(heads))
        raise UpvitError(f"ratio {ratio:g} gives {h_t} of {heads} heads, which does not divide {heads}: "
                         f"use a ratio whose head count divides it ({ok}) or give the targets explicitly")
    embed = max(h_t, round(adapter.embed_dim * ratio / h_t) * h_t)
    return {"embed_dim": embed, "num_heads": h_t, "mlp_hidden": max(1, round(adapter.ffn_dim(0) * ratio)),
            "attn_dim": embed}


def make_plan(model: nn.Module, scores, embed_dim: int | None = None, num_heads: int | None = None,
              mlp_hidden: int | None = None, attn_dim: int | None = None, ratio: float | None = None) -> Plan:
    """A plan keeping the best-scoring channels at the given targets (same targets in every block).

    Targets default to the model's own sizes; ``attn_dim`` defaults to ``embed_dim`` (the standard
    ViT layout). ``ratio`` is a shorthand for all of them (not combinable with explicit targets).

    >>> plan = make_plan(deit_base, scores, embed_dim=384, num_heads=6, mlp_hidden=1536)  # doctest: +SKIP
    >>> plan.num_heads, len(plan.keep_embed), len(plan.keep_attn[0])                       # doctest: +SKIP
    (6, 384, 384)
    """
    from .adapters import get_adapter

    adapter = get_adapter(model)
    scores.check_matches(adapter)
    for key, tensor in scores.items():
        if not torch.isfinite(tensor).all():
            raise UpvitError(f"scores for {key} contain NaN or infinite values: re-run the scoring")
    if ratio is not None:
        if any(v is not None for v in (embed_dim, num_heads, mlp_hidden, attn_dim)):
            raise UpvitError("give either ratio or explicit targets (embed_dim, num_heads, mlp_hidden, attn_dim), not both")
        t = targets_from_ratio(adapter, ratio)
        embed_dim, num_heads, mlp_hidden, attn_dim = t["embed_dim"], t["num_heads"], t["mlp_hidden"], t["attn_dim"]

    depth = adapter.num_blocks
    embed_dim = _check_target("embed_dim", adapter.embed_dim if embed_dim is None else embed_dim, adapter.embed_dim)
    if attn_dim is None:
        attn_dim = embed_dim
    for b in range(depth):
        h_b, a_b, f_b = adapter.num_heads(b), adapter.attn_dim(b), adapter.ffn_dim(b)
        h_t = _check_target("num_heads", h_b if num_heads is None else num_heads, h_b)
        _check_target("attn_dim", attn_dim, a_b)
        _check_target("mlp_hidden", f_b if mlp_hidden is None else mlp_hidden, f_b)
        if h_b % h_t:
            ok = ", ".join(map(str, _divisors(h_b)))
            raise UpvitError(f"num_heads={h_t} does not divide the model's {h_b} heads, so heads cannot be merged "
                             f"evenly: choose one of {ok}")
        if attn_dim % h_t:
            what = f"attn_dim={attn_dim}" if attn_dim != embed_dim else f"embed_dim={embed_dim} (also the attention width)"
            raise UpvitError(f"{what} is not divisible by num_heads={h_t}: "
                             f"choose a multiple of {h_t} (e.g. {max(h_t, attn_dim // h_t * h_t)})")
    num_heads = adapter.num_heads(0) if num_heads is None else num_heads
    mlp_hidden = adapter.ffn_dim(0) if mlp_hidden is None else mlp_hidden

    keep_attn, keep_ffn = [], []
    for b in range(depth):
        s = scores.attn[b]
        group = adapter.num_heads(b) // num_heads * (adapter.attn_dim(b) // adapter.num_heads(b))
        per_head = attn_dim // num_heads
        kept = []
        for j in range(num_heads):  # merged head j = source dims [j*group, (j+1)*group)
            kept += [j * group + i for i in _top_k(s[j * group:(j + 1) * group], per_head)]
        keep_attn.append(kept)
        keep_ffn.append(_top_k(scores.ffn[b], mlp_hidden))
    plan = Plan(keep_embed=_top_k(scores.embed, embed_dim), keep_attn=keep_attn, keep_ffn=keep_ffn,
                num_heads=num_heads, source=adapter.describe(),
                meta={"criterion": scores.meta.get("criterion"),
                      "targets": {"embed_dim": embed_dim, "num_heads": num_heads, "mlp_hidden": mlp_hidden,
                                  "attn_dim": attn_dim}})
    check = getattr(adapter, "check_plan", None)
    if check is not None:
        check(plan)
    return plan


__all__ = ["Plan", "make_plan", "targets_from_ratio", "PLAN_FORMAT", "PLAN_VERSION"]
