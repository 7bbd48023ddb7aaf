"""Adapter for timm ``SwinTransformer`` (v1): windowed attention, shifted windows, patch merging.

Topology: one residual site per stage (``res.{s}``, widths C, 2C, 4C, 8C), and per block (numbered
over all stages) ``attn.{b}`` and ``ffn.{b}``. The stream between units is timm's own ``[B, H, W, C]``
layout. The stage transition (``PatchMerging``: 2x2 neighbours concatenated to 4C channels,
LayerNorm over 4C, linear 4C -> 2C) is the first thing the first unit of a stage runs.

Masks (hooks on timm's modules, only inside :meth:`TimmSwinAdapter.masking`):

* ``res.{s}``: removing residual channel c of stage s removes it everywhere in that stage: the patch
  embedding output and its LayerNorm (stage 0) or the patch-merging reduction output (s > 0), every
  block's norm1/norm2 (renormalised over the kept channels), the branch outputs, the final norm
  (last stage), and the four copies of c entering the next stage's merging LayerNorm, which is
  renormalised over the 4(C-1) remaining inputs.
* ``attn.{b}``: dim d of q, k and v is zeroed in every window; the scale stays ``head_dim ** -0.5``
  of the original model and the relative-position bias is untouched.
* ``ffn.{b}``: hidden unit j is zeroed after the activation.

Surgery rebuilds through ``timm.create_model(name, embed_dim=C, num_heads=[...], head_dim=[...],
mlp_ratio=[...])``. timm 1.0.31 cannot take a per-stage ``embed_dim`` (``num_features`` is computed
as ``embed_dim * 2 ** (stages - 1)`` before a list is handled), so the stage widths must keep the
ratio 1:2:4:8 (:class:`~upvit.topology.Rules` ``residual_ratios``); heads, head dim and FFN width
are free per stage. Merged heads need one relative-position-bias column: by default the mean of the
merged heads' columns (``Plan.bias_heads`` lists other choices, e.g. the best head's column).

Depth pruning: removed units give per-stage ``depths``. timm shifts the windows of block i of a
stage when i is odd, so :meth:`TimmSwinAdapter.check_units` refuses a removal that would move an
attention to a position of another shift (blocks inside a shifted stage leave in pairs; the last
block of a stage, or a hybrid ending there, can leave alone).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UpvitError
from ..topology import Rules, Topology
from .base import Adapter, Masks, Stream, per_window
from .family import Family
from .hooks import HookMasking, norm_hook, scale_hook, zero_hook
from .slicing import ChannelSlice, Declaration, apply_rules, fold_q_scale, move_sublayers
from .timm_common import (
    base_config,
    exact_ratio,
    explicit_attention,
    new_config,
    output_divergence,
    rebuild_from_state,
    staged_unit_moves,
)

EQUIVALENT_CANDIDATES = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
                         "swin_base_patch4_window7_224", "swin_base_patch4_window12_384"]


def _swin_classes():
    from .._compat import import_timm

    import_timm()
    from timm.layers import Mlp
    from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention

    return SwinTransformer, SwinTransformerBlock, WindowAttention, PatchMerging, Mlp


def is_timm_swin(model: nn.Module) -> bool:
    try:
        SwinTransformer = _swin_classes()[0]
    except ImportError:
        return False
    return type(model) is SwinTransformer


def _four(mask: torch.Tensor) -> torch.Tensor:
    """A stage's residual mask for patch merging's 4C inputs (the 2x2 neighbours concatenated)."""
    return torch.cat([mask] * 4, dim=-1)


class TimmSwinAdapter(HookMasking, Adapter):
    family = "timm_swin"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        _, Block, WindowAttention, PatchMerging, Mlp = _swin_classes()
        problems = []
        if not isinstance(model.patch_embed.norm, nn.LayerNorm):
            problems.append("a patch embedding without LayerNorm")
        if not isinstance(model.norm, nn.LayerNorm):
            problems.append("a final norm that is not LayerNorm")
        for s, layer in enumerate(model.layers):
            if s > 0 and type(layer.downsample) is not PatchMerging:
                problems.append(f"stage {s} downsampling is {type(layer.downsample).__name__}")
            for blk in layer.blocks:
                if type(blk) is not Block or type(blk.attn) is not WindowAttention:
                    problems.append(f"stage {s} has a {type(blk).__name__} block")
                elif type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
                    problems.append(f"stage {s} FFN is {type(blk.mlp).__name__}")
                elif not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm):
                    problems.append(f"stage {s} norms are not LayerNorm")
        # a headless backbone (num_classes=0) outputs its pooled embedding: scored by 1 - cos, not KL
        self.divergence = output_divergence(model, problems)
        if problems:
            raise UpvitError("this timm SwinTransformer variant is not supported yet: " + "; ".join(problems[:3]))
        self._where: list[tuple[int, int]] = [(s, i) for s, layer in enumerate(model.layers)
                                              for i in range(len(layer.blocks))]

    # ---------------------------------------------------------------- structure
    def build_topology(self) -> Topology:
        m = self.model
        widths = [layer.blocks[0].norm1.normalized_shape[0] for layer in m.layers]
        blocks = [m.layers[s].blocks[i] for s, i in self._where]
        rules = Rules("timm SwinTransformer", residual_ratios=tuple(w / widths[0] for w in widths), head_bias=True,
                      notes=("stage widths keep the ratio 1:2:4:8 (timm takes one embed_dim)",))
        return Topology.staged(self.family, widths, [len(layer.blocks) for layer in m.layers],
                               [b.attn.num_heads for b in blocks], [b.attn.qkv.out_features // 3 for b in blocks],
                               [b.mlp.fc1.out_features for b in blocks], rules)

    def block(self, b: int) -> nn.Module:
        s, i = self._where[b]
        return self.model.layers[s].blocks[i]

    def input_size(self) -> tuple[int, ...] | None:
        size = super().input_size()
        if size is not None:
            return size
        pe = self.model.patch_embed
        return (pe.proj.in_channels, *pe.img_size)

    def explicit_attention(self):
        return explicit_attention(self.model)

    # ---------------------------------------------------------------- weights per channel (declared once)
    def channel_slices(self) -> dict[str, list[ChannelSlice]]:
        """The state-dict slices that carry channel c of each site (magnitude, Taylor and surgery derive
        from it). ``res.s``: the patch embedding's output and its LayerNorm (s = 0) or the patch-merging
        reduction's output row (s > 0), every block's norm1/norm2, the qkv/fc1 input columns, the
        proj/fc2 output rows, and the four copies of c entering the next stage's merging LayerNorm and
        reduction (or the final norm and the head's column). ``attn.b``: q, k and v rows d (and biases),
        proj column d. ``ffn.b``: fc1 row j and bias, fc2 column j."""
        m = self.model
        d = Declaration(m.state_dict(), [site.key for site in self.topology().sites])
        d.linear("patch_embed.proj", out="res.0")
        d.vector("res.0", "patch_embed.norm")
        for b, (s, i) in enumerate(self._where):
            res, p = f"res.{s}", f"layers.{s}.blocks.{i}"
            if i == 0 and s > 0:  # patch merging: LayerNorm over the 2x2 neighbours (4 copies), reduction 4C -> C
                prev, merge = f"res.{s - 1}", f"layers.{s}.downsample"
                d.vector(prev, f"{merge}.norm", copies=4)
                d.linear(f"{merge}.reduction", out=res, inp=prev, in_copies=4)
            d.vector(res, f"{p}.norm1")
            d.vector(res, f"{p}.norm2")
            d.linear(f"{p}.attn.qkv", out=f"attn.{b}", inp=res, out_copies=3)
            d.linear(f"{p}.attn.proj", out=res, inp=f"attn.{b}")
            d.linear(f"{p}.mlp.fc1", out=f"ffn.{b}", inp=res)
            d.linear(f"{p}.mlp.fc2", out=res, inp=f"ffn.{b}")
        last = f"res.{len(m.layers) - 1}"
        d.vector(last, "norm")
        d.linear("head.fc", inp=last)
        return d.slices

    def untouched_keys(self) -> set[str]:
        """The classifier's bias, and each attention's relative-position bias table (one column per head, no
        channel: surgery merges its columns per new head after slicing, :meth:`_slice`)."""
        state = self.model.state_dict()
        return {key for key in state if key == "head.fc.bias" or key.endswith(".attn.relative_position_bias_table")}

    # ---------------------------------------------------------------- masking
    def install_hooks(self, masks: Masks, skip: frozenset[str]) -> list:
        m = self.model
        handles = []

        for s, layer in enumerate(m.layers):
            res = masks.get(f"res.{s}")
            if res is not None:
                if s == 0:
                    handles.append(m.patch_embed.norm.register_forward_hook(norm_hook(res)))
                else:
                    handles.append(layer.downsample.register_forward_hook(scale_hook(res)))
                for blk in layer.blocks:
                    for mod in (blk.norm1, blk.norm2):
                        handles.append(mod.register_forward_hook(norm_hook(res)))
                    for mod in (blk.drop_path1, blk.drop_path2):
                        handles.append(mod.register_forward_hook(scale_hook(res)))
                if s + 1 < len(m.layers):
                    handles.append(m.layers[s + 1].downsample.norm.register_forward_hook(norm_hook(_four(res))))
                else:
                    handles.append(m.norm.register_forward_hook(norm_hook(res)))
        for b, (s, i) in enumerate(self._where):
            blk = m.layers[s].blocks[i]
            attn_mask = masks.get(f"attn.{b}")
            if attn_mask is not None:
                def qkv_hook(module, inputs, out, mask=attn_mask):
                    shape = out.shape  # [windows * B, N, 3 * A]: each sample's windows are contiguous
                    mm = per_window(mask, shape[0])
                    mm = mm if mm.dim() == 1 else mm.view(shape[0], 1, 1, -1)
                    return (out.view(*shape[:-1], 3, shape[-1] // 3) * mm).view(shape)
                handles.append(blk.attn.qkv.register_forward_hook(qkv_hook))
            ffn_mask = masks.get(f"ffn.{b}")
            if ffn_mask is not None:
                handles.append(blk.mlp.act.register_forward_hook(scale_hook(ffn_mask)))
            if f"attn.{b}" in skip:
                handles.append(blk.drop_path1.register_forward_hook(zero_hook))
            if f"ffn.{b}" in skip:
                handles.append(blk.drop_path2.register_forward_hook(zero_hook))
        return handles

    # ---------------------------------------------------------------- unit-by-unit forward (timm's block split in two)
    def begin(self, inputs: torch.Tensor) -> Stream:
        return Stream(self.model.patch_embed(inputs))  # [B, H, W, C]

    def run(self, unit: str, stream: Stream) -> Stream:
        kind, _, b = unit.partition(".")
        s, i = self._where[int(b)]
        layer = self.model.layers[s]
        blk = layer.blocks[i]
        x = stream.x
        if kind == "attn":
            if i == 0 and s > 0:  # the stage transition starts the stage's first unit
                x = layer.downsample(x)
            return stream.replace(x + blk.drop_path1(blk._attn(blk.norm1(x))))
        B, H, W, C = x.shape
        y = x.reshape(B, -1, C)
        y = y + blk.drop_path2(blk.mlp(blk.norm2(y)))
        return stream.replace(y.reshape(B, H, W, C))

    def end(self, stream: Stream) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(stream.x)).unsqueeze(1)

    # ---------------------------------------------------------------- fast path
    def ffn_rank1(self, unit: str, stream: Stream) -> tuple[Stream, torch.Tensor, torch.Tensor] | None:
        blk = self.block(int(unit.split(".")[1]))
        if self.model.training:
            return None
        x = stream.x
        B, H, W, C = x.shape
        y = x.reshape(B, -1, C)
        mlp = blk.mlp
        acts = mlp.drop1(mlp.act(mlp.fc1(blk.norm2(y))))
        out = y + blk.drop_path2(mlp.drop2(mlp.fc2(acts)))
        return (stream.replace(out.reshape(B, H, W, C)), acts.reshape(B, H, W, -1), mlp.fc2.weight.t())

    # ================================================================ depth
    def check_units(self, kept):
        """Kept units pair into blocks (:meth:`Topology.rebuilt_blocks`) and every remaining attention
        keeps its window shift: timm shifts block i of a stage by ``window // 2`` when i is odd (0 where
        the map is no larger than the window), so a block's attention may only move to a position of
        the same shift. Removing the last block of a stage, or a hybrid whose attention is the
        stage's last, always works; inside a shifted stage, blocks and hybrids leave in pairs."""
        blocks = super().check_units(kept)
        position: dict[int, int] = {}
        for pair in blocks:
            k = position.get(pair.stage, 0)
            position[pair.stage] = k + 1
            b = int(pair.attn.split(".")[1])
            s, i = self._where[b]
            have, get = self.model.layers[s].blocks[i].shift_size, self.model.layers[s].blocks[k].shift_size
            if tuple(have) != tuple(get):
                raise UpvitError(f"timm SwinTransformer shifts the windows of every second block of a stage: "
                                 f"{pair.attn} (block {i} of stage {s}, shift {tuple(have)}) would become block {k} "
                                 f"(shift {tuple(get)}); remove blocks or hybrid blocks in pairs within a stage, or "
                                 "the stage's last block")
        return blocks

    # ================================================================ surgery
    # the sub-layers of a timm SwinTransformerBlock that belong to each unit
    UNIT_PARTS = {"attn": ("norm1", "attn"), "ffn": ("norm2", "mlp")}

    def rebuild(self, plan):
        """A new timm SwinTransformer at the plan's shape (see the module doc), weights sliced from this one.

        With removed units, ``depths`` gives each stage's re-paired blocks: new block k of a stage takes
        ``norm1``/``attn`` (with its relative-position table) of the stage's k-th kept attention and
        ``norm2``/``mlp`` of its k-th kept FFN; timm rebuilds the shift, the attention mask and the
        drop-path rates from the kwargs (:meth:`check_units` guarantees the shift is unchanged)."""
        topo = self.topology()
        blocks = self.check_units(plan.kept_units(topo))
        m = self.model
        base = base_config(m, {"img_size": list(m.patch_embed.img_size), "in_chans": m.patch_embed.proj.in_channels,
                               "num_classes": m.num_classes})
        firsts = [next(p for p in blocks if p.stage == s) for s in range(topo.num_stages)]
        depths = [sum(1 for p in blocks if p.stage == s) for s in range(topo.num_stages)]
        widths = [len(plan.keep[f"res.{s}"]) for s in range(topo.num_stages)]
        heads = [plan.heads_of(p.attn) for p in firsts]
        head_dims = [plan.head_dim_of(p.attn) for p in firsts]
        ratios = [exact_ratio(len(plan.keep[p.ffn]), w) for p, w in zip(firsts, widths)]
        kwargs = {**base.timm_kwargs, "embed_dim": widths[0], "num_heads": heads, "head_dim": head_dims,
                  "mlp_ratio": ratios}
        if depths != [len(layer.blocks) for layer in m.layers]:
            kwargs["depths"] = depths
        moves = staged_unit_moves(blocks, self._where, self.UNIT_PARTS, "layers")
        state = move_sublayers(self._slice(plan), moves)
        new = rebuild_from_state(m, base.timm_name, kwargs, state)
        return new, new_config(base, kwargs, new, EQUIVALENT_CANDIDATES)

    def _slice(self, plan) -> dict[str, torch.Tensor]:
        """The state dict sliced as :meth:`channel_slices` declares, in source key names (removed units'
        tensors are dropped by :meth:`rebuild`), then the two steps that are not channel slicing, for each
        kept attention: its relative-position bias table gets one column per new head (the mean of the
        merged heads' columns, or those ``plan.bias_heads`` names), and the attention scale is folded into
        q where the kept head dim differs."""
        m = self.model
        state = apply_rules(m, self.declared_slice_rules(plan.keep))
        kept = set(plan.kept_units(self.topology()))
        for b, (s, i) in enumerate(self._where):
            if f"attn.{b}" not in kept:
                continue
            attn, p = m.layers[s].blocks[i].attn, f"layers.{s}.blocks.{i}.attn"
            groups = (plan.bias_heads or {}).get(f"attn.{b}") or plan.heads[f"attn.{b}"]
            src = attn.relative_position_bias_table.detach()
            state[f"{p}.relative_position_bias_table"] = torch.stack([src[:, g].mean(1) for g in groups], dim=1)
            old_hd, new_hd = attn.qkv.out_features // 3 // attn.num_heads, plan.head_dim_of(f"attn.{b}")
            if old_hd != new_hd:
                fold_q_scale(state, f"{p}.qkv", len(plan.keep[f"attn.{b}"]), (new_hd / old_hd) ** 0.5)
        return state


# ------------------------------------------------------------------------------------- family record
FAMILY = Family("timm_swin", "timm")  # built, saved and loaded as every timm model (upvit.models)
