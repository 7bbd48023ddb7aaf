"""What the Hugging Face adapters share: masking hooks, slicing a state dict by rules, rebuilding
through the model's own class from an edited config, and the rules transformers 5.x can express.

Rebuild: the new model is ``type(model)(config)`` with the source config deep-copied and its width
keys changed, then the sliced state dict is loaded strictly (copied into the new parameters, so a
tied LM head stays the same tensor as the word embeddings). The result saves with
``save_pretrained`` and reloads with the standard ``from_pretrained``.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import UpvitError

# state-dict key -> [(dim, index), ...] applied in order (an empty list copies the tensor)
SliceRules = dict[str, list[tuple[int, torch.Tensor]]]

# transformers 5.x removed ``pruned_heads``; BERT and GPT-2 derive the head size as hidden / heads and
# project attention back with a hidden x hidden layer, so the attention width must equal the hidden size
TIED_NOTE = "5.x derives the head size as hidden_size / num_heads and has no pruned_heads"


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Attention as explicit matmuls (transformers' "eager" backend) while inside: the FLOP counter
    does not see fused CPU attention. Every module of a transformers model reads the shared config."""
    before = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        model.config._attn_implementation = before


# ---------------------------------------------------------------------------------- slicing
def linear(rules: SliceRules, prefix: str, module: nn.Linear, out_idx: torch.Tensor | None,
           in_idx: torch.Tensor | None) -> None:
    """nn.Linear: weight rows ``out_idx``, columns ``in_idx`` (None keeps the axis), bias ``out_idx``."""
    rules[f"{prefix}.weight"] = [(d, i) for d, i in ((0, out_idx), (1, in_idx)) if i is not None]
    if module.bias is not None:
        rules[f"{prefix}.bias"] = [(0, out_idx)] if out_idx is not None else []


def conv1d(rules: SliceRules, prefix: str, module: nn.Module, out_idx: torch.Tensor | None,
           in_idx: torch.Tensor | None) -> None:
    """transformers ``Conv1D`` (GPT-2): the weight is stored transposed, ``[in, out]``."""
    rules[f"{prefix}.weight"] = [(d, i) for d, i in ((0, in_idx), (1, out_idx)) if i is not None]
    if module.bias is not None:
        rules[f"{prefix}.bias"] = [(0, out_idx)] if out_idx is not None else []


def vector(rules: SliceRules, prefix: str, module: nn.Module, idx: torch.Tensor) -> None:
    """Every parameter of a per-channel module (LayerNorm) at ``idx``."""
    for name, _ in module.named_parameters(recurse=False):
        rules[f"{prefix}.{name}"] = [(0, idx)]


def apply_rules(model: nn.Module, rules: SliceRules, family: str) -> dict[str, torch.Tensor]:
    """The model's state dict sliced by ``rules`` (new tensors; refuses keys without a rule)."""
    state = model.state_dict()
    unknown = sorted(set(state) - set(rules))
    if unknown:
        raise UpvitError(f"surgery does not know how to slice {unknown[0]} of this {family} model: this variant is "
                         "not supported for pruning yet")
    out = {}
    for key, tensor in state.items():
        t = tensor.detach()
        for dim, index in rules[key]:
            t = t.index_select(dim, index.to(t.device))
        out[key] = t if rules[key] else t.clone()
    return out


def rebuild_from_config(model: nn.Module, changes: dict[str, Any], state: dict[str, torch.Tensor],
                        drop_keys: tuple[str, ...] = ()) -> nn.Module:
    """``type(model)(config)`` with the source config deep-copied, ``changes`` applied and ``drop_keys``
    removed, then ``state`` loaded strictly; the attention backend, dtype, device and train/eval
    mode of the source are kept. Seeded, so the throw-away initialisation disturbs no global RNG."""
    from ..hf import import_transformers

    import_transformers()
    config = copy.deepcopy(model.config)
    for key in drop_keys:
        if hasattr(config, key):
            delattr(config, key)
    for key, value in changes.items():
        setattr(config, key, value)
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        new = type(model)(config)
    expected = new.state_dict()
    if set(expected) != set(state):
        missing = sorted(set(expected) ^ set(state))
        raise UpvitError(f"the rebuilt {type(model).__name__} and the sliced weights disagree on {missing[0]}: "
                         "this variant is not supported for pruning yet")
    for key, tensor in state.items():
        if expected[key].shape != tensor.shape:
            raise AssertionError(f"sliced {key} has shape {tuple(tensor.shape)}, the rebuilt model expects "
                                 f"{tuple(expected[key].shape)}")
    new.load_state_dict(state, strict=True)
    new.to(device=param.device, dtype=param.dtype)
    new.train(model.training)
    return new


def hf_config(model: nn.Module, new: nn.Module):
    """The rebuilt model's upvit config: the source's (or a default one), without its plan."""
    from ..hf import base_config, clone_config

    return clone_config(base_config(model))


def q_scale(old_head_dim: int, new_head_dim: int) -> float | None:
    """The factor folded into the query projection so that the pruned attention, which scales by its
    own ``new_head_dim ** -0.5``, keeps the original ``old_head_dim ** -0.5`` (None: no change)."""
    return None if old_head_dim == new_head_dim else (new_head_dim / old_head_dim) ** 0.5


__all__ = ["SliceRules", "TIED_NOTE", "apply_rules", "conv1d", "eager_attention", "hf_config", "linear", "q_scale",
           "rebuild_from_config", "vector"]
