"""Shared test helpers: tiny timm ViTs with weights large enough that removals matter."""
from __future__ import annotations

import torch

from upvit.models import ModelConfig, create_timm_model

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=24, depth=2, num_heads=4, mlp_ratio=2.0)


def tiny_vit(distilled: bool = False, seed: int = 0, std: float = 0.3, **overrides) -> torch.nn.Module:
    """A tiny eval-mode ViT (or distilled DeiT) with N(0, std) weights and an upvit config."""
    name = "deit_base_distilled_patch16_224" if distilled else "vit_base_patch16_224"
    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = create_timm_model(name, kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    model.upvit_config = ModelConfig(timm_name=name, timm_kwargs=kwargs, data_config={
        "input_size": [kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"]],
        "mean": [0.5] * kwargs["in_chans"], "std": [0.5] * kwargs["in_chans"]})
    return model.eval()


def tiny_images(n: int = 6, seed: int = 1, **overrides) -> torch.Tensor:
    kwargs = {**TINY, **overrides}
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"], generator=g)


SWIN_NAME = "swin_tiny_patch4_window7_224"
# 32 px, patch 2, window 4: maps of 16x16, 8x8, 4x4, so stages 0 and 1 run shifted windows (with the
# shift mask) and stage 2 a single clipped window; widths 8/16/32, heads 2/4/8 (head dim 4)
TINY_SWIN = dict(img_size=32, patch_size=2, window_size=4, in_chans=3, num_classes=5, embed_dim=8, depths=[2, 2, 2],
                 num_heads=[2, 4, 8], mlp_ratio=2.0)


def tiny_swin(seed: int = 0, std: float = 0.3, **overrides) -> torch.nn.Module:
    """A tiny eval-mode timm Swin with N(0, std) weights and an upvit config."""
    kwargs = {**TINY_SWIN, **overrides}
    torch.manual_seed(seed)
    model = create_timm_model(SWIN_NAME, kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    c = kwargs["in_chans"]
    model.upvit_config = ModelConfig(timm_name=SWIN_NAME, timm_kwargs=kwargs, data_config={
        "input_size": [c, kwargs["img_size"], kwargs["img_size"]], "mean": [0.5] * c, "std": [0.5] * c})
    return model.eval()
