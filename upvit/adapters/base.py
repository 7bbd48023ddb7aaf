"""The adapter contract: components as sites, per-sample channel masks, a staged forward.

A *site* is one group of channels scored together: ``embed`` (the residual stream, shared by all
blocks), ``attn.{b}`` (attention dims of block b) and ``ffn.{b}`` (FFN hidden units of block b).

A *mask* is a keep-mask per site: 1 keeps a channel, 0 removes it, with the exact semantics of
docs/method.md section 1 (removing residual channel c renormalises every LayerNorm over the
remaining channels; attention dim d zeroes q_d, k_d and v_d; FFN unit j is zeroed after the
activation). A mask is either ``[size]`` (shared by the batch) or ``[B, size]`` (one per sample),
so many single-channel removals can be evaluated in one forward by stacking them on the batch
axis. Masks are real-valued: values between 0 and 1 interpolate, which the Fisher estimate uses.

The staged forward (``stem`` -> ``attn_half(b)`` -> ``ffn_half(b)`` ... -> ``head``) lets a scorer
cache everything before the first modified stage and run only from there on.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class Site:
    """One scored group of channels."""

    component: str  # "embed" | "attn" | "ffn"
    block: int | None  # None for "embed"
    size: int

    @property
    def key(self) -> str:
        return self.component if self.block is None else f"{self.component}.{self.block}"


@dataclass
class Masks:
    """Keep-masks by site key (``embed``, ``attn.3``, ``ffn.3``); a missing key keeps everything."""

    by_site: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, key: str) -> torch.Tensor | None:
        return self.by_site.get(key)

    def __bool__(self) -> bool:
        return bool(self.by_site)


def broadcast_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape a ``[C]`` or ``[B, C]`` mask to multiply ``x`` of shape ``[B, ..., C]``."""
    if mask.dim() == 1:
        return mask
    return mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])


def masked_layer_norm(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the kept channels only (mean and variance weighted by the mask); removed
    channels come out as 0. With an all-ones mask this is an ordinary LayerNorm."""
    m = broadcast_mask(mask, x).to(x.dtype)
    count = m.sum(-1, keepdim=True) if m.dim() > 1 else m.sum()
    mean = (x * m).sum(-1, keepdim=True) / count
    centred = x - mean
    var = (centred * centred * m).sum(-1, keepdim=True) / count
    y = centred * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * m


class Adapter(ABC):
    """Wraps a model of one family. Never copies or permanently modifies the model."""

    family: str = "abstract"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ---------------------------------------------------------------- structure
    @property
    @abstractmethod
    def num_blocks(self) -> int: ...

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @abstractmethod
    def attn_dim(self, block: int) -> int: ...

    @abstractmethod
    def num_heads(self, block: int) -> int: ...

    @abstractmethod
    def ffn_dim(self, block: int) -> int: ...

    def sites(self) -> list[Site]:
        """All sites in scoring order: embed, then per block attn.b, ffn.b."""
        out = [Site("embed", None, self.embed_dim)]
        for b in range(self.num_blocks):
            out += [Site("attn", b, self.attn_dim(b)), Site("ffn", b, self.ffn_dim(b))]
        return out

    def describe(self) -> dict[str, Any]:
        """Plain-data description of the shape (for metadata and fingerprints)."""
        return {
            "family": self.family,
            "class": type(self.model).__name__,
            "embed_dim": self.embed_dim,
            "depth": self.num_blocks,
            "num_heads": [self.num_heads(b) for b in range(self.num_blocks)],
            "attn_dim": [self.attn_dim(b) for b in range(self.num_blocks)],
            "ffn_dim": [self.ffn_dim(b) for b in range(self.num_blocks)],
        }

    def channel_weights(self, site_key: str) -> list[tuple[torch.Tensor, int]]:
        """``(tensor, dim)`` pairs whose index i along ``dim`` is carried by channel i of the site
        (used by the magnitude baseline). Families that support it override this."""
        from ..errors import UpvitError

        raise UpvitError(f"the {self.family} adapter does not list its weights per channel: magnitude scoring "
                         "is not available for this model family")

    # ---------------------------------------------------------------- masking and staged forward
    @abstractmethod
    def masking(self, masks: Masks | None) -> contextlib.AbstractContextManager:
        """Context in which the model's own forward applies ``masks``."""

    @abstractmethod
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Input images -> residual stream entering block 0."""

    @abstractmethod
    def attn_half(self, block: int, h: torch.Tensor) -> torch.Tensor:
        """Residual stream entering ``block`` -> after its attention residual add."""

    @abstractmethod
    def ffn_half(self, block: int, h: torch.Tensor) -> torch.Tensor:
        """Residual stream after ``block``'s attention -> leaving the block."""

    @abstractmethod
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream leaving the last block -> logits (eval-mode output)."""

    # ---------------------------------------------------------------- optional fast paths (scorers fall back without them)
    def head_tokens(self) -> int | None:
        """Number of leading tokens the head reads (class/distillation tokens), or None if it reads all.

        When set, the last block's FFN half may run on those tokens only without changing the logits."""
        return None

    def ffn_rank1(self, block: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(out, acts, dirs)`` for the residual stream ``h`` entering ``block``'s FFN half (no masks active):
        ``out = ffn_half(block, h)``, ``acts`` [..., H] the hidden activations and ``dirs`` [H, D] such that
        removing FFN unit j gives exactly ``out - acts[..., j, None] * dirs[j]``. None where unsupported."""
        return None

    def run_from(self, h: torch.Tensor, block: int, stage: str) -> torch.Tensor:
        """Continue the staged forward from ``stage`` ("attn" or "ffn") of ``block`` to logits."""
        if stage == "attn":
            h = self.attn_half(block, h)
        h = self.ffn_half(block, h)
        for b in range(block + 1, self.num_blocks):
            h = self.ffn_half(b, self.attn_half(b, h))
        return self.head(h)

    def forward(self, x: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        """Logits of the (masked) model through the staged forward."""
        with self.masking(masks):
            h = self.stem(x)
            return self.run_from(h, 0, "attn")

    def stages(self) -> Iterator[tuple[int, str]]:
        for b in range(self.num_blocks):
            yield b, "attn"
            yield b, "ffn"
