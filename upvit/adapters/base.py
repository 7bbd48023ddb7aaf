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


def removal_masks(size: int, idx: torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
    """Keep-masks ``[C*rows, size]`` for C candidates stacked on the batch axis: row block c removes
    channel ``idx[c]`` (dtype and device of ``like``)."""
    m = torch.ones(len(idx), size, dtype=like.dtype, device=like.device)
    m[torch.arange(len(idx), device=like.device), idx.to(like.device)] = 0
    return m.repeat_interleave(rows, dim=0)


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


@dataclass
class MaskProbe:
    """A point where a site's keep-mask acts, recorded during a plain (unmasked) forward.

    ``kind`` "scale": the mask multiplies ``tensor``'s last dim (``[B, ..., groups * size]``, the
    mask repeated per group, e.g. q, k and v). ``kind`` "layer_norm": ``tensor`` is the output of a
    LayerNorm the mask renormalises (:func:`masked_layer_norm`), ``norm_input`` its input. From the
    gradient of a loss at ``tensor``, :meth:`mask_grad` gives the per-sample gradient w.r.t. that
    mask at m = 1 without the mask ever entering the graph (summed over probes of a site, it equals
    the gradient w.r.t. a ``[B, size]`` mask of :meth:`Adapter.masking`)."""

    site: str
    kind: str  # "scale" | "layer_norm"
    tensor: torch.Tensor
    groups: int = 1
    norm_input: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    eps: float = 0.0
    _cache: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    def mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-sample d loss / d m_c at m = 1, ``[B, size]``, from ``grad`` = d loss / d ``tensor``."""
        b, width = grad.shape[0], grad.shape[-1]
        out = self.tensor.detach()
        if self.kind == "scale":
            return (grad * out).reshape(b, -1, self.groups, width // self.groups).sum((1, 2))
        if self.kind != "layer_norm":
            from ..errors import UpvitError

            raise UpvitError(f"unknown mask probe kind {self.kind!r}: use 'scale' or 'layer_norm'")
        # y = (w * yhat + bias) * m over kept channels, mean and variance weighted by m; at m = 1:
        # dy_k/dm_c = delta_kc y_c - w_k (yhat_c + 1/2 yhat_k (yhat_c^2 - var/(var+eps))) / D
        if self._cache is None:
            with torch.no_grad():
                x = self.norm_input.detach().reshape(b, -1, width)
                var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
                yhat = (x - mean) * torch.rsqrt(var + self.eps)
                self._cache = (yhat, yhat * yhat, (var / (var + self.eps)).squeeze(-1))
        yhat, yhat2, c2 = self._cache
        g = grad.reshape(b, -1, width)
        gw = g if self.weight is None else g * self.weight.detach()
        s1, s2 = gw.sum(-1), (gw * yhat).sum(-1)  # [B, T]
        direct = (g * out.reshape(b, -1, width)).sum(1)
        stats = torch.einsum("bt,btc->bc", s1, yhat) + 0.5 * (torch.einsum("bt,btc->bc", s2, yhat2) -
                                                              (s2 * c2).sum(1, keepdim=True))
        return direct - stats / width


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

    def attn_removal_deltas(self, block: int, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``[C, *h.shape]``: how ``attn_half(block, h)`` changes when attention dim ``idx[c]`` is removed
        (no other mask active). This default runs the masked forward with the C candidates stacked on
        the batch axis; adapters may override it with a cheaper computation of the same values."""
        n = len(idx)
        base = self.attn_half(block, h)
        with self.masking(Masks({f"attn.{block}": removal_masks(self.attn_dim(block), idx, h.shape[0], h)})):
            out = self.attn_half(block, h.repeat(n, *([1] * (h.dim() - 1))))
        return out.view(n, *h.shape) - base

    def probing(self) -> contextlib.AbstractContextManager[list[MaskProbe]] | None:
        """Context yielding a list that the model's plain forward fills with a :class:`MaskProbe` for
        every point where a site's mask acts (the Fisher estimate's fast path). None where unsupported:
        the estimate then differentiates through ``[B, size]`` masks instead."""
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
