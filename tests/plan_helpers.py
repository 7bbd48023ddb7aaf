"""Helpers for the plan/surgery tests: scores, keep-masks from a plan, a closed-form parameter count."""
from __future__ import annotations

import torch

from upvit.adapters import Masks, get_adapter
from upvit.importance.scores import Scores


def random_scores(model, seed: int = 0) -> Scores:
    topo = get_adapter(model).topology()
    g = torch.Generator().manual_seed(seed)
    values = {s.key: torch.rand(s.size, generator=g, dtype=torch.float64) for s in topo.sites}
    return Scores.from_sites(topo, values, {"criterion": "random-test"})


def keep_mask(indices: list[int], size: int) -> torch.Tensor:
    m = torch.zeros(size)
    m[indices] = 1.0
    return m


def plan_masks(model, plan, sites=("embed", "attn", "ffn")) -> Masks:
    """Keep-masks on the original model that correspond to ``plan`` (for the sites named)."""
    topo = get_adapter(model).topology()
    kinds = {"embed": "residual", "attn": "attn", "ffn": "ffn"}
    wanted = {kinds.get(s, s) for s in sites}
    return Masks({s.key: keep_mask(plan.keep[s.key], s.size) for s in topo.sites
                  if s.kind in wanted and s.key in plan.keep})  # a removed unit has no keep entry


def vit_param_count(D: int, H: int, depth: int, img: int, patch: int, chans: int, classes: int,
                    distilled: bool = False) -> int:
    """Parameters of a timm ViT/DeiT (class token, learned pos embed, qkv bias, final norm, linear head),
    written out from the architecture, independently of timm and of upvit."""
    n_patches = (img // patch) ** 2
    prefix = 2 if distilled else 1
    embed = D * chans * patch * patch + D + prefix * D + (n_patches + prefix) * D
    block = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (H * D + H) + (D * H + D)
    heads = (D * classes + classes) * (2 if distilled else 1)
    return embed + depth * block + 2 * D + heads


def vit_scores(embed, attn, ffn) -> Scores:
    """Scores of a one-stage (ViT) model from the residual, per-block attention and FFN tensors."""
    values = {"res.0": embed}
    for b, (a, f) in enumerate(zip(attn, ffn)):
        values[f"attn.{b}"], values[f"ffn.{b}"] = a, f
    return Scores(values)


def scrambled(scorer):
    """``scorer`` with its scores permuted within every site (seeded): a misleading screen, which makes the
    hybrid scorer widen its bands over several exact rounds."""
    def wrapped(adapter, images, **options):
        s = scorer(adapter, images, **options)
        g = torch.Generator().manual_seed(0)
        for _, t in s.items():
            t.copy_(t[torch.randperm(t.numel(), generator=g)])
        return s

    return wrapped
