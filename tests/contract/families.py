"""Every model family of the contract suite: one tiny builder, its inputs, one naive reference and what the
family's constructor can and cannot express.

A naive reference slices channel c of a site out of the weights (float64) and re-runs a hand-written
functional forward of the family, teacher and student both, for every channel: it shares no code with the
adapters or the scoring engine. The references live beside the families' own helpers (tests/importance/
naive_vit.py, tests/naive_swin.py, tests/naive_pvt.py, tests/naive_hf.py); this file is their one index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from helpers import TINY, TINY_SWIN, tiny_images, tiny_swin, tiny_vit
from hf_helpers import hf_images, tiny_bert, tiny_gpt2, tiny_hf_vit, token_inputs
from importance.naive_vit import naive_score as naive_vit_timm_score
from naive_hf import naive_bert_score, naive_gpt2_score, naive_vit_score
from naive_pvt import naive_pvt_score
from naive_swin import naive_swin_score
from pvt_helpers import PVT_IMG, tiny_pvt
from upvit.adapters.hf_bert import HFBertAdapter
from upvit.adapters.hf_gpt2 import HFGPT2Adapter
from upvit.adapters.hf_vit import HFViTAdapter
from upvit.adapters.timm_pvt import TimmPVTv2Adapter
from upvit.adapters.timm_swin import TimmSwinAdapter
from upvit.adapters.timm_vit import TimmViTAdapter


def images(size: int, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@dataclass(frozen=True)
class Family:
    """One family (or a variant whose code paths differ) and what its contract tests need.

    ``build(seed)``: a tiny eval-mode model with weights large enough that removals matter;
    ``inputs(n)``: n inputs for it; ``naive(model, x, key, c)``: the reference KL (1 - cos for a sentence
    encoder) of removing channel c of site ``key``; ``shape``: the topology the builder must give;
    ``staged_atol``: 0 where the staged forward runs the model's own modules in the same order (timm),
    1e-6 where it re-assembles transformers' code path; ``kl``: (inputs, batch size, candidate batch,
    every k-th FFN channel, at least this many channels compared); ``prune_cases``: named targets of a
    random plan for masked == pruned (each shrinks what its name says, "all" everything at once);
    ``masked_atol``: float32 error of a pruned model against the masked original; ``kept_output(out,
    plan)``: the masked original's output in the pruned model's coordinates (an embedding keeps only the
    kept residual channels); ``bad_targets``: (targets, message) the family's constructor cannot express."""

    name: str
    adapter: type
    build: Callable[..., torch.nn.Module]
    inputs: Callable[..., Any]
    naive: Callable[[torch.nn.Module, Any, str, int], float]
    shape: dict[str, list[int]]
    staged_atol: float = 0.0
    kl: tuple[int, int, int, int, int] = (3, 2, 5, 1, 50)
    prune_cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    masked_atol: float = 1e-5
    kept_output: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    bad_targets: tuple[tuple[dict[str, Any], str], ...] = ()
    divergence: str = "kl"


VIT_SHAPE = {"residual": [24], "depths": [2], "heads": [4, 4], "attn": [24, 24], "ffn": [48, 48]}
# heads kept: embed 24 -> 16 or 12 changes the head dim 6 -> 4 or 3 (the original scale is folded into q); timm
# ties the attention width to embed_dim, so the attention dims go with the residual channels
VIT_CASES = {"ffn": dict(mlp_hidden=17), "embed": dict(embed_dim=16, num_heads=4),
             "all": dict(embed_dim=12, num_heads=4, mlp_hidden=30)}
VIT_RULES = ((dict(embed_dim=24, attn_dim=12), r"ties the attention width to embed_dim.*attn_dim \(12\) must equal "
                                               r"embed_dim \(24\)"),
             (dict(embed_dim=10, num_heads=4), r"embed_dim=10 .* not divisible by num_heads=4"))

SWIN_SHAPE = {"residual": [8, 16, 32], "depths": [2, 2, 2], "heads": [2, 2, 4, 4, 8, 8],
              "attn": [8, 8, 16, 16, 32, 32], "ffn": [16, 16, 32, 32, 64, 64]}
PVT_SHAPE = {"residual": [8, 16, 32], "depths": [2, 2, 2], "heads": [1, 1, 2, 2, 4, 4],
             "attn": [8, 8, 16, 16, 32, 32], "ffn": [16, 16, 32, 32, 64, 64]}
