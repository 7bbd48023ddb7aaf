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
from .slicing import apply_rules, fold_q_scale, linear, move_sublayers, vector
from .timm_common import base_config, exact_ratio, explicit_attention, new_config, rebuild_from_state, staged_unit_moves

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

    # ---------------------------------------------------------------- weights per channel (magnitude baseline)
    def channel_weights(self, site_key: str) -> list[tuple[torch.Tensor, int]]:
        """``(tensor, dim)`` pairs: index i along ``dim`` of each tensor is a weight carried by channel i."""
        m = self.model
        site = self.topology().site(site_key)
        out: list[tuple[torch.Tensor, int]] = []

        def add(t, dim):
            if isinstance(t, torch.Tensor):
                out.append((t.detach(), dim))

        if site.kind == "attn":
            attn = self.block(site.block).attn
            add(attn.qkv.weight.view(3, site.size, -1), 1)
            if attn.qkv.bias is not None:
                add(attn.qkv.bias.view(3, site.size), 1)
            add(attn.proj.weight, 1)
        elif site.kind == "ffn":
            mlp = self.block(site.block).mlp
            add(mlp.fc1.weight, 0)
            add(mlp.fc1.bias, 0)
            add(mlp.fc2.weight, 1)
        else:
            s, C = site.stage, site.size
            if s == 0:
                add(m.patch_embed.proj.weight, 0)
                add(m.patch_embed.proj.bias, 0)
                add(m.patch_embed.norm.weight, 0)
                add(m.patch_embed.norm.bias, 0)
            else:
                add(m.layers[s].downsample.reduction.weight, 0)
            for blk in m.layers[s].blocks:
                for norm in (blk.norm1, blk.norm2):
                    add(norm.weight, 0)
                    add(norm.bias, 0)
                add(blk.attn.qkv.weight, 1)
                add(blk.attn.proj.weight, 0)
                add(blk.attn.proj.bias, 0)
                add(blk.mlp.fc1.weight, 1)
                add(blk.mlp.fc2.weight, 0)
                add(blk.mlp.fc2.bias, 0)
            if s + 1 < len(m.layers):
                merge = m.layers[s + 1].downsample
                add(merge.norm.weight.view(4, C), 1)
                add(merge.norm.bias.view(4, C), 1)
                add(merge.reduction.weight.view(-1, 4, C), 2)
            else:
                add(m.norm.weight, 0)
                add(m.norm.bias, 0)
                add(m.head.fc.weight, 1)
        return out

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
        """The state dict with every kept site sliced, in source key names (removed units' tensors are
        copied whole and dropped by :meth:`rebuild`)."""
        m = self.model
        dev = next(m.parameters()).device
        kept = set(plan.kept_units(self.topology()))
        idx = lambda key: torch.tensor(plan.keep[key], dtype=torch.long, device=dev)  # noqa: E731
        rules: dict = {}
        E = [idx(f"res.{s}") for s in range(len(m.layers))]
        widths = [layer.blocks[0].norm1.normalized_shape[0] for layer in m.layers]
        rules["patch_embed.proj.weight"] = [(0, E[0])]
        if m.patch_embed.proj.bias is not None:
            rules["patch_embed.proj.bias"] = [(0, E[0])]
        vector(rules, "patch_embed.norm", m.patch_embed.norm, E[0])
        scales, biases = {}, {}
        for b, (s, i) in enumerate(self._where):
            layer = m.layers[s]
            if i == 0 and s > 0:
                four = torch.cat([E[s - 1] + k * widths[s - 1] for k in range(4)])
                vector(rules, f"layers.{s}.downsample.norm", layer.downsample.norm, four)
                linear(rules, f"layers.{s}.downsample.reduction", layer.downsample.reduction, E[s], four)
            blk, p = layer.blocks[i], f"layers.{s}.blocks.{i}"
            if f"attn.{b}" in kept:
                a_src = blk.attn.qkv.out_features // 3
                A = idx(f"attn.{b}")
                vector(rules, f"{p}.norm1", blk.norm1, E[s])
                linear(rules, f"{p}.attn.qkv", blk.attn.qkv, torch.cat([A, A + a_src, A + 2 * a_src]), E[s])
                linear(rules, f"{p}.attn.proj", blk.attn.proj, E[s], A)
                table = f"{p}.attn.relative_position_bias_table"
                rules[table] = []
                groups = (plan.bias_heads or {}).get(f"attn.{b}") or plan.heads[f"attn.{b}"]
                src = blk.attn.relative_position_bias_table.detach()
                biases[table] = torch.stack([src[:, g].mean(1) for g in groups], dim=1)
                old_hd, new_hd = a_src // blk.attn.num_heads, plan.head_dim_of(f"attn.{b}")
                if old_hd != new_hd:
                    scales[f"{p}.attn.qkv"] = (len(A), (new_hd / old_hd) ** 0.5)
            else:
                for key, _ in [*blk.norm1.state_dict().items()]:
                    rules[f"{p}.norm1.{key}"] = []
                for key in blk.attn.state_dict():
                    rules[f"{p}.attn.{key}"] = []
            if f"ffn.{b}" in kept:
                F = idx(f"ffn.{b}")
                vector(rules, f"{p}.norm2", blk.norm2, E[s])
                linear(rules, f"{p}.mlp.fc1", blk.mlp.fc1, F, E[s])
                linear(rules, f"{p}.mlp.fc2", blk.mlp.fc2, E[s], F)
            else:
                for key in blk.norm2.state_dict():
                    rules[f"{p}.norm2.{key}"] = []
                for key in blk.mlp.state_dict():
                    rules[f"{p}.mlp.{key}"] = []
        vector(rules, "norm", m.norm, E[-1])
        linear(rules, "head.fc", m.head.fc, None, E[-1])
        state = apply_rules(m, rules)
        state.update(biases)
        for prefix, (rows, factor) in scales.items():
            fold_q_scale(state, prefix, rows, factor)
        return state


# ------------------------------------------------------------------------------------- family record
FAMILY = Family("timm_swin", "timm")  # built, saved and loaded as every timm model (upvit.models)
