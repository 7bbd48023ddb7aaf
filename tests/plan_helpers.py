"""Helpers for the plan/surgery tests: scores, keep-masks from a plan, a closed-form parameter count."""
from __future__ import annotations

import torch

from upvit.adapters import Masks, get_adapter
from upvit.importance.scores import Scores


def random_scores(model, seed: int = 0) -> Scores:
    a = get_adapter(model)
    g = torch.Generator().manual_seed(seed)

    def r(n):
        return torch.rand(n, generator=g, dtype=torch.float64)

    return Scores(r(a.embed_dim), [r(a.attn_dim(b)) for b in range(a.num_blocks)],
                  [r(a.ffn_dim(b)) for b in range(a.num_blocks)], {"criterion": "random-test"})


def keep_mask(indices: list[int], size: int) -> torch.Tensor:
    m = torch.zeros(size)
    m[indices] = 1.0
    return m


def plan_masks(model, plan, sites=("embed", "attn", "ffn")) -> Masks:
    """Keep-masks on the original model that correspond to ``plan`` (for the sites named)."""
    a = get_adapter(model)
    by_site = {}
    if "embed" in sites:
        by_site["embed"] = keep_mask(plan.keep_embed, a.embed_dim)
    for b in range(a.num_blocks):
        if "attn" in sites:
            by_site[f"attn.{b}"] = keep_mask(plan.keep_attn[b], a.attn_dim(b))
        if "ffn" in sites:
            by_site[f"ffn.{b}"] = keep_mask(plan.keep_ffn[b], a.ffn_dim(b))
    return Masks(by_site)


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
