"""The adapter contract: a model's structure as data, masks per site, and a forward unit by unit.

An adapter wraps one model of one family and is the only code that knows the family's module
names. It declares the model's :class:`~upvit.topology.Topology` (sites, units, rules) and runs the
model as ``begin(inputs) -> run(unit) -> ... -> end(stream)``, where a :class:`Stream` is whatever
flows between two residual branches (``[B, N, D]`` tokens for a ViT, ``[B, H, W, C]`` for Swin,
tokens plus the feature-map size for PVTv2, tokens plus the attention mask for BERT). The scoring
engines cache streams, repeat them to stack candidates on the batch axis, and continue from any
unit with :func:`forward_from`; they never see a module name.

A *mask* is a keep-mask per site: 1 keeps a channel, 0 removes it, with the exact semantics of
docs/method.md section 1 (removing residual channel c renormalises every LayerNorm of its stage over
the remaining channels; attention dim d zeroes q_d, k_d and v_d; FFN unit j is zeroed after the
activation). A mask is ``[size]`` (shared by the batch) or ``[B, size]`` (one per sample), so many
single-channel removals run in one forward. Masks are real-valued: values between 0 and 1
interpolate, which the Fisher estimate uses. ``skip`` removes whole units (depth pruning): the
branch adds nothing to the residual stream.

``end`` returns logits with an event axis, ``[B, E, K]``: E = 1 for an image classifier, E = T for a
language model (one next-token distribution per position). The KL of docs/method.md is summed over
samples and events, weighted by :meth:`Adapter.event_weights` (padding gets weight 0).

A model whose output is not a distribution (a sentence encoder: ``end`` returns its embedding as
``[B, 1, D]``) declares ``divergence = "cosine"``: the engines then sum ``1 - cos(original,
candidate)`` over samples and events instead of the KL (:meth:`Adapter.output_divergence`).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UpvitError
from ..topology import PairedBlock, Topology

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .slicing import ChannelSlice, SliceRules

# what ``rebuild``/``check_plan`` receive is an upvit.plan.Plan, checked by surgery; the adapters sit below
# the planning layer and do not import it
Plan = Any

Inputs = Union[torch.Tensor, dict]


# ------------------------------------------------------------------------------------- inputs
def batch_len(inputs: Inputs) -> int:
    """Number of samples in a batch of inputs (an image tensor or a dict of per-sample tensors)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


def batch_slice(inputs: Inputs, start: int, end: int) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[start:end]
    return {k: v[start:end] for k, v in inputs.items()}