PVT_RULES = (
    (dict(embed_dim=[8, 12, 32], attn_dim=[8, 16, 32]), r"ties the attention width to embed_dim, so attn_dim\[1\] "
                                                         r"\(16\) must equal embed_dim\[1\] \(12\)"),
    (dict(num_heads=[1, 2, 3]), r"num_heads\[2\]=3 does not divide the model's 4 heads"),
    (dict(embed_dim=[8, 9, 32]), r"embed_dim\[1\]=9 \(also the attention width\) is not divisible by num_heads\[1\]=2"),
    (dict(mlp_hidden=[16, 40, 64]), r"mlp_hidden\[1\]=40 is impossible: the model has 32"),
    (dict(embed_dim=[8, 16]), r"embed_dim gives 2 values but the model has 3 stages"),
)
# heads kept everywhere: attention dims 8 -> 6 per block (Swin) or residual 8/16/32 -> 4/8/12 (PVTv2, whose
# attention width follows it) change the head dims, so the original attention scale must be folded into q
HIER_BASE = dict(embed_dim=[8, 16, 32], mlp_hidden=[16, 32, 64])
PVT_CASES = {"ffn": {**HIER_BASE, "mlp_hidden": [5, 9, 20]}, "embed": {**HIER_BASE, "embed_dim": [4, 8, 12]},
             "all": {"embed_dim": [4, 8, 12], "mlp_hidden": [5, 9, 20]}}

HF_SHAPE = {"residual": [24], "depths": [2], "heads": [4, 4], "attn": [24, 24], "ffn": [32, 32]}
# GPT-2 and BERT tie the attention width to the hidden size (transformers 5.x: head size = hidden / heads)
HF_TIED_CASES = {"ffn": dict(embed_dim=24, num_heads=4, mlp_hidden=13), "embed": dict(embed_dim=12, num_heads=4),
                 "all": dict(embed_dim=12, num_heads=4, mlp_hidden=13)}
HF_VIT_CASES = {**HF_TIED_CASES, "attn": dict(embed_dim=24, attn_dim=12, num_heads=4),
                "all": dict(embed_dim=12, attn_dim=12, num_heads=4, mlp_hidden=13)}
HF_TIED_RULES = (
    (dict(embed_dim=24, attn_dim=12), r"5\.x derives the head size as hidden_size / num_heads and has no "
                                      r"pruned_heads\) ties the attention width to embed_dim, so attn_dim \(12\) "
                                      r"must equal embed_dim \(24\)"),
    (dict(embed_dim=10, num_heads=4), r"embed_dim=10 \(also the attention width\) is not divisible by num_heads=4"),
    (dict(num_heads=3), r"num_heads=3 does not divide the model's 4 heads"),
    (dict(mlp_hidden=40), r"mlp_hidden=40 is impossible: the model has 32"),
)
# HF ViT/DeiT read a head_dim key: the attention width is free, but still whole heads of one size
HF_VIT_RULES = (
    (dict(attn_dim=10, num_heads=4), r"attn_dim=10 is not divisible by num_heads=4"),
    (dict(num_heads=3), r"num_heads=3 does not divide the model's 4 heads"),
    (dict(mlp_hidden=40), r"mlp_hidden=40 is impossible: the model has 32"),
)


def _embedding_kept(out: torch.Tensor, plan) -> torch.Tensor:
    return out[:, plan.keep["res.0"]]


