"""Scores: one importance value per channel of every site, saved as safetensors + JSON metadata.

Public file layout (other tools may rely on it): one float64 tensor per site key of the model's
topology (``res.{s}``, ``attn.{b}``, ``ffn.{b}``), and a safetensors metadata entry ``upvit`` holding
JSON (criterion, proxy set, seed, the model's topology, ...). Version-1 files (key ``embed`` for the
single residual stream of a ViT) still load, as ``res.0``. Scores are never written as text: see
docs/method.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..errors import UpvitError
from ..topology import Topology

META_KEY = "upvit"
SCORES_VERSION = 2


def _by_block(keys, prefix: str) -> list[str]:
    return sorted((k for k in keys if k.startswith(prefix)), key=lambda k: int(k.split(".")[1]))


@dataclass
class Scores:
    """Importance per channel of every site. Higher = more important.

    >>> s = Scores({"res.0": torch.ones(4), "attn.0": torch.ones(4), "ffn.0": torch.ones(8)}, {"criterion": "kl"})
    >>> s["ffn.0"].shape
    torch.Size([8])
    """

    values: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.values, dict) or not self.values:
            raise UpvitError("scores need one tensor per site, e.g. {'res.0': ..., 'attn.0': ..., 'ffn.0': ...}")
        if "embed" in self.values:  # the version-1 name of the single residual stream
            self.values = {("res.0" if k == "embed" else k): v for k, v in self.values.items()}

    @classmethod
    def from_sites(cls, topology: Topology, values: dict[str, torch.Tensor],
                   meta: dict[str, Any] | None = None) -> "Scores":
        """Scores in the topology's site order, with the topology recorded in the metadata."""
        missing = [s.key for s in topology.sites if s.key not in values]
        if missing:
            raise UpvitError(f"no scores for site {missing[0]}")
        meta = {**(meta or {}), "topology": topology.to_dict()}
        return cls({s.key: values[s.key] for s in topology.sites}, meta)

    # ------------------------------------------------------------------ access
    def keys(self) -> list[str]:
        return list(self.values)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.values.items()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "embed":
            key = "res.0"
        return self.values[key]

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.values)

    # single-stage conveniences (the plain ViT layout)
    @property
    def embed(self) -> torch.Tensor:
        return self.values["res.0"]

    @property
    def attn(self) -> list[torch.Tensor]:
        return [self.values[k] for k in _by_block(self.values, "attn.")]

    @property
    def ffn(self) -> list[torch.Tensor]:
        return [self.values[k] for k in _by_block(self.values, "ffn.")]

    @property
    def num_blocks(self) -> int:
        return sum(1 for k in self.values if k.startswith("attn."))

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> "Scores":
        if "embed" not in tensors and not any(k.startswith("res.") for k in tensors):
            raise UpvitError("scores file has no residual ('res.0' or 'embed') tensor: not an upvit scores file")
        blocks = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("attn."))
        if blocks != list(range(len(blocks))) or any(f"ffn.{b}" not in tensors for b in blocks):
            raise UpvitError("scores file is missing attn.{b}/ffn.{b} tensors for some blocks: it is incomplete")
        return cls(dict(tensors), dict(meta or {}))

    def save(self, path: str) -> None:
        """Write atomically as safetensors (float64) with JSON metadata."""
        from ..io import save_tensors

        tensors = {k: v.detach().to(torch.float64) for k, v in self.items()}
        save_tensors(path, tensors, metadata={META_KEY: json.dumps(self.meta, default=str),
                                              "format": "upvit-scores", "version": str(SCORES_VERSION)})

    @classmethod
    def load(cls, path: str) -> "Scores":
        from ..io import load_tensors

        tensors, meta = load_tensors(path)
        try:
            info = json.loads(meta.get(META_KEY, "{}"))
        except json.JSONDecodeError:
            raise UpvitError(f"{path}: the scores metadata is not valid JSON; re-run `upvit score`") from None
        return cls.from_dict(tensors, info)

    def check_matches(self, topology: Topology) -> None:
        """Raise a clear error unless every site's length matches the model's topology."""
        for site in topology.sites:
            if site.key not in self.values:
                raise UpvitError(f"scores have no entry for {site.key}: they were computed for another model")
            got = self.values[site.key].numel()
            if got != site.size:
                raise UpvitError(f"scores for {site.key} have {got} channels, the model has {site.size}: "
                                 "they were computed for another model")
        extra = sorted(set(self.values) - {s.key for s in topology.sites})
        if extra:
            raise UpvitError(f"scores have an entry for {extra[0]}, which the model does not have: they were "
                             "computed for another model")
