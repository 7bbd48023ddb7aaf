"""Adapter for timm ``VisionTransformer`` (ViT, DeiT) and ``VisionTransformerDistilled``.

Masks are applied by forward hooks on timm's own modules, registered only inside
:meth:`TimmViTAdapter.masking`, so the model runs its installed forward (fused attention
included) and is untouched outside that context:

* residual (``embed``): the token stream after position embedding is multiplied by the mask; every
  residual-width LayerNorm (``norm_pre``, ``norm1``, ``norm2``, ``norm``, ``fc_norm``) is
  recomputed over the kept channels only, its output zeroed at removed ones; the attention and
  FFN branch outputs are zeroed there, so the channel never re-enters the stream. This equals
  slicing the channel out of every tensor (patch embedding, tokens, position embedding, norms,
  qkv/fc1/head inputs, proj/fc2 outputs).
* ``attn.{b}``: dimension d of q, k and v (the qkv output) is zeroed; the attention scale stays
  ``head_dim ** -0.5`` of the original model, as timm's module keeps it.
* ``ffn.{b}``: hidden unit j is zeroed after the activation.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UpvitError
from . import register
from .base import Adapter, Masks, broadcast_mask, masked_layer_norm


def _timm_classes():
    from .._compat import import_timm

    import_timm()
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention, Mlp


def is_timm_vit(model: nn.Module) -> bool:
    try:
        VisionTransformer = _timm_classes()[0]
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


class TimmViTAdapter(Adapter):
    family = "timm_vit"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        _, Block, Attention, Mlp = _timm_classes()
        problems = []
        if getattr(model, "attn_pool", None) is not None:
            problems.append("attention pooling (global_pool='map')")
        for i, blk in enumerate(model.blocks):
            if type(blk) is not Block:
                problems.append(f"block {i} is {type(blk).__name__}, not timm's pre-norm Block")
                break
            if type(blk.attn) is not Attention or getattr(blk.attn, "gate", None) is not None:
                problems.append(f"block {i} attention is {type(blk.attn).__name__} (gated or custom)")
            elif not isinstance(blk.attn.q_norm, nn.Identity) or not isinstance(blk.attn.norm, nn.Identity):
                problems.append(f"block {i} uses qk_norm/scale_norm")
            if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
                problems.append(f"block {i} FFN is {type(blk.mlp).__name__} (GLU or normed MLP)")
            if not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm):
                problems.append(f"block {i} norms are not LayerNorm")
        if problems:
            raise UpvitError("this timm VisionTransformer variant is not supported yet: " + "; ".join(problems[:3]))
        self.distilled = hasattr(model, "head_dist")

    # ---------------------------------------------------------------- structure
    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def attn_dim(self, block: int) -> int:
        return self.model.blocks[block].attn.attn_dim

    def num_heads(self, block: int) -> int:
        return self.model.blocks[block].attn.num_heads

    def head_dim(self, block: int) -> int:
        return self.model.blocks[block].attn.head_dim

    def ffn_dim(self, block: int) -> int:
        return self.model.blocks[block].mlp.fc1.out_features

    def residual_norms(self) -> list[nn.Module]:
        """Every LayerNorm that normalises over the residual width."""
        m = self.model
        norms = [m.norm_pre]
        for blk in m.blocks:
            norms += [blk.norm1, blk.norm2]
        norms += [m.norm, getattr(m, "fc_norm", nn.Identity())]
        return [n for n in norms if isinstance(n, nn.LayerNorm)]

    # ---------------------------------------------------------------- weights per channel (magnitude baseline)
    def channel_weights(self, site_key: str) -> list[tuple[torch.Tensor, int]]:
        """``(tensor, dim)`` pairs: index i along ``dim`` of each tensor is a weight carried by channel i of
        the site. ``embed``: every residual-width slice (patch embedding out, tokens, position embedding,
        residual LayerNorms, qkv/fc1/head inputs, proj/fc2 outputs, LayerScale). ``attn.b``: q, k and v
        rows (and biases) of dim d and the proj column d. ``ffn.b``: fc1 row j and bias, fc2 column j."""
        m = self.model
        component, _, block = site_key.partition(".")
        out: list[tuple[torch.Tensor, int]] = []

        def add(t, dim):
            if isinstance(t, torch.Tensor):
                out.append((t.detach(), dim))

        if component == "attn" and block.isdigit() and int(block) < self.num_blocks:
            attn = m.blocks[int(block)].attn
            a = self.attn_dim(int(block))
            add(attn.qkv.weight.view(3, a, -1), 1)
            if attn.qkv.bias is not None:
                add(attn.qkv.bias.view(3, a), 1)
            add(attn.proj.weight, 1)
        elif component == "ffn" and block.isdigit() and int(block) < self.num_blocks:
            mlp = m.blocks[int(block)].mlp
            add(mlp.fc1.weight, 0)
            add(mlp.fc1.bias, 0)
            add(mlp.fc2.weight, 1)
        elif site_key == "embed":
            add(m.patch_embed.proj.weight, 0)
            add(m.patch_embed.proj.bias, 0)
            for name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
                add(getattr(m, name, None), -1)
            for norm in self.residual_norms():
                add(norm.weight, 0)
                add(norm.bias, 0)
            for blk in m.blocks:
                add(blk.attn.qkv.weight, 1)
                add(blk.attn.proj.weight, 0)
                add(blk.attn.proj.bias, 0)
                add(blk.mlp.fc1.weight, 1)
                add(blk.mlp.fc2.weight, 0)
                add(blk.mlp.fc2.bias, 0)
                for ls in (blk.ls1, blk.ls2):
                    add(getattr(ls, "gamma", None), 0)
            for head in (m.head, getattr(m, "head_dist", None)):
                if isinstance(head, nn.Linear):
                    add(head.weight, 1)
        else:
            raise UpvitError(f"no site {site_key!r} in this model: use embed, attn.B or ffn.B with B < {self.num_blocks}")
        return out

    # ---------------------------------------------------------------- masking
    @contextlib.contextmanager
    def masking(self, masks: Masks | None):
        handles = []
        try:
            if masks:
                handles = self._install(masks)
            yield self
        finally:
            for h in handles:
                h.remove()

    def _install(self, masks: Masks) -> list:
        m = self.model
        handles = []

        def scale_output(mask):
            return lambda module, inputs, out: out * broadcast_mask(mask, out)

        embed = masks.get("embed")
        if embed is not None:
            handles.append(m.patch_drop.register_forward_hook(scale_output(embed)))
            for norm in self.residual_norms():
                handles.append(norm.register_forward_hook(
                    lambda mod, inputs, out, mask=embed: masked_layer_norm(inputs[0], mask, mod.weight, mod.bias, mod.eps)))
            for blk in m.blocks:
                handles.append(blk.attn.register_forward_hook(scale_output(embed)))
                handles.append(blk.mlp.register_forward_hook(scale_output(embed)))
        for b, blk in enumerate(m.blocks):
            attn_mask = masks.get(f"attn.{b}")
            if attn_mask is not None:
                def qkv_hook(module, inputs, out, mask=attn_mask):
                    shape = out.shape
                    out = out.view(*shape[:-1], 3, shape[-1] // 3)
                    mm = mask if mask.dim() == 1 else mask.view(mask.shape[0], *([1] * (out.dim() - 2)), mask.shape[1])
                    return (out * mm).view(shape)
                handles.append(blk.attn.qkv.register_forward_hook(qkv_hook))
            ffn_mask = masks.get(f"ffn.{b}")
            if ffn_mask is not None:
                handles.append(blk.mlp.act.register_forward_hook(scale_output(ffn_mask)))
        return handles

    # ---------------------------------------------------------------- staged forward (timm Block.forward split in two)
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def attn_half(self, block: int, h: torch.Tensor) -> torch.Tensor:
        blk = self.model.blocks[block]
        return h + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(h))))

    def ffn_half(self, block: int, h: torch.Tensor) -> torch.Tensor:
        blk = self.model.blocks[block]
        return h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))

    def head_tokens(self) -> int | None:
        m = self.model
        n = int(getattr(m, "num_prefix_tokens", 0))
        if self.distilled:
            return n if n >= 2 else None
        return n if m.global_pool == "token" and n >= 1 else None

    def ffn_rank1(self, block: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        blk = self.model.blocks[block]
        if self.model.training or not isinstance(blk.mlp.norm, nn.Identity):
            return None
        mlp = blk.mlp
        acts = mlp.drop1(mlp.act(mlp.fc1(blk.norm2(h))))
        out = h + blk.drop_path2(blk.ls2(mlp.drop2(mlp.fc2(acts))))
        dirs = mlp.fc2.weight.t()
        gamma = getattr(blk.ls2, "gamma", None)
        if gamma is not None:
            dirs = dirs * gamma
        elif not isinstance(blk.ls2, nn.Identity):
            return None
        return out, acts, dirs

    def head(self, h: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_head(self.model.norm(h))
        if isinstance(out, (tuple, list)):  # distilled model in training mode
            out = (out[0] + out[1]) / 2
        return out


register("timm_vit", is_timm_vit, TimmViTAdapter)
