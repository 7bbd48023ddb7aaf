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
from .base import Adapter, MaskProbe, Masks, broadcast_mask, masked_layer_norm


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

    @contextlib.contextmanager
    def probing(self):
        """Record a :class:`MaskProbe` at every point where :meth:`_install` would apply a mask (same
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
            probes.append(MaskProbe("embed", "layer_norm", out, norm_input=inputs[0], weight=module.weight, eps=module.eps))

        try:
            handles.append(m.patch_drop.register_forward_hook(scale("embed", leaf=True)))
            for norm in self.residual_norms():
                handles.append(norm.register_forward_hook(norm_hook))
            for b, blk in enumerate(m.blocks):
                handles.append(blk.attn.register_forward_hook(scale("embed")))
                handles.append(blk.mlp.register_forward_hook(scale("embed")))
                handles.append(blk.attn.qkv.register_forward_hook(scale(f"attn.{b}", groups=3)))
                handles.append(blk.mlp.act.register_forward_hook(act_hook(f"ffn.{b}")))
            yield probes
        finally:
            for h in handles:
                h.remove()

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

    def attn_removal_deltas(self, block: int, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Only the head holding a removed dim changes: its scores lose the rank-1 term q_j k_j^T, its
        value column j is zeroed, and the change of its output goes through its slice of ``proj``.
        Falls back to the masked forward for attention variants this does not model."""
        blk = self.model.blocks[block]
        attn = blk.attn
        plain = all(isinstance(getattr(attn, name, nn.Identity()), nn.Identity) for name in ("q_norm", "k_norm", "norm"))
        gamma = getattr(blk.ls1, "gamma", None)
        if (self.model.training or not plain or getattr(attn, "gate", None) is not None
                or (gamma is None and not isinstance(blk.ls1, nn.Identity))):
            return super().attn_removal_deltas(block, h, idx)
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

    def head(self, h: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_head(self.model.norm(h))
        if isinstance(out, (tuple, list)):  # distilled model in training mode
            out = (out[0] + out[1]) / 2
        return out


    # ================================================================ surgery: plan -> smaller timm model
    # timm's VisionTransformer builds every block with attn_dim == embed_dim (head_dim = embed_dim /
    # num_heads) and one mlp_ratio for all blocks, so a plan for it must be uniform with attn_dim == embed_dim.
    def check_plan(self, plan) -> None:
        """Refuse plans timm's VisionTransformer constructor cannot express, in one line."""
        attn = {len(a) for a in plan.keep_attn}
        ffn = {len(f) for f in plan.keep_ffn}
        if len(attn) > 1 or len(ffn) > 1:
            raise UpvitError("timm VisionTransformer needs the same attention and FFN width in every block: "
                             "keep the same number of dims in every block")
        if attn != {plan.embed_dim}:
            raise UpvitError(f"timm VisionTransformer ties the attention width to embed_dim, so attn_dim "
                             f"({attn.pop()}) must equal embed_dim ({plan.embed_dim}): leave attn_dim unset")

    def prune_config_kwargs(self, plan) -> dict:
        """timm constructor kwargs of the pruned shape (embed_dim, num_heads, an exact mlp_ratio)."""
        import math

        dim, hidden = plan.embed_dim, plan.ffn_dim(0)
        ratio = hidden / dim
        while int(dim * ratio) < hidden:  # float rounding: nudge up until timm's int(dim * ratio) is exact
            ratio = math.nextafter(ratio, math.inf)
        if int(dim * ratio) != hidden:
            raise UpvitError(f"no mlp_ratio gives {hidden} FFN units at embed_dim {dim} in timm")
        return {"embed_dim": dim, "num_heads": plan.num_heads, "mlp_ratio": ratio}

    def slice_state_dict(self, plan) -> dict[str, torch.Tensor]:
        """The original state dict sliced to ``plan`` (new tensors; the model is not modified).

        The attention scale is preserved: the pruned module uses ``new_head_dim ** -0.5`` (timm's rule,
        also what fused attention uses), so when the kept per-head dim differs from the original
        ``head_dim`` the ratio ``sqrt(new_head_dim / head_dim)`` is folded into the q rows of qkv
        (weight and bias). Logits then equal the masked original's for any attention backend.
        """
        m = self.model
        state = m.state_dict()
        dev = next(iter(state.values())).device
        E = torch.tensor(plan.keep_embed, dtype=torch.long, device=dev)
        rules: dict[str, list[tuple[int, torch.Tensor]]] = {}  # key -> [(dim, index), ...]

        def residual(prefix: str, module: nn.Module | None) -> None:  # LayerNorm or LayerScale over width D
            if module is None:
                return
            for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                rules[f"{prefix}.{name}"] = [(0, E)]

        def linear(prefix: str, module: nn.Linear, out_idx: torch.Tensor, in_idx: torch.Tensor) -> None:
            rules[f"{prefix}.weight"] = [(0, out_idx), (1, in_idx)]
            if module.bias is not None:
                rules[f"{prefix}.bias"] = [(0, out_idx)]

        for key in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            if getattr(m, key, None) is not None:
                rules[key] = [(-1, E)]
        rules["patch_embed.proj.weight"] = [(0, E)]
        if m.patch_embed.proj.bias is not None:
            rules["patch_embed.proj.bias"] = [(0, E)]
        for name in ("patch_embed.norm", "norm_pre", "norm", "fc_norm"):
            try:
                mod = m.get_submodule(name)
            except AttributeError:
                continue
            if not isinstance(mod, nn.Identity):
                residual(name, mod)
        for head in ("head", "head_dist"):
            mod = getattr(m, head, None)
            if isinstance(mod, nn.Linear):
                rules[f"{head}.weight"] = [(1, E)]
                if mod.bias is not None:
                    rules[f"{head}.bias"] = []
        scales: dict[str, float] = {}
        for b, blk in enumerate(m.blocks):
            p = f"blocks.{b}"
            a_src = self.attn_dim(b)
            A = torch.tensor(plan.keep_attn[b], dtype=torch.long, device=dev)
            QKV = torch.cat([A, A + a_src, A + 2 * a_src])
            F = torch.tensor(plan.keep_ffn[b], dtype=torch.long, device=dev)
            residual(f"{p}.norm1", blk.norm1)
            residual(f"{p}.norm2", blk.norm2)
            for ls in ("ls1", "ls2"):
                if not isinstance(getattr(blk, ls), nn.Identity):
                    residual(f"{p}.{ls}", getattr(blk, ls))
            linear(f"{p}.attn.qkv", blk.attn.qkv, QKV, E)
            linear(f"{p}.attn.proj", blk.attn.proj, E, A)
            linear(f"{p}.mlp.fc1", blk.mlp.fc1, F, E)
            linear(f"{p}.mlp.fc2", blk.mlp.fc2, E, F)
            old_hd, new_hd = self.head_dim(b), plan.head_dim(b)
            if old_hd != new_hd:
                scales[f"{p}.attn.qkv"] = (new_hd / old_hd) ** 0.5

        unknown = sorted(set(state) - set(rules))
        if unknown:
            raise UpvitError(f"surgery does not know how to slice {unknown[0]} of this timm model: "
                             "this variant is not supported for pruning yet")
        out = {}
        for key, tensor in state.items():
            t = tensor.detach()
            for dim, index in rules[key]:
                t = t.index_select(dim, index)  # a copy
            out[key] = t if rules[key] else t.clone()
        for prefix, c in scales.items():
            n = len(plan.keep_attn[int(prefix.split(".")[1])])
            for suffix in ("weight", "bias"):
                if f"{prefix}.{suffix}" in out:
                    out[f"{prefix}.{suffix}"][:n] *= c  # q rows only: q . k * new_scale == q . k * old_scale
        return out

    def build_pruned(self, plan) -> nn.Module:
        """A new model of the same timm architecture at the plan's shape, weights sliced from this one.

        Built through ``timm.create_model`` (via ``create_timm_model``) so it is a genuine timm model;
        it carries ``upvit_config`` (a ModelConfig with the new kwargs and ``timm_equivalent``)."""
        import copy

        from ..models import ModelConfig, create_timm_model, default_data_config

        self.check_plan(plan)
        m = self.model
        base = getattr(m, "upvit_config", None)
        if base is None:
            arch = (getattr(m, "pretrained_cfg", None) or {}).get("architecture")
            if not arch:
                raise UpvitError("this timm model carries neither an upvit config nor a timm architecture name: "
                                 "load it with upvit.load_model('timm:NAME,...') so it can be rebuilt")
            pe = m.patch_embed
            base = ModelConfig(timm_name=arch, timm_kwargs={"img_size": list(pe.img_size), "in_chans": pe.proj.in_channels,
                                                            "num_classes": m.num_classes},
                               data_config=default_data_config(m))
        kwargs = {**base.timm_kwargs, **self.prune_config_kwargs(plan)}
        # built on the meta device (no memory, no init), then the sliced tensors are assigned
        new = create_timm_model(base.timm_name, {**kwargs, "device": "meta", "weight_init": "skip"})
        state = self.slice_state_dict(plan)
        expected = new.state_dict()
        if set(expected) != set(state):
            missing = sorted(set(expected) ^ set(state))
            raise UpvitError(f"the rebuilt timm model and the sliced weights disagree on {missing[0]}: "
                             "this variant is not supported for pruning yet")
        for key, tensor in state.items():
            if expected[key].shape != tensor.shape:
                raise UpvitError(f"sliced {key} has shape {tuple(tensor.shape)}, the rebuilt model expects "
                                 f"{tuple(expected[key].shape)}: this variant is not supported for pruning yet")
        new.load_state_dict(state, strict=True, assign=True)
        left = [k for k, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
        if left:
            raise UpvitError(f"the rebuilt timm model has {left[0]} outside its state dict: this variant is not "
                             "supported for pruning yet")
        for name, mod in m.named_modules():  # keep the attention backend choice (fused or not)
            if hasattr(mod, "fused_attn"):
                target = new.get_submodule(name)
                target.fused_attn = mod.fused_attn
        new.train(m.training)
        if hasattr(m, "distilled_training"):
            new.distilled_training = m.distilled_training
        config = copy.deepcopy(base)
        config.timm_kwargs = kwargs
        config.timm_equivalent, equivalent_kwargs = timm_equivalent(new, kwargs, base.timm_name)
        config.extra = dict(config.extra)
        if equivalent_kwargs:
            config.extra["timm_equivalent_kwargs"] = equivalent_kwargs
        else:
            config.extra.pop("timm_equivalent_kwargs", None)
        new.upvit_config = config
        return new


# ==================================================================== surgery helpers
_EQUIVALENT_CANDIDATES = [
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
    "vit_small_patch32_224", "vit_base_patch32_224", "vit_large_patch32_224",
    "deit_base_patch16_384", "vit_tiny_patch16_384", "vit_small_patch16_384", "vit_base_patch16_384",
]
# kwargs that do not change the architecture and are passed on to the candidate; any other kwarg
# beyond the shape ones makes the model non-standard (no equivalent reported)
_PASS_KWARGS = ("img_size", "in_chans", "num_classes")
_SHAPE_KWARGS = ("embed_dim", "num_heads", "mlp_ratio", "depth", "patch_size", "drop_rate", "drop_path_rate",
                 "attn_drop_rate", "proj_drop_rate", "pos_drop_rate")


def _signature(model: nn.Module) -> tuple:
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    blk = model.blocks[0]
    return (type(model), shapes, model.global_pool, model.num_prefix_tokens, model.no_embed_class,
            type(blk.mlp.act), getattr(blk.norm1, "eps", None), getattr(model, "dynamic_img_size", False))


_SIGNATURES: dict[tuple[str, str], tuple | None] = {}  # (name, kwargs as JSON) -> signature, built once


def _candidate_signature(name: str, passed_json: str) -> tuple | None:
    """Signature of ``create_model(name, **passed)`` built on the meta device; None if it cannot be built."""
    import json

    from ..models import create_timm_model

    if (name, passed_json) not in _SIGNATURES:
        try:
            cand = create_timm_model(name, {**json.loads(passed_json), "device": "meta", "weight_init": "skip"})
            _SIGNATURES[name, passed_json] = _signature(cand)
        except Exception:  # an unknown or incompatible candidate is simply not equivalent
            _SIGNATURES[name, passed_json] = None
    return _SIGNATURES[name, passed_json]


def timm_equivalent(model: nn.Module, kwargs: dict, source_name: str) -> tuple[str | None, dict]:
    """``(name, kwargs)`` of a registered timm architecture whose ``create_model(name, **kwargs)`` has
    exactly this model's state-dict shapes and structure, or ``(None, {})``. Candidates are built on
    the meta device (no memory, no init). ``kwargs`` holds only img_size/in_chans/num_classes overrides
    that differ from the candidate's defaults (empty for standard 224px ImageNet models)."""
    if set(kwargs) - set(_PASS_KWARGS) - set(_SHAPE_KWARGS):
        return None, {}
    import json
    import re

    passed = {k: kwargs[k] for k in _PASS_KWARGS if k in kwargs}
    prefix = source_name.split("_")[0]
    names = [source_name] + sorted(_EQUIVALENT_CANDIDATES, key=lambda n: n.split("_")[0] != prefix)
    patch = model.patch_embed.patch_size[0]
    distilled = hasattr(model, "head_dist")
    sig = _signature(model)
    for name in dict.fromkeys(names):
        found = re.search(r"patch(\d+)", name)
        if (found and int(found.group(1)) != patch) or ("distilled" in name) != distilled:
            continue  # cheap filter before building anything
        if _candidate_signature(name, json.dumps(passed, sort_keys=True)) == sig:
            if passed and _candidate_signature(name, "{}") == sig:
                passed = {}
            return name, passed
    return None, {}


register("timm_vit", is_timm_vit, TimmViTAdapter)
