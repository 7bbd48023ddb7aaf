"""The tasks upvit's models perform: one small type, so no module restates the task names.

A model's task (:func:`upvit.adapters.task_of`) comes from its data config, else from its family
record (:class:`upvit.adapters.family.Family`); a timm image classifier records none (``None`` reads as
image classification throughout). The values are the strings the data configs hold, so
``Task.CAUSAL_LM == "causal-lm"`` and JSON files keep plain strings.
"""
from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F


class Task(StrEnum):
    CAUSAL_LM = "causal-lm"  # next-token logits at every position (GPT-2)
    MASKED_LM = "masked-lm"  # logits at every position, masked tokens as targets (BERT with its MLM head)
    SENTENCE_EMBEDDING = "sentence-embedding"  # mean-pooled, L2-normalised last hidden state (a bare encoder)
    IMAGE_CLASSIFICATION = "image-classification"  # class logits of an image (HF ViT / DeiT)


TEXT_TASKS = frozenset({Task.CAUSAL_LM, Task.MASKED_LM, Task.SENTENCE_EMBEDDING})


def is_text(task: str | None) -> bool:
    """Whether a model of this task reads tokens (a tokenizer and text data) rather than images."""
    return task in TEXT_TASKS


def output_name(task: str | None) -> str:
    """What a model of this task outputs: ``"embedding"`` for a sentence encoder, else ``"logits"``."""
    return "embedding" if task == Task.SENTENCE_EMBEDDING else "logits"


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The output of the sentence-embedding task: the mean of the token states over the attention mask,
    L2-normalised."""
    if attention_mask is None:
        pooled = hidden.mean(1)
    else:
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def logits_of(output, inputs=None) -> torch.Tensor:
    """A model's logits: distilled DeiTs return (cls, dist) pairs in training mode; Hugging Face
    models return a ModelOutput (``.logits``; a bare encoder's ``last_hidden_state`` becomes the
    mean over its attention mask, L2-normalised: the sentence embedding)."""
    if isinstance(output, (tuple, list)):
        return (output[0] + output[1]) / 2
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        return mean_pooled(hidden, mask)
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


def model_output(model: torch.nn.Module, inputs) -> torch.Tensor:
    """``model`` run on ``inputs`` (an image tensor or a dict of per-sample tensors) -> logits."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return logits_of(out, inputs)


__all__ = ["TEXT_TASKS", "Task", "is_text", "logits_of", "mean_pooled", "model_output", "output_name"]
