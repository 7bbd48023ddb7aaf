"""Adapter for timm ``VisionTransformer`` (ViT, DeiT) and ``VisionTransformerDistilled``.

A one-stage topology: the residual stream ``res.0``, and per block ``attn.{b}`` / ``ffn.{b}``
(sites and units). Masks are applied by forward hooks on timm's own modules, registered only inside
:meth:`TimmViTAdapter.masking`, so the model runs its installed forward (fused attention included)
and is untouched outside that context:

* residual (``res.0``): the token stream after position embedding is multiplied by the mask; every
  residual-width LayerNorm (``norm_pre``, ``norm1``, ``norm2``, ``norm``, ``fc_norm``) is
  recomputed over the kept channels only, its output zeroed at removed ones; the attention and
  FFN branch outputs are zeroed there, so the channel never re-enters the stream. This equals
  slicing the channel out of every tensor (patch embedding, tokens, position embedding, norms,
  qkv/fc1/head inputs, proj/fc2 outputs).
* ``attn.{b}``: dimension d of q, k and v (the qkv output) is zeroed; the attention scale stays
  ``head_dim ** -0.5`` of the original model, as timm's module keeps it.
* ``ffn.{b}``: hidden unit j is zeroed after the activation.
* a skipped unit (depth pruning): its branch output is zeroed.

Surgery rebuilds through ``timm.create_model`` (timm's VisionTransformer ties the attention width
to ``embed_dim`` and has one ``num_heads`` and ``mlp_ratio`` for all blocks: :meth:`rules`). Removed
units (depth pruning) give ``depth`` = the re-paired blocks: any removal whose kept units pair into
blocks can be rebuilt (a ViT block does not depend on its position).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UpvitError
from ..topology import Rules, Topology
from .base import Adapter, MaskProbe, Masks, Stream, masked_layer_norm
from .family import Family
from .hooks import HookMasking, grouped_scale_hook, scale_hook, zero_hook
from .slicing import ChannelSlice, Declaration, apply_rules, fold_q_scale, move_sublayers
from .timm_common import base_config, exact_ratio, explicit_attention, new_config, output_divergence, rebuild_from_state


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


EQUIVALENT_CANDIDATES = [
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
    "vit_small_patch32_224", "vit_base_patch32_224", "vit_large_patch32_224",
    "deit_base_patch16_384", "vit_tiny_patch16_384", "vit_small_patch16_384", "vit_base_patch16_384",
]


class TimmViTAdapter(HookMasking, Adapter):
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
        # a headless backbone (num_classes=0) outputs its pooled embedding: scored by 1 - cos, not KL
        divergence = output_divergence(model, problems)
        if problems:
            raise UpvitError("this timm VisionTransformer variant is not supported yet: " + "; ".join(problems[:3]))
        self.distilled = hasattr(model, "head_dist")
        self.divergence = divergence

    # ---------------------------------------------------------------- structure
    def build_topology(self) -> Topology:
        m = self.model
        blocks = list(m.blocks)
        return Topology.single_stage(
            self.family, m.embed_dim, [b.attn.num_heads for b in blocks], [b.attn.attn_dim for b in blocks],
            [b.mlp.fc1.out_features for b in blocks], vit_rules(), head_tokens=self._head_tokens())

    def _head_tokens(self) -> int | None:
        m = self.model
        n = int(getattr(m, "num_prefix_tokens", 0))
        if self.distilled:
            return n if n >= 2 else None
        return n if m.global_pool == "token" and n >= 1 else None

    def input_size(self) -> tuple[int, ...] | None:
        size = super().input_size()
        if size is not None:
            return size
        pe = self.model.patch_embed
        return (pe.proj.in_channels, *pe.img_size)

    def explicit_attention(self):
        return explicit_attention(self.model)

    @staticmethod
    def _block_of(key: str) -> int:
        return int(key.split(".")[1])

    def residual_norms(self) -> list[nn.Module]:
        """Every LayerNorm that normalises over the residual width."""
        m = self.model
        norms = [m.norm_pre]
        for blk in m.blocks:
            norms += [blk.norm1, blk.norm2]
        norms += [m.norm, getattr(m, "fc_norm", nn.Identity())]
        return [n for n in norms if isinstance(n, nn.LayerNorm)]

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth increasing linearly with depth (timm's rule), without rebuilding."""
        from .timm_common import import_timm

        import_timm()
        from timm.layers import DropPath

        blocks = self.model.blocks
        for i, block in enumerate(blocks):
            r = rate * i / max(1, len(blocks) - 1)
            if r > 0:
                block.drop_path1, block.drop_path2 = DropPath(r), DropPath(r)

    # ---------------------------------------------------------------- weights per channel (magnitude baseline)
    def channel_slices(self) -> dict[str, list[ChannelSlice]]:
        """The state-dict slices that carry channel c of each site (declared once: magnitude, Taylor and
        surgery derive from it). ``res.0``: the patch embedding's output, the class/distillation/register
        tokens and position embedding, every residual-width LayerNorm and LayerScale, the qkv/fc1/head
        inputs, the proj/fc2 outputs. ``attn.b``: q, k and v rows d (and biases), proj column d.
        ``ffn.b``: fc1 row j and bias, fc2 column j."""
        m = self.model
        d = Declaration(m.state_dict(), [site.key for site in self.topology().sites])
        res = "res.0"
        d.linear("patch_embed.proj", out=res)
        for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            d.claim(res, name, -1, "param")
        for name in ("patch_embed.norm", "norm_pre", "norm", "fc_norm"):
            d.vector(res, name)
        for b in range(len(m.blocks)):
            p, attn, ffn = f"blocks.{b}", f"attn.{b}", f"ffn.{b}"
            for part in ("norm1", "ls1", "norm2", "ls2"):
                d.vector(res, f"{p}.{part}")
            d.linear(f"{p}.attn.qkv", out=attn, inp=res, out_copies=3)  # q, k and v rows d
            d.linear(f"{p}.attn.proj", out=res, inp=attn)
            d.linear(f"{p}.mlp.fc1", out=ffn, inp=res)
            d.linear(f"{p}.mlp.fc2", out=res, inp=ffn)
        for head in ("head", "head_dist"):
            if isinstance(getattr(m, head, None), nn.Linear):
                d.linear(head, inp=res)
        return d.slices

    def untouched_keys(self) -> set[str]:
        """The classifier biases: one per class, no channel of any site."""
        return {f"{head}.bias" for head in ("head", "head_dist") if f"{head}.bias" in self.model.state_dict()}

    # ---------------------------------------------------------------- masking
    def install_hooks(self, masks: Masks, skip: frozenset[str]) -> list:
        m = self.model
        handles = []
        embed = masks.get("res.0")
        if embed is not None:
            handles.append(m.patch_drop.register_forward_hook(scale_hook(embed)))
            for norm in self.residual_norms():
                handles.append(norm.register_forward_hook(
                    lambda mod, inputs, out, mask=embed:
                    masked_layer_norm(inputs[0], mask, mod.weight, mod.bias, mod.eps)))
            for blk in m.blocks:
                handles.append(blk.attn.register_forward_hook(scale_hook(embed)))
                handles.append(blk.mlp.register_forward_hook(scale_hook(embed)))
        for b, blk in enumerate(m.blocks):
            attn_mask = masks.get(f"attn.{b}")
            if attn_mask is not None:  # qkv's output holds q, k and v of the site one after another
                handles.append(blk.attn.qkv.register_forward_hook(grouped_scale_hook(attn_mask, 3)))
            ffn_mask = masks.get(f"ffn.{b}")
            if ffn_mask is not None:
                handles.append(blk.mlp.act.register_forward_hook(scale_hook(ffn_mask)))
            if f"attn.{b}" in skip:
                handles.append(blk.ls1.register_forward_hook(zero_hook))
            if f"ffn.{b}" in skip:
                handles.append(blk.ls2.register_forward_hook(zero_hook))
        return handles

    @contextlib.contextmanager
    def probing(self):
        """Record a :class:`MaskProbe` at every point where :meth:`install_hooks` applies a mask (same
        modules), leaving every output unchanged; the residual stream is made to require grad, and the
        FFN activation (elementwise) is linearised at its forward point, which keeps its value and its
        gradient and makes repeated backward passes cheaper."""
        m = self.model
        probes: list[MaskProbe] = []
        handles = []

        def scale(site, groups=1, leaf=False):
            def hook(module, inputs, out):
                if leaf and not out.requires_grad:  # frozen weights: the stream is the graph's leaf
                    out = out.detach().requires_grad_(True)
                probes.append(MaskProbe(site, "scale", out, groups=groups))
                return out
            return hook

        def act_hook(site):
            def hook(module, inputs, out):  # elementwise: linearised at the forward point, same value,
                u = inputs[0]  # and a backward of one multiply instead of the activation's own
                if not u.requires_grad:
                    return scale(site)(module, inputs, out)
                slope = torch.autograd.grad(out, u, torch.ones_like(out), retain_graph=True)[0]
                out = out.detach() + (u - u.detach()) * slope
                probes.append(MaskProbe(site, "scale", out))
                return out
            return hook

        def norm_hook(module, inputs, out):
            probes.append(MaskProbe("res.0", "layer_norm", out, norm_input=inputs[0], weight=module.weight,
                                    eps=module.eps))

        try:
            handles.append(m.patch_drop.register_forward_hook(scale("res.0", leaf=True)))
            for norm in self.residual_norms():
                handles.append(norm.register_forward_hook(norm_hook))
            for b, blk in enumerate(m.blocks):
                handles.append(blk.attn.register_forward_hook(scale("res.0")))
                handles.append(blk.mlp.register_forward_hook(scale("res.0")))
                handles.append(blk.attn.qkv.register_forward_hook(scale(f"attn.{b}", groups=3)))
                handles.append(blk.mlp.act.register_forward_hook(act_hook(f"ffn.{b}")))
            yield probes
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------- unit-by-unit forward (timm Block.forward split in two)
    def begin(self, inputs: torch.Tensor) -> Stream:
        m = self.model
        x = m.patch_embed(inputs)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return Stream(m.norm_pre(x))

    def run(self, unit: str, stream: Stream) -> Stream:
        kind, _, b = unit.partition(".")
        blk = self.model.blocks[int(b)]
        h = stream.x
        if kind == "attn":
            return stream.replace(h + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(h)))))
        return stream.replace(h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h)))))

    def end(self, stream: Stream) -> torch.Tensor:
        out = self.model.forward_head(self.model.norm(stream.x))
        if isinstance(out, (tuple, list)):  # distilled model in training mode
            out = (out[0] + out[1]) / 2
        return out.unsqueeze(1)

    # ---------------------------------------------------------------- fast paths
    def ffn_rank1(self, unit: str, stream: Stream) -> tuple[Stream, torch.Tensor, torch.Tensor] | None:
        blk = self.model.blocks[self._block_of(unit)]
        if self.model.training or not isinstance(blk.mlp.norm, nn.Identity):
            return None
        mlp, h = blk.mlp, stream.x
        acts = mlp.drop1(mlp.act(mlp.fc1(blk.norm2(h))))
        out = h + blk.drop_path2(blk.ls2(mlp.drop2(mlp.fc2(acts))))
        dirs = mlp.fc2.weight.t()
        gamma = getattr(blk.ls2, "gamma", None)
        if gamma is not None:
            dirs = dirs * gamma
        elif not isinstance(blk.ls2, nn.Identity):
            return None
        return stream.replace(out), acts, dirs

    def attn_removal_deltas(self, unit: str, stream: Stream, idx: torch.Tensor) -> torch.Tensor:
        """Only the head holding a removed dim changes: its scores lose the rank-1 term q_j k_j^T, its
        value column j is zeroed, and the change of its output goes through its slice of ``proj``.
        Falls back to the masked forward for attention variants this does not model."""
        blk = self.model.blocks[self._block_of(unit)]
        attn = blk.attn
        plain = all(isinstance(getattr(attn, name, nn.Identity()), nn.Identity)
                    for name in ("q_norm", "k_norm", "norm"))
        gamma = getattr(blk.ls1, "gamma", None)
        if (self.model.training or not plain or getattr(attn, "gate", None) is not None
                or (gamma is None and not isinstance(blk.ls1, nn.Identity))):
            return super().attn_removal_deltas(unit, stream, idx)
        h = stream.x
        B, N, _ = h.shape
        heads, dh = attn.num_heads, attn.head_dim
        q, k, v = attn.qkv(blk.norm1(h)).reshape(B, N, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, dh]
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        out = scores.softmax(-1) @ v
        idx = idx.to(h.device)
        hh, j = idx // dh, idx % dh
        qj, kj = q[:, hh, :, j], k[:, hh, :, j]  # [C, B, N]
        new_scores = scores[:, hh].transpose(0, 1) - attn.scale * qj.unsqueeze(-1) * kj.unsqueeze(-2)
        new_out = new_scores.softmax(-1) @ v[:, hh].transpose(0, 1)  # [C, B, N, dh]
        new_out[torch.arange(len(idx), device=h.device), :, :, j] = 0  # value column j removed
        change = new_out - out[:, hh].transpose(0, 1)
        w = attn.proj.weight.view(-1, heads, dh)[:, hh].permute(1, 2, 0)  # [C, dh, D]
        delta = torch.einsum("cbne,ced->cbnd", change, w)
        return delta * gamma if gamma is not None else delta

    # ================================================================ surgery: plan -> smaller timm model
    # the sub-layers of a timm Block that belong to each unit (a hybrid removal re-pairs them)
    UNIT_PARTS = {"attn": ("norm1", "attn", "ls1"), "ffn": ("norm2", "mlp", "ls2")}

    def rebuild(self, plan):
        """A new model of the same timm architecture at the plan's shape, weights sliced from this one.

        Built through ``timm.create_model`` so it is a genuine timm model. The attention scale is
        preserved: the pruned module uses ``new_head_dim ** -0.5`` (timm's rule, also what fused
        attention uses), so where the kept per-head dim differs from the original ``head_dim`` the
        ratio ``sqrt(new_head_dim / head_dim)`` is folded into the q rows of qkv (weight and bias).
        Logits then equal the masked original's for any attention backend.

        A plan that removes units (``plan.units``) gives a model with ``depth`` = the number of
        re-paired blocks: new block k takes ``norm1``/``attn``/``ls1`` of the k-th kept attention
        unit and ``norm2``/``mlp``/``ls2`` of the k-th kept FFN unit (the same block for a whole-block
        removal, blocks i and i+1 after removing the hybrid ffn.i + attn.i+1); its logits equal the
        original's with the removed units skipped."""
        m = self.model
        blocks = self.check_units(plan.kept_units(self.topology()))
        base = base_config(m, {"img_size": list(m.patch_embed.img_size), "in_chans": m.patch_embed.proj.in_channels,
                               "num_classes": m.num_classes})
        dim, hidden = plan.embed_dim, len(plan.keep[blocks[0].ffn])
        kwargs = {**base.timm_kwargs, "embed_dim": dim, "num_heads": plan.heads_of(blocks[0].attn),
                  "mlp_ratio": exact_ratio(hidden, dim)}
        if len(blocks) != len(m.blocks):
            kwargs["depth"] = len(blocks)
        moves: dict[str, str | None] = {f"blocks.{b}.{part}.": None for b in range(len(m.blocks))
                                        for parts in self.UNIT_PARTS.values() for part in parts}
        for k, pair in enumerate(blocks):
            for kind, unit in (("attn", pair.attn), ("ffn", pair.ffn)):
                for part in self.UNIT_PARTS[kind]:
                    moves[f"blocks.{self._block_of(unit)}.{part}."] = f"blocks.{k}.{part}."
        state = move_sublayers(self._slice(plan), moves)
        new = rebuild_from_state(m, base.timm_name, kwargs, state)
        if hasattr(m, "distilled_training"):
            new.distilled_training = m.distilled_training
        return new, new_config(base, kwargs, new, EQUIVALENT_CANDIDATES)

    def _slice(self, plan) -> dict[str, torch.Tensor]:
        """The source model's state dict with every kept site sliced as :meth:`channel_slices` declares
        (source key names; the tensors of removed units are dropped by :meth:`rebuild`), with the
        attention scale folded into q where the kept head dim differs."""
        m = self.model
        state = apply_rules(m, self.declared_slice_rules(plan.keep))
        kept = set(plan.kept_units(self.topology()))
        for b, blk in enumerate(m.blocks):
            if f"attn.{b}" in kept and blk.attn.head_dim != plan.head_dim(b):
                fold_q_scale(state, f"blocks.{b}.attn.qkv", len(plan.keep[f"attn.{b}"]),
                             (plan.head_dim(b) / blk.attn.head_dim) ** 0.5)
        return state


# ------------------------------------------------------------------------------------- family record
def vit_rules() -> Rules:
    """The rules of timm's VisionTransformer (one stage; attention width tied to embed_dim)."""
    return Rules("timm VisionTransformer", attn_tied_to_residual=True,
                 uniform_across_stages=frozenset({"heads", "attn", "ffn"}))


FAMILY = Family("timm_vit", "timm")  # built, saved and loaded as every timm model (upvit.models)
