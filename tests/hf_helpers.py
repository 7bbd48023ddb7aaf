"""Tiny randomly initialised Hugging Face models (GPT-2, BERT, ViT/DeiT) with weights large enough that
removals matter, and inputs for them."""
from __future__ import annotations

import torch

from upvit.hf import build_hf_model

NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TINY_GPT2 = dict(n_layer=2, n_embd=24, n_head=4, n_inner=32, vocab_size=40, n_positions=16, **NO_DROPOUT_GPT2)
TINY_BERT = dict(num_hidden_layers=2, hidden_size=24, num_attention_heads=4, intermediate_size=32, vocab_size=40,
                 max_position_embeddings=16, type_vocab_size=2, **NO_DROPOUT_BERT)
TINY_VIT = dict(num_hidden_layers=2, hidden_size=24, num_attention_heads=4, intermediate_size=32, image_size=16,
                patch_size=4, num_channels=3, num_labels=5, **NO_DROPOUT_BERT)


def randomise(model, seed: int = 0, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_gpt2(seed: int = 0, **overrides):
    return randomise(build_hf_model("GPT2LMHeadModel", {**TINY_GPT2, **overrides}), seed)


def tiny_bert(mlm: bool = False, seed: int = 0, **overrides):
    return randomise(build_hf_model("BertForMaskedLM" if mlm else "BertModel", {**TINY_BERT, **overrides}), seed)


def tiny_hf_vit(cls: str = "ViTForImageClassification", seed: int = 0, **overrides):
    return randomise(build_hf_model(cls, {**TINY_VIT, **overrides}), seed)


def token_inputs(n: int = 3, length: int = 10, vocab: int = 40, seed: int = 1, pad_last: int = 3) -> dict:
    """Token ids with an attention mask; sample 1 is right-padded by ``pad_last`` positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if n > 1 and pad_last:
        mask[1, length - pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hf_images(n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, TINY_VIT["num_channels"], TINY_VIT["image_size"], TINY_VIT["image_size"], generator=g)