FAMILIES = [
    # timm ViT/DeiT: a class token (and DeiT's distillation token) read by the head; layer scale
    Family("timm-vit", TimmViTAdapter, lambda seed=0: tiny_vit(seed=seed), lambda n=6: tiny_images(n),
           naive_vit_timm_score, VIT_SHAPE, kl=(6, 4, 5, 1, 168), prune_cases=VIT_CASES, bad_targets=VIT_RULES),
    Family("timm-deit-distilled", TimmViTAdapter, lambda seed=0: tiny_vit(distilled=True, seed=seed),
           lambda n=6: tiny_images(n), naive_vit_timm_score, VIT_SHAPE, kl=(6, 4, 5, 1, 168), prune_cases=VIT_CASES,
           bad_targets=VIT_RULES),
    Family("timm-vit-layer-scale", TimmViTAdapter, lambda seed=0: tiny_vit(init_values=0.5, seed=seed),
           lambda n=6: tiny_images(n), naive_vit_timm_score, VIT_SHAPE, kl=(6, 4, 5, 1, 168),
           prune_cases={"all": VIT_CASES["all"]}, bad_targets=VIT_RULES),
    # timm Swin: shifted windows with the shift mask (stages 0, 1), a clipped single window (stage 2), patch
    # merging, relative-position bias columns per head
    Family("timm-swin", TimmSwinAdapter, lambda seed=0: tiny_swin(seed=seed),
           lambda n=3: images(TINY_SWIN["img_size"], n), naive_swin_score, SWIN_SHAPE, kl=(3, 2, 5, 5, 200),
           prune_cases={"ffn": {**HIER_BASE, "attn_dim": [8, 16, 32], "mlp_hidden": [5, 9, 20]},
                        "attn": {**HIER_BASE, "attn_dim": [6, 12, 24]},
                        "all": dict(embed_dim=[4, 8, 16], attn_dim=[6, 12, 24], mlp_hidden=[5, 9, 20])},
           bad_targets=(
               (dict(embed_dim=[4, 12, 16]), r"ratio 1:2:4 .* embed_dim=\[4, 12, 16\] cannot be built: use e.g. "
                                             r"\[4, 8, 16\]"),
               (dict(embed_dim=4), r"ratio 1:2:4"),
               (dict(num_heads=[2, 3, 8]), r"num_heads\[1\]=3 does not divide the model's 4 heads"),
               (dict(attn_dim=[8, 10, 32], num_heads=[2, 4, 8]), r"attn_dim\[1\]=10 is not divisible by "
                                                                 r"num_heads\[1\]=4"),
               (dict(mlp_hidden=[16, 40, 64]), r"mlp_hidden\[1\]=40 is impossible: the model has 32"),
               (dict(embed_dim=[8, 16]), r"embed_dim gives 2 values but the model has 3 stages"))),
    # timm PVTv2: conv patch embeddings, spatial-reduction convs (and the linear-SR variant: pooling, 1x1 sr
    # conv, extra ReLU), depthwise convs in the FFN
    Family("timm-pvt", TimmPVTv2Adapter, lambda seed=0: tiny_pvt(seed=seed), lambda n=3: images(PVT_IMG, n),
           naive_pvt_score, PVT_SHAPE, kl=(3, 2, 5, 5, 200), prune_cases=PVT_CASES, masked_atol=2e-5,
           bad_targets=PVT_RULES),
    Family("timm-pvt-linear", TimmPVTv2Adapter, lambda seed=0: tiny_pvt(seed=seed, linear=True, depths=[1, 1, 1]),
           lambda n=2: images(PVT_IMG, n), naive_pvt_score,
           {"residual": [8, 16, 32], "depths": [1, 1, 1], "heads": [1, 2, 4], "attn": [8, 16, 32], "ffn": [16, 32, 64]},
           kl=(2, 2, 5, 7, 100), prune_cases=PVT_CASES, masked_atol=2e-5, bad_targets=PVT_RULES),
    # Hugging Face: causal LM with a tied head and padding, post-norm encoder (embedding and MLM head), ViT/DeiT
    Family("hf-gpt2", HFGPT2Adapter, lambda seed=0: tiny_gpt2(seed=seed), lambda n=3: token_inputs(n),
           naive_gpt2_score, HF_SHAPE, staged_atol=1e-6, kl=(3, 2, 7, 3, 90), prune_cases=HF_TIED_CASES,
           masked_atol=2e-6, bad_targets=HF_TIED_RULES),
    Family("hf-bert", HFBertAdapter, lambda seed=0: tiny_bert(seed=seed), lambda n=3: token_inputs(n),
           naive_bert_score, HF_SHAPE, staged_atol=1e-6, kl=(3, 2, 7, 3, 90), prune_cases=HF_TIED_CASES,
           masked_atol=2e-6, kept_output=_embedding_kept, bad_targets=HF_TIED_RULES, divergence="cosine"),
    Family("hf-bert-mlm", HFBertAdapter, lambda seed=0: tiny_bert(mlm=True, seed=seed), lambda n=3: token_inputs(n),
           naive_bert_score, HF_SHAPE, staged_atol=1e-6, kl=(3, 2, 7, 3, 90), prune_cases=HF_TIED_CASES,
           masked_atol=2e-6, bad_targets=HF_TIED_RULES),
    Family("hf-vit", HFViTAdapter, lambda seed=0: tiny_hf_vit(seed=seed), lambda n=3: hf_images(n),
           naive_vit_score, HF_SHAPE, staged_atol=1e-6, kl=(3, 2, 7, 3, 90), prune_cases=HF_VIT_CASES,
           masked_atol=2e-6, bad_targets=HF_VIT_RULES),
    Family("hf-deit-teacher", HFViTAdapter,
           lambda seed=0: tiny_hf_vit("DeiTForImageClassificationWithTeacher", seed=seed), lambda n=3: hf_images(n),
           naive_vit_score, HF_SHAPE, staged_atol=1e-6, kl=(3, 2, 7, 3, 90), prune_cases=HF_VIT_CASES,
           masked_atol=2e-6, bad_targets=HF_VIT_RULES),
]
BY_NAME = {f.name: f for f in FAMILIES}
assert TINY["embed_dim"] == 24  # VIT_SHAPE above
