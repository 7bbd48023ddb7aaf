"""Scores: one importance value per channel of every site, saved as safetensors + JSON metadata.

Public file layout (other tools may rely on it): tensors ``embed`` [D], ``attn.{b}`` [D_attn_b],
``ffn.{b}`` [H_b] (float64), and a safetensors metadata entry ``upvit`` holding JSON (criterion,
proxy set, seed, model description, ...). Scores are never written as text: see docs/method.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..errors import UpvitError

META_KEY = "upvit"


@dataclass
class Scores:
    """Importance per channel. Higher = more important.

    >>> s = Scores(torch.ones(4), [torch.ones(4)], [torch.ones(8)], {"criterion": "kl"})
    >>> s["ffn.0"].shape
    torch.Size([8])
    """

    embed: torch.Tensor
    attn: list[torch.Tensor]
    ffn: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.attn) != len(self.ffn):
            raise UpvitError(f"scores have {len(self.attn)} attention blocks but {len(self.ffn)} FFN blocks")

    @property
    def num_blocks(self) -> int:
        return len(self.attn)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "embed", self.embed
        for b, t in enumerate(self.attn):
            yield f"attn.{b}", t
        for b, t in enumerate(self.ffn):
            yield f"ffn.{b}", t

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "embed":
            return self.embed
        component, _, block = key.partition(".")
        if component in ("attn", "ffn") and block.isdigit() and int(block) < self.num_blocks:
            return getattr(self, component)[int(block)]
        raise KeyError(key)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> "Scores":
        if "embed" not in tensors:
            raise UpvitError("scores file has no 'embed' tensor: not an upvit scores file")
        blocks = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("attn."))
        if blocks != list(range(len(blocks))) or any(f"ffn.{b}" not in tensors for b in blocks):
            raise UpvitError("scores file is missing attn.{b}/ffn.{b} tensors for some blocks: it is incomplete")
        return cls(tensors["embed"], [tensors[f"attn.{b}"] for b in blocks], [tensors[f"ffn.{b}"] for b in blocks], dict(meta or {}))

    def save(self, path: str) -> None:
        """Write atomically as safetensors (float64) with JSON metadata."""
        from ..io import save_tensors

        tensors = {k: v.detach().to(torch.float64) for k, v in self.items()}
        save_tensors(path, tensors, metadata={META_KEY: json.dumps(self.meta, default=str)})

    @classmethod
    def load(cls, path: str) -> "Scores":
        from ..io import load_tensors

        tensors, meta = load_tensors(path)
        try:
            info = json.loads(meta.get(META_KEY, "{}"))
        except json.JSONDecodeError:
            raise UpvitError(f"{path}: the scores metadata is not valid JSON; re-run `upvit score`") from None
        return cls.from_dict(tensors, info)

    def check_matches(self, adapter) -> None:
        """Raise a clear error unless every site's length matches the adapter's model."""
        for site in adapter.sites():
            try:
                got = self[site.key].numel()
            except KeyError:
                raise UpvitError(f"scores have no entry for {site.key}: they were computed for another model") from None
            if got != site.size:
                raise UpvitError(f"scores for {site.key} have {got} channels, the model has {site.size}: "
                                 "they were computed for another model")