def batch_to(inputs: Inputs, device: torch.device, dtype: torch.dtype | None = None) -> Inputs:
    """Move to ``device``; floating tensors also to ``dtype`` (token ids keep theirs)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    if isinstance(inputs, torch.Tensor):
        return move(inputs)
    return {k: move(v) for k, v in inputs.items()}


def batch_repeat(inputs: Inputs, n: int) -> Inputs:
    """``n`` copies stacked on the batch axis (copy c is rows [c*B, (c+1)*B))."""
    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(n, *([1] * (t.dim() - 1)))

    if isinstance(inputs, torch.Tensor):
        return rep(inputs)
    return {k: rep(v) for k, v in inputs.items()}


def batch_cat(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------------------------- stream
@dataclass
class Stream:
    """What flows between two units: ``x`` (batch first, channels last) plus per-sample tensors
    (``batch``, e.g. an attention mask) and per-batch values (``info``, e.g. a feature-map size)."""

    x: torch.Tensor
    batch: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def replace(self, x: torch.Tensor) -> "Stream":
        return Stream(x, self.batch, self.info)

    def repeat(self, n: int) -> "Stream":
        """``n`` copies stacked on the batch axis, per-sample tensors included."""
        return Stream(self.x.repeat(n, *([1] * (self.x.dim() - 1))),
                      {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.batch.items()}, dict(self.info))

    def head_only(self, k: int) -> "Stream":
        """The first ``k`` tokens (the ones the head reads)."""
        return Stream(self.x[:, :k], self.batch, {**self.info, "head_only": k})

    def detach(self) -> "Stream":
        return Stream(self.x.detach(), self.batch, self.info)


# ------------------------------------------------------------------------------------- masks
@dataclass
class Masks:
    """Keep-masks by site key (``res.0``, ``attn.3``, ``ffn.3``); a missing key keeps everything."""

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


def per_window(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """A ``[B, C]`` mask for a tensor whose batch axis holds ``rows`` = B * n rows, each sample's n
    rows contiguous (windows of a Swin block, key/value tokens ...); ``[C]`` masks pass through."""
    if mask.dim() == 1 or mask.shape[0] == rows:
        return mask
    return mask.repeat_interleave(rows // mask.shape[0], dim=0)


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


# ------------------------------------------------------------------------------------- adapter
class Adapter(ABC):
    """Wraps a model of one family. Never copies or permanently modifies the model.

    Subclasses implement the structure (:meth:`topology`), the unit-by-unit forward (:meth:`begin`,
    :meth:`run`, :meth:`end`), masking and :meth:`rebuild` (plan -> a genuine smaller model of the
    family); the fast paths (:meth:`probing`, :meth:`ffn_rank1`, :meth:`attn_removal_deltas`) are
    optional and the engines fall back to the masked forward without them.
    """

    family: str = "abstract"
    # how the scoring engines compare the original's output with a candidate's: "kl" (``end`` returns
    # logits: KL(softmax(original) || softmax(candidate)), the paper's) or "cosine" (``end`` returns
    # embeddings: 1 - cos(original, candidate), for encoders without a distribution over outputs)
    divergence: str = "kl"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._topology: Topology | None = None

    # ---------------------------------------------------------------- structure
    def topology(self) -> Topology:
        """The model's sites, units and rules (computed once; the adapter never reshapes the model)."""
        if self._topology is None:
            self._topology = self.build_topology()
        return self._topology

    @abstractmethod
    def build_topology(self) -> Topology: ...

    def describe(self) -> dict[str, Any]:
        """Plain-data description of the shape (metadata, messages)."""
        return {"family": self.family, "class": type(self.model).__name__, **self.topology().shape()}

    # ---------------------------------------------------------------- declared channels
    def channel_slices(self) -> "dict[str, list[ChannelSlice]] | None":
        """Per site key, the state-dict slices that carry its channel c, declared once
        (:class:`~upvit.adapters.slicing.ChannelSlice`, built with :class:`~upvit.adapters.slicing.Declaration`);
        magnitude/Taylor weights and surgery slicing derive from it. Every built-in family declares
        them; None (this default) leaves magnitude, Taylor and :meth:`declared_slice_rules` unavailable."""
        return None

    def untouched_keys(self) -> set[str]:
        """State-dict keys that no site's channels touch (e.g. a classifier's bias), copied whole."""
        return set()

    def producers(self, site_key: str) -> "list[ChannelSlice]":
        """The slices that write channel c of the site (output rows and biases)."""
        return [sl for sl in self._declared()[site_key] if sl.role == "out"]

    def consumers(self, site_key: str) -> "list[ChannelSlice]":
        """The slices that read channel c of the site (input columns of the layers that follow)."""
        return [sl for sl in self._declared()[site_key] if sl.role == "in"]

    def declared_slice_rules(self, keep: dict[str, list[int]]) -> "SliceRules":
        """Surgery's slice rules for ``keep`` (site key -> kept channels), derived from the declaration."""
        from .slicing import declared_rules

        return declared_rules(self.model.state_dict(), self._declared(), keep, self.untouched_keys())

    def _declared(self) -> "dict[str, list[ChannelSlice]]":
        declared = self.channel_slices()
        if declared is None:
            raise UpvitError(f"the {self.family} adapter does not declare its channels' weights")
        return declared

    def channel_weights(self, site_key: str) -> list[tuple[torch.Tensor, int]]:
        """``(tensor, dim)`` pairs whose index i along ``dim`` is carried by channel i of the site
        (magnitude and Taylor importance), derived from :meth:`channel_slices` (a tied tensor counts once)."""
        declared = self.channel_slices()
        if declared is None:
            raise UpvitError(f"the {self.family} adapter does not list its weights per channel: magnitude scoring "
                             "is not available for this model family")
        from .slicing import declared_weights

        self.topology().site(site_key)  # one clear line for a site the model does not have
        return declared_weights(self.model.state_dict(keep_vars=True), declared[site_key])

    def input_size(self) -> tuple[int, ...] | None:
        """The input one sample must have (``(C, H, W)`` for images), or None when it varies."""
        config = getattr(self.model, "upvit_config", None)
        if config is not None and config.data_config.get("input_size"):
            return tuple(config.data_config["input_size"])
        return None

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "cpu") -> Inputs:
        """Inputs of the model's expected shape (for FLOP counts and throughput)."""
        size = self.input_size()
        if size is None:
            raise UpvitError(f"the {self.family} model does not record its input size: give it explicitly")
        return torch.zeros(batch_size, *size, device=device)

    def classifier(self) -> nn.Module | None:
        """The final linear layer, whose input is the pooled penultimate feature (feature distillation
        reads it there). This default uses timm's ``get_classifier()``; None where the model has no
        single linear classifier (e.g. a distilled DeiT's two heads)."""
        get = getattr(self.model, "get_classifier", None)
        head = get() if callable(get) else None
        return head if isinstance(head, nn.Linear) else None

    @contextlib.contextmanager
    def explicit_attention(self) -> Iterator[None]:
        """Run attention as explicit matmuls (so a FLOP counter sees them); no-op by default."""
        yield

    # ---------------------------------------------------------------- the unit-by-unit forward
    @abstractmethod
    def begin(self, inputs: Inputs) -> Stream:
        """Model inputs -> the stream entering the first unit."""

    @abstractmethod
    def run(self, unit: str, stream: Stream) -> Stream:
        """One unit: the stage transition it starts with (if any), then its residual branch."""

    @abstractmethod
    def end(self, stream: Stream) -> torch.Tensor:
        """The stream after the last unit -> logits ``[B, E, K]`` (eval-mode output)."""

    def event_weights(self, inputs: Inputs) -> torch.Tensor | None:
        """``[B, E]`` weights of the output events (0 for padding), or None when all count."""
        return None

    def output_reference(self, outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What :meth:`output_divergence` compares candidates with, from the original's ``[B, E, K]``
        outputs (computed once per proxy batch): ``(log q, q)`` in float64 for "kl", the
        L2-normalised outputs for "cosine"."""
        if self.divergence == "kl":
            logq = torch.log_softmax(outputs.double(), dim=-1)
            return logq, logq.exp()
        if self.divergence == "cosine":
            return (F.normalize(outputs.double(), dim=-1),)
        raise UpvitError(f"unknown divergence {self.divergence!r}: use 'kl' or 'cosine'")

    def output_divergence(self, reference: tuple[torch.Tensor, ...], outputs: torch.Tensor,
                          weights: torch.Tensor | None) -> torch.Tensor:
        """``[C]`` float64: for each of C candidates (``outputs`` ``[C, B, E, K]``), the sum over the
        batch and its events (weighted by ``weights`` ``[B, E]``) of KL(q || softmax(outputs)) for
        "kl", or of 1 - cos(original, outputs) for "cosine"."""
        if self.divergence == "kl":
            logq, q = reference
            logp = torch.log_softmax(outputs.double(), dim=-1)
            d = (q.unsqueeze(0) * (logq.unsqueeze(0) - logp)).sum(-1)  # [C, B, E]
        else:
            d = 1 - (reference[0].unsqueeze(0) * F.normalize(outputs.double(), dim=-1)).sum(-1)
        if weights is not None:
            d = d * weights.unsqueeze(0)
        return d.sum((1, 2))

    @abstractmethod
    def masking(self, masks: Masks | None, skip: frozenset[str] = frozenset()) -> contextlib.AbstractContextManager:
        """Context in which the model's own forward applies ``masks`` and leaves out the units in ``skip``."""

    def output(self, events: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, E, K]`` -> the model's own output layout (``[B, K]`` when E = 1)."""
        return events[:, 0] if events.shape[1] == 1 else events

    def events(self, inputs: Inputs, masks: Masks | None = None, skip: frozenset[str] = frozenset()) -> torch.Tensor:
        """Logits ``[B, E, K]`` of the (masked) model through the unit-by-unit forward."""
        with self.masking(masks, skip):
            return forward_from(self, self.begin(inputs), 0)

    def forward(self, inputs: Inputs, masks: Masks | None = None, skip: frozenset[str] = frozenset()) -> torch.Tensor:
        """Logits in the model's own layout, through the unit-by-unit forward."""
        return self.output(self.events(inputs, masks, skip))

    # ---------------------------------------------------------------- optional fast paths
    def probing(self) -> contextlib.AbstractContextManager[list[MaskProbe]] | None:
        """Context yielding a list that the model's plain forward fills with a :class:`MaskProbe` for
        every point where a site's mask acts (the Fisher estimate's fast path). None where unsupported:
        the estimate then differentiates through ``[B, size]`` masks instead."""
        return None

    def ffn_rank1(self, unit: str, stream: Stream) -> tuple[Stream, torch.Tensor, torch.Tensor] | None:
        """``(out, acts, dirs)`` for FFN ``unit`` run on ``stream`` (no masks active): ``out = run(unit,
        stream)``, ``acts`` ``[..., H]`` the hidden activations laid out like ``out.x[..., :]`` and ``dirs``
        ``[H, D]`` such that removing hidden unit j gives exactly ``out.x - acts[..., j, None] * dirs[j]``.
        None where unsupported (post-norm blocks, where a LayerNorm follows the residual add)."""
        return None

    def attn_removal_deltas(self, unit: str, stream: Stream, idx: torch.Tensor) -> torch.Tensor:
        """``[C, *stream.x.shape]``: how ``run(unit, stream).x`` changes when attention dim ``idx[c]`` is
        removed (no other mask active). This default runs the masked forward with the C candidates
        stacked on the batch axis; adapters may override it with a cheaper computation."""
        n = len(idx)
        base = self.run(unit, stream).x
        size = self.topology().site(unit).size
        masks = Masks({unit: removal_masks(size, idx, stream.x.shape[0], stream.x)})
        with self.masking(masks):
            out = self.run(unit, stream.repeat(n)).x
        return out.view(n, *base.shape) - base

    # ---------------------------------------------------------------- surgery
    @abstractmethod
    def rebuild(self, plan: "Plan") -> tuple[nn.Module, "ModelConfig"]:
        """A new model of this family at ``plan``'s shape with sliced weights, and its config
        (rebuilt through the family's own constructor; the original model is not modified). The plan
        has been checked (:func:`upvit.surgery.prune` runs :meth:`check_plan` once before this)."""

    def check_plan(self, plan: "Plan") -> None:
        """Refuse, in one line, a plan the family's constructor cannot express (default: the rules,
        and for a plan that removes units, :meth:`check_units`)."""
        if plan.units is not None:
            self.check_units(plan.units)
        topology = self.topology()
        topology.rules.check(plan.stage_shapes(topology))

    def check_units(self, kept: Sequence[str]) -> list[PairedBlock]:
        """The blocks the family rebuilds from ``kept`` units (see :meth:`Topology.rebuilt_blocks`), or
        a one-line UpvitError where it cannot. Families where a block's position matters (Swin's
        shifted windows) override this to refuse removals that would change a remaining block."""
        topo = self.topology()
        if not topo.rules.depth_pruning and len(list(kept)) != len(topo.units):
            raise UpvitError(f"{topo.rules.family} does not support removing blocks")
        return topo.rebuilt_blocks(kept)


def forward_from(adapter: Adapter, stream: Stream, start: int, topology: Topology | None = None) -> torch.Tensor:
    """Logits ``[B, E, K]`` from ``stream`` entering unit number ``start`` (``len(units)``: the head).

    Where the topology has ``head_tokens``, the last unit, if it is an FFN, runs on those tokens only
    (the logits are the same: the head reads nothing else, and an FFN mixes no tokens)."""
    topo = topology or adapter.topology()
    units = topo.units
    last = len(units) - 1
    for i in range(start, len(units)):
        if i == last and topo.head_tokens and units[i].kind == "ffn" and "head_only" not in stream.info:
            stream = stream.head_only(topo.head_tokens)
        stream = adapter.run(units[i].key, stream)
    return adapter.end(stream)


__all__ = ["Adapter", "Inputs", "MaskProbe", "Masks", "Stream", "batch_cat", "batch_len", "batch_repeat",
           "batch_slice", "batch_to", "broadcast_mask", "forward_from", "masked_layer_norm", "per_window",
           "removal_masks"]
