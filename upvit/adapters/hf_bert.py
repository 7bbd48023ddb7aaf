"""Adapter for Hugging Face BERT: ``BertModel`` (a sentence encoder, e.g. MiniLM) and ``BertForMaskedLM``.

BERT is post-norm: a unit is ``x -> LayerNorm(x + branch(x))`` (``attn.{b}``: self-attention and
``attention.output``; ``ffn.{b}``: ``intermediate`` and ``output``). Topology: one residual stream
``res.0``, per layer ``attn.{b}`` (q/k/v dims) and ``ffn.{b}`` (intermediate units). The stream between
units is ``[B, T, D]`` plus the ``[B, T]`` padding mask (each unit builds transformers' own
bidirectional mask from it, so any attention backend works).

Masks (hooks on transformers' modules, only inside :meth:`HFBertAdapter.masking`):

* ``res.0``: every LayerNorm on the residual stream is recomputed over the kept channels (removed
  ones come out as 0): the embeddings' LayerNorm (after word + position + token-type embeddings),
  each layer's two output LayerNorms, and the MLM head's transform LayerNorm, whose output lives
  in the residual space because the decoder is tied to the word embeddings. The pooler's output
  is zeroed there too (its dense layer is residual-to-residual). Since a post-norm unit ends with
  a (masked) LayerNorm, the branch outputs need no mask, and multiplying the embedding tables'
  outputs is implied (the masked LayerNorm ignores its input's removed channels). This equals
  slicing the channel out of the three embedding tables (column c), every LayerNorm, the q/k/v,
  intermediate, pooler and MLM-transform inputs, the attention-output, output, pooler and
  MLM-transform output rows and the tied decoder's input column.
* ``attn.{b}``: dim d of q, k and v is zeroed; the scale stays the original ``head_size ** -0.5``.
* ``ffn.{b}``: intermediate unit j is zeroed after the activation.
* a skipped unit: the whole post-norm sublayer becomes the identity (its LayerNorm included), which
  is what a model without that sublayer computes.

Output events and divergence: ``BertForMaskedLM`` gives the MLM head's token distribution at every
position (``[B, T, V]``, padding weighted 0), scored by the paper's KL. A bare ``BertModel`` has no
distribution: its output is the sentence embedding (mean of the last hidden states over the
attention mask, L2-normalised, as sentence-transformers uses MiniLM), ``[B, 1, D]``, and a channel's
score is ``sum_i (1 - cos(e_i, e_i'))`` over the proxy sentences, ``e'`` the embedding with the
channel removed (a removed residual channel is 0 in ``e'``: the comparison is in the original's
coordinates). ``ffn_rank1`` does not apply (a LayerNorm follows the residual add).

Surgery rebuilds the same class from the source config with ``hidden_size``,
``num_attention_heads`` and ``intermediate_size`` changed; transformers 5.x derives the head size
as ``hidden_size / num_attention_heads`` (no ``pruned_heads``), so the attention width must equal
the hidden size (MiniLM 384 / 12 heads -> 192 / 6 heads keeps the head size 32). The MLM decoder
stays tied to the word embeddings.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UpvitError
from ..tasks import Task, mean_pooled
from ..topology import Rules, Topology
from .base import Adapter, Masks, Stream
from .family import Family
from .hf_common import TIED_NOTE, eager_attention, hf_config, rebuild_from_config
from .hooks import HookMasking, norm_hook, scale_hook
from .slicing import ChannelSlice, Declaration, apply_rules, fold_q_scale, q_scale

CLASSES = ("BertModel", "BertForMaskedLM")


def is_hf_bert(model: nn.Module) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return any(type(model) is getattr(transformers, name) for name in CLASSES)


def _identity_of_residual(module, inputs, out):
    """Skip hook for BertSelfOutput / BertOutput ``(hidden_states, input_tensor)``: return the residual input."""
    return inputs[1]


class HFBertAdapter(HookMasking, Adapter):
    family = "hf_bert"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.bert = model if type(model).__name__ == "BertModel" else model.bert
        self.mlm = type(model).__name__ == "BertForMaskedLM"
        self.divergence = "kl" if self.mlm else "cosine"
        cfg = model.config
        problems = []
        if cfg.is_decoder or cfg.add_cross_attention:
            problems.append("a decoder / cross-attention configuration")
        if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
            problems.append(f"{cfg.position_embedding_type} position embeddings")
        if self.mlm and model.cls.predictions.decoder.weight is not self.bert.embeddings.word_embeddings.weight:
            problems.append("an MLM decoder not tied to the word embeddings")
        if problems:
            raise UpvitError("this BERT variant is not supported yet: " + "; ".join(problems))

    # ---------------------------------------------------------------- structure
    def build_topology(self) -> Topology:
        cfg = self.model.config
        layers = self.bert.encoder.layer
        attn = layers[0].attention.self.all_head_size
        rules = Rules(f"transformers BERT ({TIED_NOTE})", attn_tied_to_residual=True,
                      uniform_across_stages=frozenset({"heads", "attn", "ffn"}), depth_pruning=False,
                      notes=("attention width = hidden_size; heads must divide hidden_size",))
        n = len(layers)
        return Topology.single_stage(self.family, cfg.hidden_size, [cfg.num_attention_heads] * n, [attn] * n,
                                     [layers[0].intermediate.dense.out_features] * n, rules)

    def input_size(self) -> tuple[int, ...] | None:
        config = getattr(self.model, "upvit_config", None)
        length = (config.data_config or {}).get("max_length") if config is not None else None
        return (int(length or min(128, self.model.config.max_position_embeddings)),)

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        ids = torch.zeros(batch_size, self.input_size()[0], dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def output(self, events: torch.Tensor) -> torch.Tensor:
        return events if self.mlm else events[:, 0]

    def event_weights(self, inputs) -> torch.Tensor | None:
        if not self.mlm:
            return None
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        return None if mask is None else mask.to(torch.float64)

    # ---------------------------------------------------------------- weights per channel (declared once)
    def channel_slices(self) -> dict[str, list[ChannelSlice]]:
        """The state-dict slices that carry channel c of each site (magnitude, Taylor and surgery derive
        from it). ``res.0``: column c of the three embedding tables, every residual LayerNorm, the
        q/k/v/intermediate input columns, the attention-output/output rows, the pooler's and the MLM
        transform's rows and columns (residual to residual) and the MLM decoder's input column (the decoder
        is the word table, tied: its weight counts once in magnitude and Taylor). ``attn.b``: q, k and v
        rows d (and biases), the attention output's column d. ``ffn.b``: intermediate row j and bias, the
        output's column j."""
        pf, res = ("bert." if self.mlm else ""), "res.0"
        layers = range(len(self.bert.encoder.layer))
        d = Declaration(self.model.state_dict(), [site.key for site in self.topology().sites])
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            d.claim(res, f"{pf}embeddings.{name}.weight", 1, "param")
        d.vector(res, f"{pf}embeddings.LayerNorm")
        for b in layers:
            d.vector(res, f"{pf}encoder.layer.{b}.attention.output.LayerNorm")
            d.vector(res, f"{pf}encoder.layer.{b}.output.LayerNorm")
        if self.mlm:
            d.vector(res, "cls.predictions.transform.LayerNorm")
        for b in layers:
            p, attn, ffn = f"{pf}encoder.layer.{b}", f"attn.{b}", f"ffn.{b}"
            for name in ("query", "key", "value"):
                d.linear(f"{p}.attention.self.{name}", out=attn, inp=res)
            d.linear(f"{p}.intermediate.dense", out=ffn, inp=res)
            d.linear(f"{p}.attention.output.dense", out=res, inp=attn)
            d.linear(f"{p}.output.dense", out=res, inp=ffn)
        d.linear(f"{pf}pooler.dense", out=res, inp=res)  # absent without a pooler
        if self.mlm:
            d.linear("cls.predictions.transform.dense", out=res, inp=res)
            d.claim(res, "cls.predictions.decoder.weight", 1, "in")
        return d.slices

    def untouched_keys(self) -> set[str]:
        """The MLM decoder's bias (one per token, stored under two keys)."""
        return {"cls.predictions.bias", "cls.predictions.decoder.bias"} & set(self.model.state_dict())

    def _residual_norms(self) -> list[nn.LayerNorm]:
        norms = [self.bert.embeddings.LayerNorm]
        for layer in self.bert.encoder.layer:
            norms += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
        if self.mlm:
            norms.append(self.model.cls.predictions.transform.LayerNorm)
        return norms

    def explicit_attention(self):
        return eager_attention(self.model)

    # ---------------------------------------------------------------- masking
    def install_hooks(self, masks: Masks, skip: frozenset[str]) -> list:
        handles = []
        res = masks.get("res.0")
        if res is not None:
            for norm in self._residual_norms():
                handles.append(norm.register_forward_hook(norm_hook(res)))
            if self.bert.pooler is not None:
                handles.append(self.bert.pooler.register_forward_hook(scale_hook(res)))
        for b, layer in enumerate(self.bert.encoder.layer):
            attn = masks.get(f"attn.{b}")
            if attn is not None:
                for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                    handles.append(lin.register_forward_hook(scale_hook(attn)))
            ffn = masks.get(f"ffn.{b}")
            if ffn is not None:
                handles.append(layer.intermediate.register_forward_hook(scale_hook(ffn)))
            if f"attn.{b}" in skip:
                handles.append(layer.attention.output.register_forward_hook(_identity_of_residual))
            if f"ffn.{b}" in skip:
                handles.append(layer.output.register_forward_hook(_identity_of_residual))
        return handles

    # ---------------------------------------------------------------- unit-by-unit forward (BertLayer split in two)
    def begin(self, inputs) -> Stream:
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise UpvitError("a BERT model takes a dict with input_ids (and attention_mask, token_type_ids)")
        x = self.bert.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
        mask = inputs.get("attention_mask")
        return Stream(x, {} if mask is None else {"attention_mask": mask})

    def _mask(self, stream: Stream):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=stream.x,
                                         attention_mask=stream.batch.get("attention_mask"))

    def run(self, unit: str, stream: Stream) -> Stream:
        kind, _, b = unit.partition(".")
        layer, x = self.bert.encoder.layer[int(b)], stream.x
        if kind == "attn":
            return stream.replace(layer.attention(x, self._mask(stream))[0])
        return stream.replace(layer.output(layer.intermediate(x), x))

    def end(self, stream: Stream) -> torch.Tensor:
        if self.mlm:
            return self.model.cls(stream.x)  # [B, T, V]
        return mean_pooled(stream.x, stream.batch.get("attention_mask")).unsqueeze(1)  # [B, 1, D]

    # ================================================================ surgery
    def rebuild(self, plan):
        """The same BERT class at the plan's shape (see the module doc), weights sliced from this one."""
        topo = self.topology()
        if plan.units is not None and len(plan.units) != len(topo.units):
            raise UpvitError("BERT is rebuilt with all its layers here: depth pruning is not supported for this "
                             "family yet")
        cfg = self.model.config
        dim, heads = plan.embed_dim, plan.num_heads
        state = self._slice(plan)
        factor = q_scale(cfg.hidden_size // cfg.num_attention_heads, dim // heads)
        if factor is not None:
            prefix = "bert." if self.mlm else ""
            for b in range(len(self.bert.encoder.layer)):
                fold_q_scale(state, f"{prefix}encoder.layer.{b}.attention.self.query", dim, factor)
        new = rebuild_from_config(self.model, {"hidden_size": dim, "num_attention_heads": heads,
                                               "intermediate_size": plan.ffn_dim(0)}, state)
        if self.mlm and new.cls.predictions.decoder.weight is not new.bert.embeddings.word_embeddings.weight:
            raise AssertionError("the rebuilt BertForMaskedLM lost the tie between its decoder and word embeddings")
        new.upvit_tokenizer = getattr(self.model, "upvit_tokenizer", None)
        return new, hf_config(self.model, new, FAMILY)

    def _slice(self, plan) -> dict[str, torch.Tensor]:
        """The state dict sliced as :meth:`channel_slices` declares."""
        return apply_rules(self.model, self.declared_slice_rules(plan.keep), "BERT")


# ------------------------------------------------------------------------------------- family record
_TASKS = {"BertForMaskedLM": Task.MASKED_LM, "BertModel": Task.SENTENCE_EMBEDDING}


def _data_config(model: nn.Module) -> dict:
    """The task of the class and a max length of 64 tokens (fewer where the model has fewer positions); a
    sentence encoder adds its mean pooling and normalisation."""
    task = _TASKS[type(model).__name__]
    extra = {"pooling": "mean", "normalize": True} if task == Task.SENTENCE_EMBEDDING else {}
    return {"task": str(task), "max_length": min(64, int(model.config.max_position_embeddings)), **extra}


FAMILY = Family("hf_bert", "hf", classes=_TASKS, model_types={"bert": "BertForMaskedLM"}, data_config=_data_config)
