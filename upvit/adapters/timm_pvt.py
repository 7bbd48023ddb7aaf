"""Adapter for timm ``PyramidVisionTransformerV2`` (PVTv2, B0-B5 and the linear-SR ``_li`` variant).

Topology: one residual site per stage (``res.{s}``, the widths ``embed_dims``), and per block
(numbered over all stages) ``attn.{b}`` and ``ffn.{b}``. The stream between units is ``[B, N, C]``
tokens with ``info["feat_size"] = (H, W)`` (timm's own block input). The stage transition into stage
s > 0 (stage s-1's final norm, reshape to NCHW, the strided overlapping conv patch embedding
``downsample.proj`` and its LayerNorm) is the first thing the first unit of stage s runs; ``end``
applies the last stage's norm, the mean over the map and the head.

Masks (hooks on timm's modules, only inside :meth:`TimmPVTv2Adapter.masking`):

* ``res.{s}``: residual channel c of stage s disappears from the whole stage: the output channel of
  the conv patch embedding (``patch_embed`` for stage 0, ``stages[s].downsample`` otherwise) and its
  LayerNorm, every block's norm1/norm2, the input columns of ``q`` and ``kv`` and the sr conv's
  input channel, the output rows of ``proj`` and ``fc2``, the stage's final norm, and the next
  stage's patch-embedding input channel (or the head's input column). Every LayerNorm of the stage
  is renormalised over the kept channels. **The sr conv's output channels** (and the LayerNorm after
  it, and the ``kv`` input columns it feeds) have the stage width by timm's constructor
  (``Conv2d(dim, dim)``); upvit ties them to the stage's residual index: removing residual channel
  c also removes sr output channel c and renormalises that LayerNorm over the kept channels. Where
  ``sr_ratio == 1``, ``kv`` reads the residual stream directly.
* ``attn.{b}``: dim d of q (``q`` row d) and of k and v (``kv`` rows d and A + d) is zeroed, which
  removes ``proj`` input column d; the scale stays ``head_dim ** -0.5`` of the original model.
* ``ffn.{b}``: unit j is fc1 row j, depthwise-conv channel j and fc2 column j together
  (docs/method.md section 6: the depthwise conv belongs to the FFN component); since the conv is
  depthwise, this equals zeroing unit j after the activation.

Surgery rebuilds through ``timm.create_model(name, embed_dims=[...], num_heads=[...],
mlp_ratios=[...])``: widths, heads and FFN ratios are free per stage. timm 1.0.31's ``Attention`` has
no ``head_dim`` argument (``q: Linear(dim, dim)``, output reshaped to ``[B, N, dim]``), so a stage's
attention width equals its residual width (:class:`~upvit.topology.Rules` ``attn_tied_to_residual``):
how many attention dims a block keeps follows the kept residual width, while *which* dims are kept is
still chosen by their own scores. Where the kept per-head dim differs from the original, the ratio
``sqrt(new_head_dim / old_head_dim)`` is folded into ``q`` (fused and explicit attention then agree
with the masked original). timm's ``pvt_v2_b0`` is ``pvt_v2_b1`` at half width with the same heads:
B1 pruned to ``embed_dims (32, 64, 160, 256)`` and FFN widths ``(256, 512, 640, 1024)`` reports
``timm_equivalent == "pvt_v2_b0"``.

Depth pruning: removed units give per-stage ``depths``; kept units are re-paired into ordinary blocks
(new block k of a stage = its k-th kept attention with its k-th kept FFN). Every block of a stage has
the same sr ratio, so a block may leave from any position.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UpvitError
from ..topology import Rules, Topology
from .base import Adapter, Masks, Stream
from .family import Family
from .hooks import HookMasking, norm_hook, scale_hook, zero_hook
from .slicing import ChannelSlice, Declaration, apply_rules, fold_q_scale, move_sublayers
from .timm_common import base_config, exact_ratio, explicit_attention, new_config, rebuild_from_state, staged_unit_moves

EQUIVALENT_CANDIDATES = ["pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"]
TITLE = "timm PyramidVisionTransformerV2"  # how messages name the family


def _pvt_classes():
    from .._compat import import_timm

    import_timm()
    from timm.models.pvt_v2 import Attention, Block, MlpWithDepthwiseConv, OverlapPatchEmbed, PyramidVisionTransformerV2

    return PyramidVisionTransformerV2, Block, Attention, MlpWithDepthwiseConv, OverlapPatchEmbed


def is_timm_pvt(model: nn.Module) -> bool:
    try:
        PVT = _pvt_classes()[0]
    except ImportError:
        return False
    return type(model) is PVT


class TimmPVTv2Adapter(HookMasking, Adapter):
    family = "timm_pvt_v2"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        _, Block, Attention, Mlp, PatchEmbed = _pvt_classes()
        problems = []
        if model.global_pool != "avg" or not isinstance(model.head, nn.Linear):
            problems.append("no average-pooled linear classifier head (num_classes=0 or global_pool='')")
        if type(model.patch_embed) is not PatchEmbed or not isinstance(model.patch_embed.norm, nn.LayerNorm):
            problems.append("a patch embedding that is not OverlapPatchEmbed with LayerNorm")
        for s, stage in enumerate(model.stages):
            if (s == 0) != (stage.downsample is None) or (
                    s > 0 and (type(stage.downsample) is not PatchEmbed
                               or not isinstance(stage.downsample.norm, nn.LayerNorm))):
                problems.append(f"stage {s} downsampling is {type(stage.downsample).__name__}")
            if not isinstance(stage.norm, nn.LayerNorm):
                problems.append(f"stage {s} final norm is not LayerNorm")
            for blk in stage.blocks:
                if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
                    problems.append(f"stage {s} has a {type(blk).__name__} block")
                elif not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm) or (
                        blk.attn.norm is not None and not isinstance(blk.attn.norm, nn.LayerNorm)):
                    problems.append(f"stage {s} norms are not LayerNorm")
        if problems:
            raise UpvitError(f"this {TITLE} variant is not supported yet: " + "; ".join(problems[:3]))
        self._where: list[tuple[int, int]] = [(s, i) for s, stage in enumerate(model.stages)
                                              for i in range(len(stage.blocks))]

    # ---------------------------------------------------------------- structure
    def build_topology(self) -> Topology:
        m = self.model
        widths = [stage.norm.normalized_shape[0] for stage in m.stages]
        blocks = [self.block(b) for b in range(len(self._where))]
        rules = Rules(TITLE, attn_tied_to_residual=True, notes=(
            "timm 1.0.31 has no head_dim argument: a stage's attention width equals its residual width, so the "
            "count of kept attention dims follows the residual width (which dims are kept is chosen by their scores)",
            "sr conv output channels (and their LayerNorm, and kv's input columns) follow the stage's residual "
            "channels",
        ))
        return Topology.staged(self.family, widths, [len(stage.blocks) for stage in m.stages],
                               [b.attn.num_heads for b in blocks], [b.attn.q.out_features for b in blocks],
                               [b.mlp.fc1.out_features for b in blocks], rules)

    def block(self, b: int) -> nn.Module:
        s, i = self._where[b]
        return self.model.stages[s].blocks[i]

    def input_size(self) -> tuple[int, ...] | None:
        """The recorded input size; else timm's default resolution (PVTv2 runs at any size)."""
        size = super().input_size()
        if size is not None:
            return size
        default = (getattr(self.model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        return (self.model.patch_embed.proj.in_channels, *default[1:])

    def explicit_attention(self):
        return explicit_attention(self.model)

    # ---------------------------------------------------------------- weights per channel (declared once)
    def channel_slices(self) -> dict[str, list[ChannelSlice]]:
        """The state-dict slices that carry channel c of each site (magnitude, Taylor and surgery derive
        from it).

        ``attn.b``: q row d (+ bias), k and v rows d (``kv`` rows d and A + d, + biases), proj column d.
        ``ffn.b``: fc1 row j (+ bias), depthwise-conv channel j (kernel + bias: "param"), fc2 column j.
        ``res.s``: the output channel of the stage's conv patch embedding and its LayerNorm, every block's
        norms, q/kv input columns, proj/fc2 output rows, the sr conv's input channel ("in") and output
        channel ("out": tied to the residual index, see the module doc) with its bias and LayerNorm, the
        stage norm, and the next stage's patch-embedding input channel (or the head's column)."""
        m = self.model
        d = Declaration(m.state_dict(), [site.key for site in self.topology().sites])
        for s in range(len(m.stages)):
            res = f"res.{s}"
            embed = "patch_embed" if s == 0 else f"stages.{s}.downsample"
            d.linear(f"{embed}.proj", out=res, inp=f"res.{s - 1}" if s > 0 else None)
            d.vector(res, f"{embed}.norm")
            for b, (stage, i) in enumerate(self._where):
                if stage != s:
                    continue
                p, attn, ffn = f"stages.{s}.blocks.{i}", f"attn.{b}", f"ffn.{b}"
                d.vector(res, f"{p}.norm1")
                d.vector(res, f"{p}.norm2")
                d.linear(f"{p}.attn.q", out=attn, inp=res)
                d.linear(f"{p}.attn.kv", out=attn, inp=res, out_copies=2)  # k and v rows d
                d.linear(f"{p}.attn.proj", out=res, inp=attn)
                d.linear(f"{p}.attn.sr", out=res, inp=res)  # output channels tied to the residual index
                d.vector(res, f"{p}.attn.norm")
                d.linear(f"{p}.mlp.fc1", out=ffn, inp=res)
                d.vector(ffn, f"{p}.mlp.dwconv")  # depthwise: channel j's own kernel and bias
                d.linear(f"{p}.mlp.fc2", out=res, inp=ffn)
            d.vector(res, f"stages.{s}.norm")
        d.linear("head", inp=f"res.{len(m.stages) - 1}")
        return d.slices

    def untouched_keys(self) -> set[str]:
        """The classifier's bias (one per class, no channel of any site)."""
        return {"head.bias"} & set(self.model.state_dict())

    # ---------------------------------------------------------------- masking
    def install_hooks(self, masks: Masks, skip: frozenset[str]) -> list:
        m = self.model
        handles = []

        for s, stage in enumerate(m.stages):
            res = masks.get(f"res.{s}")
            if res is None:
                continue
            # the conv patch embedding's removed output channel: its LayerNorm renormalised, output 0 there
            # (the next conv then sees a zero input channel, which is the sliced conv's input)
            embed = m.patch_embed if s == 0 else stage.downsample
            handles.append(embed.norm.register_forward_hook(norm_hook(res)))
            for blk in stage.blocks:
                norms = [blk.norm1, blk.norm2] + ([blk.attn.norm] if blk.attn.norm is not None else [])
                for mod in norms:  # attn.norm: the sr conv's output channels follow the residual index
                    handles.append(mod.register_forward_hook(norm_hook(res)))
                for mod in (blk.drop_path1, blk.drop_path2):
                    handles.append(mod.register_forward_hook(scale_hook(res)))
            handles.append(stage.norm.register_forward_hook(norm_hook(res)))
        for b, (s, i) in enumerate(self._where):
            blk = m.stages[s].blocks[i]
            attn_mask = masks.get(f"attn.{b}")
            if attn_mask is not None:
                handles.append(blk.attn.q.register_forward_hook(scale_hook(attn_mask)))
                handles.append(blk.attn.kv.register_forward_hook(scale_hook(torch.cat([attn_mask, attn_mask], -1))))
            ffn_mask = masks.get(f"ffn.{b}")
            if ffn_mask is not None:
                handles.append(blk.mlp.act.register_forward_hook(scale_hook(ffn_mask)))
            if f"attn.{b}" in skip:
                handles.append(blk.drop_path1.register_forward_hook(zero_hook))
            if f"ffn.{b}" in skip:
                handles.append(blk.drop_path2.register_forward_hook(zero_hook))
        return handles

    # -------------------------------------------------------- unit-by-unit forward (timm's stage split per branch)
    def begin(self, inputs: torch.Tensor) -> Stream:
        x = self.model.patch_embed(inputs)  # [B, H, W, C]
        B, H, W, C = x.shape
        return Stream(x.reshape(B, -1, C), info={"feat_size": (H, W)})

    def _to_map(self, stage: nn.Module, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        """A stage's final norm and the NCHW map timm's stage returns."""
        x = stage.norm(x)
        return x.reshape(x.shape[0], feat_size[0], feat_size[1], -1).permute(0, 3, 1, 2).contiguous()

    def run(self, unit: str, stream: Stream) -> Stream:
        kind, _, b = unit.partition(".")
        s, i = self._where[int(b)]
        stage = self.model.stages[s]
        blk = stage.blocks[i]
        x, info = stream.x, stream.info
        if kind == "attn":
            if i == 0 and s > 0:  # the stage transition starts the stage's first unit
                x = stage.downsample(self._to_map(self.model.stages[s - 1], x, info["feat_size"]))
                B, H, W, C = x.shape
                x, info = x.reshape(B, -1, C), {**info, "feat_size": (H, W)}
            return Stream(x + blk.drop_path1(blk.attn(blk.norm1(x), info["feat_size"])), stream.batch, info)
        return stream.replace(x + blk.drop_path2(blk.mlp(blk.norm2(x), info["feat_size"])))

    def end(self, stream: Stream) -> torch.Tensor:
        m = self.model
        return m.forward_head(self._to_map(m.stages[-1], stream.x, stream.info["feat_size"])).unsqueeze(1)

    # ---------------------------------------------------------------- fast path
    def ffn_rank1(self, unit: str, stream: Stream) -> tuple[Stream, torch.Tensor, torch.Tensor] | None:
        """Removing unit j subtracts ``acts[..., j] * fc2.weight[:, j]``: the depthwise conv keeps
        channel j on its own, so everything of unit j before fc2 is in ``acts[..., j]``."""
        if self.model.training:
            return None
        blk = self.block(int(unit.split(".")[1]))
        mlp, x = blk.mlp, stream.x
        H, W = stream.info["feat_size"]
        h = mlp.fc1(blk.norm2(x))
        B, N, C = h.shape
        h = mlp.dwconv(mlp.relu(h.transpose(1, 2).view(B, C, H, W)))
        acts = mlp.drop(mlp.act(h.flatten(2).transpose(1, 2)))
        out = x + blk.drop_path2(mlp.drop(mlp.fc2(acts)))
        return stream.replace(out), acts, mlp.fc2.weight.t()

    # ================================================================ surgery
    def check_plan(self, plan) -> None:
        """The family's rules, with the attention-width tie stated for PVTv2 first."""
        topo = self.topology()
        for site in topo.sites_of("attn"):
            if site.key not in plan.keep or f"res.{site.stage}" not in plan.keep:
                continue
            a, r = len(plan.keep[site.key]), len(plan.keep[f"res.{site.stage}"])
            if a != r:
                raise UpvitError(f"{TITLE} (timm 1.0.31, no head_dim argument) makes a stage's attention width its "
                                 f"residual width, so the count of kept attention dims follows the residual width: "
                                 f"plan keeps {a} dims of {site.key} but {r} channels of res.{site.stage}; keep {r} "
                                 "(which dims is still chosen by their own scores)")
        super().check_plan(plan)

    # the sub-layers of a timm PVTv2 Block that belong to each unit
    UNIT_PARTS = {"attn": ("norm1", "attn"), "ffn": ("norm2", "mlp")}

    def rebuild(self, plan):
        """A new timm PyramidVisionTransformerV2 at the plan's shape (see the module doc), weights sliced.

        With removed units, ``depths`` gives each stage's re-paired blocks: new block k of a stage takes
        ``norm1``/``attn`` (sr conv included) of the stage's k-th kept attention and ``norm2``/``mlp``
        (depthwise conv included) of its k-th kept FFN. Every block of a stage has the same sr ratio, so
        a block's position inside its stage changes nothing."""
        topo = self.topology()
        blocks = self.check_units(plan.kept_units(topo))
        m = self.model
        base = base_config(m, {"in_chans": m.patch_embed.proj.in_channels, "num_classes": m.num_classes})
        firsts = [next(p for p in blocks if p.stage == s) for s in range(topo.num_stages)]
        depths = [sum(1 for p in blocks if p.stage == s) for s in range(topo.num_stages)]
        widths = [len(plan.keep[f"res.{s}"]) for s in range(topo.num_stages)]
        heads = [plan.heads_of(p.attn) for p in firsts]
        ratios = [exact_ratio(len(plan.keep[p.ffn]), w) for p, w in zip(firsts, widths)]
        kwargs = {**base.timm_kwargs, "embed_dims": widths, "num_heads": heads, "mlp_ratios": ratios}
        if depths != [len(stage.blocks) for stage in m.stages]:
            kwargs["depths"] = depths
        moves = staged_unit_moves(blocks, self._where, self.UNIT_PARTS, "stages")
        state = move_sublayers(self._slice(plan), moves)
        new = rebuild_from_state(m, base.timm_name, kwargs, state, init_kwargs={})
        return new, new_config(base, kwargs, new, EQUIVALENT_CANDIDATES)

    def _slice(self, plan) -> dict[str, torch.Tensor]:
        """The state dict sliced as :meth:`channel_slices` declares, in source key names (removed units'
        tensors are dropped by :meth:`rebuild`), with the attention scale folded into ``q`` where a kept
        attention's head dim differs."""
        m = self.model
        state = apply_rules(m, self.declared_slice_rules(plan.keep))
        kept = set(plan.kept_units(self.topology()))
        for b, (s, i) in enumerate(self._where):
            attn = m.stages[s].blocks[i].attn
            if f"attn.{b}" in kept:
                old_hd, new_hd = attn.q.out_features // attn.num_heads, plan.head_dim_of(f"attn.{b}")
                if old_hd != new_hd:
                    fold_q_scale(state, f"stages.{s}.blocks.{i}.attn.q", len(plan.keep[f"attn.{b}"]),
                                 (new_hd / old_hd) ** 0.5)
        return state


# ------------------------------------------------------------------------------------- family record
FAMILY = Family("timm_pvt_v2", "timm")  # built, saved and loaded as every timm model (upvit.models)
