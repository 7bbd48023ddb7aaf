"""Which channels are kept: the selection problems of a target shape, and the one top-k rule.

A target splits every site into *selection problems*, each "keep the best k of these channels"
(docs/method.md section 3): a residual site keeps the stage's residual width of all its channels;
an FFN site keeps the FFN width of its units; an attention site of h_b heads pruned to h_t heads
is one problem per *merged head*: each run of h_b/h_t consecutive source heads becomes one head,
keeping its best attn_t/h_t dims. :func:`upvit.plan.make_plan` solves the problems with scores, and
the hybrid scorer (:mod:`upvit.importance.hybrid`) verifies exactly the same problems, so both
share this module: the same groups, the same order, the same tie rule (ties keep the lower index).

>>> import torch
>>> top_k(torch.tensor([0.3, 0.9, 0.3, 0.1]), [0, 1, 2, 3], 2)
[0, 1]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import UpvitError
from .targets import Targets
from .topology import Topology


@dataclass(frozen=True)
class Problem:
    """Keep the best ``k`` of ``channels`` (indices into site ``site``); ``head`` is the merged head
    index for an attention problem, whose source heads are ``source_heads``."""

    site: str
    channels: tuple[int, ...]
    k: int
    head: int | None = None
    source_heads: tuple[int, ...] = ()


def merge_groups(source_heads: int, target_heads: int) -> list[list[int]]:
    """Source heads merged into each target head: consecutive runs of ``source/target`` heads."""
    per = source_heads // target_heads
    return [list(range(j * per, (j + 1) * per)) for j in range(target_heads)]


def problems(topology: Topology, targets: Targets) -> list[Problem]:
    """Every selection problem of ``targets`` (checked first), in site order; k may equal the
    problem's size (everything kept)."""
    targets.check(topology)
    out: list[Problem] = []
    for site in topology.sites:
        st = targets.stages[site.stage]
        if site.kind == "residual":
            out.append(Problem(site.key, tuple(range(site.size)), st.residual))
        elif site.kind == "ffn":
            out.append(Problem(site.key, tuple(range(site.size)), st.ffn))
        else:
            hd = site.head_dim
            per_head = st.attn // st.heads
            for j, group in enumerate(merge_groups(site.heads or 1, st.heads)):
                channels = tuple(d for h in group for d in range(h * hd, (h + 1) * hd))
                out.append(Problem(site.key, channels, per_head, j, tuple(group)))
    return out


HEAD_MODES = ("merge", "whole")


def whole_head_problems(topology: Topology, targets: Targets,
                        head_values: dict[str, torch.Tensor]) -> list[Problem]:
    """The selection problems with *whole* heads (``make_plan(heads="whole")``): each attention site keeps
    its ``h_t`` best source heads by ``head_values`` (site -> one value per source head, higher is more
    important; ties keep the lower head), in their original order, each as one new head keeping its
    best ``attn_t / h_t`` dims (all of them where that is the source head dim). Residual and FFN
    problems are those of :func:`problems`."""
    out: list[Problem] = []
    for p in problems(topology, targets):
        if p.head is None:
            out.append(p)
            continue
        if p.head:  # one whole-head set per site: built from the site's first merged problem
            continue
        site = topology.site(p.site)
        st = targets.stages[site.stage]
        hd = site.head_dim
        values = head_values.get(p.site)
        if values is None or len(values) != site.heads:
            raise UpvitError(f"whole-head selection needs one value per head of {p.site} ({site.heads} heads)")
        kept = top_k(values, range(site.heads), st.heads)
        for j, h in enumerate(kept):
            out.append(Problem(p.site, tuple(range(h * hd, (h + 1) * hd)), st.attn // st.heads, j, (h,)))
    return out


def order(values: torch.Tensor, channels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``channels`` sorted by ``values`` (indexed by channel), best first; ties go to the lower index."""
    ch = torch.as_tensor(channels, dtype=torch.long)
    ch = ch.sort().values
    v = values.detach().to(torch.float64).cpu()[ch]
    return ch[torch.argsort(-v, stable=True)]


def top_k(values: torch.Tensor, channels: Sequence[int] | torch.Tensor, k: int) -> list[int]:
    """The ``k`` best of ``channels`` by ``values``, in ascending (original) order."""
    return sorted(order(values, channels)[:k].tolist())


__all__ = ["HEAD_MODES", "Problem", "merge_groups", "order", "problems", "top_k", "whole_head_problems"]
