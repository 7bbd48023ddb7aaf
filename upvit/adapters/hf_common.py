"""What the Hugging Face adapters share: the eager-attention switch, rebuilding through the model's own
class from an edited config, and the rules transformers 5.x can express (the slicing helpers, shared with
the timm adapters, are in :mod:`upvit.adapters.slicing`).

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

from ..config import ModelConfig
from ..errors import UpvitError

# transformers 5.x removed ``pruned_heads``; BERT and GPT-2 derive the head size as hidden / heads and
# project attention back with a hidden x hidden layer, so the attention width must equal the hidden size
TIED_NOTE = "5.x derives the head size as hidden_size / num_heads and has no pruned_heads"


def import_transformers():
    """``transformers``, quiet (no progress bars or advisory warnings), or one clear error."""
    try:
        import transformers
    except ImportError:
        raise UpvitError("hf: models need the 'transformers' package: pip install transformers==5.23.0 "
                         "(or run `make test` once)") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def base_config(model: nn.Module, family) -> ModelConfig:
    """The model's upvit config, or a default one (data config from its ``family`` record) for an HF
    model built outside upvit."""
    config = getattr(model, "upvit_config", None)
    if config is not None:
        return config
    return ModelConfig(name=type(model).__name__, family="hf", data_config=family.data_config(model))


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


def rebuild_from_config(model: nn.Module, changes: dict[str, Any], state: dict[str, torch.Tensor],
                        drop_keys: tuple[str, ...] = ()) -> nn.Module:
    """``type(model)(config)`` with the source config deep-copied, ``changes`` applied and ``drop_keys``
    removed, then ``state`` loaded strictly; the attention backend, dtype, device and train/eval
    mode of the source are kept. Seeded, so the throw-away initialisation disturbs no global RNG."""
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


def hf_config(model: nn.Module, new: nn.Module, family) -> ModelConfig:
    """The rebuilt model's upvit config: the source's (or a default one from its ``family`` record),
    without its plan."""
    return base_config(model, family).derived()


__all__ = ["TIED_NOTE", "base_config", "eager_attention", "hf_config", "import_transformers", "rebuild_from_config"]
