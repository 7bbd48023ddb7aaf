"""Adapter for Hugging Face ``GPT2LMHeadModel`` (pre-norm decoder, LM head tied to the embeddings).

Topology: one residual stream ``res.0`` (the token + position embedding sum and everything written
to it), per block ``attn.{b}`` (q/k/v dims) and ``ffn.{b}`` (MLP hidden units). The stream between
units is ``[B, T, D]`` plus the ``[B, T]`` padding mask; every unit builds transformers' own causal
mask from it (``create_causal_mask``, as ``GPT2Model`` does), so any attention backend works.

Masks (hooks on transformers' modules, only inside :meth:`HFGPT2Adapter.masking`):

* ``res.0``: the embedding sum (``wte(ids) + wpe(pos)``, at ``transformer.drop``) is multiplied by the
  mask; ``ln_1``, ``ln_2`` and ``ln_f`` are recomputed over the kept channels; both ``c_proj`` outputs
  are zeroed at removed channels. This equals slicing the channel out of ``wte`` and ``wpe`` (column c),
  every LayerNorm, the input rows of ``c_attn``/``c_fc`` (``Conv1D`` stores weights as [in, out]),
  the output columns of both ``c_proj`` and the LM head, which is the same tensor as ``wte``.
* ``attn.{b}``: dim d of q, k and v (the three thirds of ``c_attn``'s output) is zeroed; the scale
  stays the original ``head_dim ** -0.5`` (and the optional ``1 / (layer + 1)``).
* ``ffn.{b}``: hidden unit j is zeroed after the activation.
* a skipped unit (depth pruning): its ``c_proj`` output is zeroed (the branch adds nothing).

Output events: the next-token logits at every position, ``[B, T, V]``; :meth:`event_weights` is the
attention mask, so padding positions do not count. The last position counts too: its next-token
distribution is defined (it predicts the token after the block) even though the block holds no target
for it; the KL compares distributions and needs no target.

Surgery rebuilds ``GPT2LMHeadModel`` from the source config with ``n_embd``, ``n_head`` and ``n_inner``
changed. transformers 5.x derives the head size as ``n_embd / n_head`` and has no ``pruned_heads``,
so the attention width must equal the residual width (:class:`~upvit.topology.Rules`
``attn_tied_to_residual``): a DeiT-B -> DeiT-S-like target (half the width, half the heads, the
same head size) is expressible, 64 of 128 attention dims under a 128-wide stream is not. The LM
head is rebuilt tied to the new word embeddings, and saves/reloads tied.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UpvitError
from ..tasks import Task
from ..topology import Rules, Topology
from .base import Adapter, Masks, Stream
from .family import Family
from .hf_common import TIED_NOTE, eager_attention, hf_config, rebuild_from_config
from .hooks import HookMasking, grouped_scale_hook, norm_hook, scale_hook, zero_hook
from .slicing import ChannelSlice, Declaration, apply_rules, fold_q_scale, q_scale


def is_hf_gpt2(model: nn.Module) -> bool:
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return False
    return type(model) is GPT2LMHeadModel


class HFGPT2Adapter(HookMasking, Adapter):
    family = "hf_gpt2"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        problems = []
        if cfg.add_cross_attention:
            problems.append("cross-attention layers")
        if model.lm_head.weight is not model.transformer.wte.weight:
            problems.append("an LM head not tied to the word embeddings")
        if model.lm_head.bias is not None:
            problems.append("an LM head with a bias")
        if problems:
            raise UpvitError("this GPT-2 variant is not supported yet: " + "; ".join(problems))
        self.t = model.transformer

    # ---------------------------------------------------------------- structure
    def build_topology(self) -> Topology:
        cfg = self.model.config
        depth = len(self.t.h)
        ffn = self.t.h[0].mlp.c_fc.weight.shape[1]
        rules = Rules(f"transformers GPT-2 ({TIED_NOTE})", attn_tied_to_residual=True,
                      uniform_across_stages=frozenset({"heads", "attn", "ffn"}), depth_pruning=False,
                      notes=("attention width = n_embd; heads must divide n_embd",))
        return Topology.single_stage(self.family, cfg.n_embd, [cfg.n_head] * depth, [cfg.n_embd] * depth,
                                     [ffn] * depth, rules)

    def input_size(self) -> tuple[int, ...] | None:
        config = getattr(self.model, "upvit_config", None)
        block = (config.data_config or {}).get("block_size") if config is not None else None
        return (int(block or self.model.config.n_positions),)

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        ids = torch.zeros(batch_size, self.input_size()[0], dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def output(self, events: torch.Tensor) -> torch.Tensor:
        return events  # [B, T, V]: the model's own layout

    def event_weights(self, inputs) -> torch.Tensor | None:
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        return None if mask is None else mask.to(torch.float64)

    # ---------------------------------------------------------------- weights per channel (declared once)
    def channel_slices(self) -> dict[str, list[ChannelSlice]]:
        """The state-dict slices that carry channel c of each site (magnitude, Taylor and surgery derive
        from it; ``Conv1D`` weights are ``[in, out]``). ``res.0``: column c of ``wte`` and ``wpe``, every
        LayerNorm, the c_attn/c_fc input rows, both c_proj output columns and the LM head's input column
        (the LM head is ``wte``, tied: its weight counts once in magnitude and Taylor). ``attn.b``: q, k
        and v columns d of c_attn (and biases), c_proj row d. ``ffn.b``: c_fc column j and bias, c_proj
        row j."""
        res = "res.0"
        d = Declaration(self.model.state_dict(), [site.key for site in self.topology().sites])
        d.claim(res, "transformer.wte.weight", 1, "param")
        d.claim(res, "transformer.wpe.weight", 1, "param")
        for b in range(len(self.t.h)):
            p, attn, ffn = f"transformer.h.{b}", f"attn.{b}", f"ffn.{b}"
            d.vector(res, f"{p}.ln_1")
            d.vector(res, f"{p}.ln_2")
            d.conv1d(f"{p}.attn.c_attn", out=attn, inp=res, out_copies=3)  # q, k and v columns d
            d.conv1d(f"{p}.attn.c_proj", out=res, inp=attn)
            d.conv1d(f"{p}.mlp.c_fc", out=ffn, inp=res)
            d.conv1d(f"{p}.mlp.c_proj", out=res, inp=ffn)
        d.vector(res, "transformer.ln_f")
        d.claim(res, "lm_head.weight", 1, "in")
        return d.slices

    def explicit_attention(self):
        return eager_attention(self.model)

    # ---------------------------------------------------------------- masking
    def install_hooks(self, masks: Masks, skip: frozenset[str]) -> list:
        t, handles = self.t, []
        res = masks.get("res.0")
        if res is not None:
            handles.append(t.drop.register_forward_hook(scale_hook(res)))
            for blk in t.h:
                for norm in (blk.ln_1, blk.ln_2):
                    handles.append(norm.register_forward_hook(norm_hook(res)))
                handles.append(blk.attn.c_proj.register_forward_hook(scale_hook(res)))
                handles.append(blk.mlp.c_proj.register_forward_hook(scale_hook(res)))
            handles.append(t.ln_f.register_forward_hook(norm_hook(res)))
        for b, blk in enumerate(t.h):
            attn = masks.get(f"attn.{b}")
            if attn is not None:
                handles.append(blk.attn.c_attn.register_forward_hook(grouped_scale_hook(attn, 3)))
            ffn = masks.get(f"ffn.{b}")
            if ffn is not None:
                handles.append(blk.mlp.act.register_forward_hook(scale_hook(ffn)))
            if f"attn.{b}" in skip:
                handles.append(blk.attn.c_proj.register_forward_hook(zero_hook))
            if f"ffn.{b}" in skip:
                handles.append(blk.mlp.c_proj.register_forward_hook(zero_hook))
        return handles

    # ---------------------------------------------------------------- unit-by-unit forward (GPT2Block split in two)
    def begin(self, inputs) -> Stream:
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise UpvitError("a GPT-2 model takes a dict with input_ids (and attention_mask)")
        ids = inputs["input_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.t.drop(self.t.wte(ids) + self.t.wpe(pos))
        mask = inputs.get("attention_mask")
        return Stream(x, {} if mask is None else {"attention_mask": mask})

    def _causal_mask(self, stream: Stream):
        from transformers.masking_utils import create_causal_mask

        x = stream.x
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        return create_causal_mask(config=self.model.config, inputs_embeds=x,
                                  attention_mask=stream.batch.get("attention_mask"), past_key_values=None,
                                  position_ids=pos)

    def run(self, unit: str, stream: Stream) -> Stream:
        kind, _, b = unit.partition(".")
        blk, x = self.t.h[int(b)], stream.x
        if kind == "attn":
            out, _ = blk.attn(blk.ln_1(x), attention_mask=self._causal_mask(stream))
            return stream.replace(x + out)
        return stream.replace(x + blk.mlp(blk.ln_2(x)))

    def end(self, stream: Stream) -> torch.Tensor:
        return self.model.lm_head(self.t.ln_f(stream.x))  # [B, T, V]: one event per position

    # ---------------------------------------------------------------- fast path (pre-norm: removing unit j is rank 1)
    def ffn_rank1(self, unit: str, stream: Stream) -> tuple[Stream, torch.Tensor, torch.Tensor] | None:
        if self.model.training:
            return None
        mlp, x = self.t.h[int(unit.split(".")[1])].mlp, stream.x
        acts = mlp.act(mlp.c_fc(self.t.h[int(unit.split(".")[1])].ln_2(x)))
        out = x + mlp.dropout(mlp.c_proj(acts))
        return stream.replace(out), acts, mlp.c_proj.weight  # Conv1D weight [H, D]: row j is unit j's direction

    # ================================================================ surgery
    def rebuild(self, plan):
        """A new ``GPT2LMHeadModel`` at the plan's shape (see the module doc), weights sliced from this one."""
        topo = self.topology()
        if plan.units is not None and len(plan.units) != len(topo.units):
            raise UpvitError("GPT-2 is rebuilt with all its blocks here: depth pruning is not supported for this "
                             "family yet")
        cfg = self.model.config
        dim, heads = plan.embed_dim, plan.num_heads
        state = self._slice(plan)
        factor = q_scale(cfg.n_embd // cfg.n_head, dim // heads) if cfg.scale_attn_weights else None
        if factor is not None:
            for b in range(len(self.t.h)):  # q: the first third of c_attn's outputs (Conv1D: the last axis)
                fold_q_scale(state, f"transformer.h.{b}.attn.c_attn", dim, factor, dim=-1)
        new = rebuild_from_config(self.model, {"n_embd": dim, "n_head": heads, "n_inner": plan.ffn_dim(0)}, state)
        if new.lm_head.weight is not new.transformer.wte.weight:  # transformers' own tie: check, never patch
            raise AssertionError("the rebuilt GPT-2 lost the tie between its LM head and word embeddings")
        new.upvit_tokenizer = getattr(self.model, "upvit_tokenizer", None)
        return new, hf_config(self.model, new, FAMILY)

    def _slice(self, plan) -> dict[str, torch.Tensor]:
        """The state dict sliced as :meth:`channel_slices` declares."""
        return apply_rules(self.model, self.declared_slice_rules(plan.keep), "GPT-2")


# ------------------------------------------------------------------------------------- family record
def _data_config(model: nn.Module) -> dict:
    """A causal LM reads blocks of its context length."""
    return {"task": str(Task.CAUSAL_LM), "block_size": int(model.config.n_positions)}


FAMILY = Family("hf_gpt2", "hf", classes={"GPT2LMHeadModel": Task.CAUSAL_LM},
                model_types={"gpt2": "GPT2LMHeadModel"}, data_config=_data_config)
