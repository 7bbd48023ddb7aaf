"""A tiny timm PVTv2 for the tests (weights large enough that removals matter)."""
from __future__ import annotations

import torch

from upvit.models import ModelConfig, create_timm_model

PVT_NAME = "pvt_v2_b0"
# 32 px: maps of 8x8, 4x4, 2x2; sr ratios (4, 2, 1) reduce the keys/values of stages 0 and 1 to 2x2
# (so the sr convs and their LayerNorms run); widths 8/16/32, heads 1/2/4 (head dim 8), FFN ratio 2
TINY_PVT = dict(in_chans=3, num_classes=5, depths=[2, 2, 2], embed_dims=[8, 16, 32], num_heads=[1, 2, 4],
                sr_ratios=[4, 2, 1], mlp_ratios=[2.0, 2.0, 2.0])
PVT_IMG = 32


def tiny_pvt(seed: int = 0, std: float = 0.3, img_size: int = PVT_IMG, **overrides) -> torch.nn.Module:
    """A tiny eval-mode timm PVTv2 with N(0, std) weights and an upvit config (input ``img_size``)."""
    kwargs = {**TINY_PVT, **overrides}
    torch.manual_seed(seed)
    model = create_timm_model(PVT_NAME, kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    c = kwargs["in_chans"]
    model.upvit_config = ModelConfig(timm_name=PVT_NAME, timm_kwargs=kwargs, data_config={
        "input_size": [c, img_size, img_size], "mean": [0.5] * c, "std": [0.5] * c})
    return model.eval()
