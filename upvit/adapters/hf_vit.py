"""Adapter for Hugging Face ViT / DeiT classifiers: ``ViTForImageClassification``,
``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher``.

A pre-norm ViT like timm's: one residual stream ``res.0``, per layer ``attn.{b}`` (q/k/v dims) and
``ffn.{b}`` (MLP hidden units); the stream between units is ``[B, N, D]`` (class token, DeiT's
distillation token, patches). The head reads the class token (and, with the teacher head, the
distillation token), so ``head_tokens`` lets the last FFN run on those tokens only.

Masks (hooks on transformers' modules, only inside :meth:`HFViTAdapter.masking`): ``res.0``: the
embeddings' output (patch projection, class/distillation tokens, position embeddings) is multiplied
by the mask, every ``layernorm_before``/``layernorm_after`` and the final ``layernorm`` are
recomputed over the kept channels, and the ``o_proj``/``fc2`` outputs are zeroed at removed
channels; ``attn.{b}``: dim d of q, k, v is zeroed (the scale stays the original
``head_dim ** -0.5``); ``ffn.{b}``: hidden unit j is zeroed after the activation.

Surgery rebuilds the same class from the source config with ``hidden_size``,
``num_attention_heads`` and ``intermediate_size`` changed. HF ViT/DeiT (5.x) read an optional
``head_dim`` config key (``getattr(config, "head_dim", hidden // heads)``); it is an undeclared key,
yet ``save_pretrained`` writes it and a plain ``from_pretrained`` honours it (tested in
``tests/adapters/test_hf.py``), so here the attention width may differ from the hidden size: the
key is set only when the kept head size differs from ``hidden_size / num_attention_heads``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UpvitError
from ..tasks import Task
from ..topology import Rules, Topology
from .base import Adapter, Masks, Stream
from .family import Family
from .hf_common import eager_attention, hf_config, rebuild_from_config
from .hooks import HookMasking, norm_hook, scale_hook, zero_hook
from .slicing import ChannelSlice, Declaration, apply_rules, fold_q_scale, q_scale

CLASSES = ("ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")


def is_hf_vit(model: nn.Module) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return any(type(model) is getattr(transformers, name) for name in CLASSES)


class HFViTAdapter(HookMasking, Adapter):
    family = "hf_vit"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        self.prefix = "vit" if name.startswith("ViT") else "deit"
        self.base = getattr(model, self.prefix)
        self.teacher_head = name.endswith("WithTeacher")
        self.heads = ["cls_classifier", "distillation_classifier"] if self.teacher_head else ["classifier"]
        if any(not isinstance(getattr(model, h), nn.Linear) for h in self.heads):
            raise UpvitError(f"this {name} has no linear classifier (num_labels=0): it cannot be pruned yet")
        self.num_tokens = 2 if self.prefix == "deit" else 1  # tokens before the patches

    # ---------------------------------------------------------------- structure
    def build_topology(self) -> Topology:
        cfg, layers = self.model.config, self.base.layers
        attn = layers[0].attention.q_proj.out_features
        rules = Rules(f"transformers {type(self.model).__name__}",
                      uniform_across_stages=frozenset({"heads", "attn", "ffn"}), depth_pruning=False,
                      notes=("attention width may differ from hidden_size through the head_dim config key",))
        n = len(layers)
        return Topology.single_stage(self.family, cfg.hidden_size, [cfg.num_attention_heads] * n, [attn] * n,
                                     [cfg.intermediate_size] * n, rules, head_tokens=len(self.heads))

    def input_size(self) -> tuple[int, ...] | None:
        size = super().input_size()
        if size is not None:
            return size
        cfg = self.model.config
        img = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size, cfg.image_size)
        return (cfg.num_channels, *img)

    def channel_slices(self) -> dict[str, list[ChannelSlice]]:
        """The state-dict slices that carry channel c of each site (magnitude, Taylor and surgery derive
        from it). ``res.0``: the patch projection's output, the class/distillation/mask tokens and position
        embeddings, every LayerNorm, the q/k/v/fc1/classifier input columns, the o_proj/fc2 output rows.
        ``attn.b``: q, k and v rows d (and biases), o_proj column d. ``ffn.b``: fc1 row j and bias, fc2
        column j."""
        p0, res = self.prefix, "res.0"
        d = Declaration(self.model.state_dict(), [site.key for site in self.topology().sites])
        d.linear(f"{p0}.embeddings.patch_embeddings.projection", out=res)
        for name in ("cls_token", "distillation_token", "position_embeddings", "mask_token"):
            d.claim(res, f"{p0}.embeddings.{name}", -1, "param")
        for b in range(len(self.base.layers)):
            d.vector(res, f"{p0}.layers.{b}.layernorm_before")
            d.vector(res, f"{p0}.layers.{b}.layernorm_after")
        d.vector(res, f"{p0}.layernorm")
        for b in range(len(self.base.layers)):
            p, attn, ffn = f"{p0}.layers.{b}", f"attn.{b}", f"ffn.{b}"
            for name in ("q_proj", "k_proj", "v_proj"):
                d.linear(f"{p}.attention.{name}", out=attn, inp=res)
            d.linear(f"{p}.mlp.fc1", out=ffn, inp=res)
            d.linear(f"{p}.attention.o_proj", out=res, inp=attn)
            d.linear(f"{p}.mlp.fc2", out=res, inp=ffn)
        for h in self.heads:
            d.linear(h, inp=res)
        return d.slices

    def untouched_keys(self) -> set[str]:
        """The classifier biases: one per class, no channel of any site."""
        return {f"{h}.bias" for h in self.heads} & set(self.model.state_dict())

    def _norms(self) -> list[nn.LayerNorm]:
        norms = [n for layer in self.base.layers for n in (layer.layernorm_before, layer.layernorm_after)]
        return norms + [self.base.layernorm]

    def explicit_attention(self):
        return eager_attention(self.model)

    # ---------------------------------------------------------------- masking
    def install_hooks(self, masks: Masks, skip: frozenset[str]) -> list:
        handles = []
        res = masks.get("res.0")
        if res is not None:
            handles.append(self.base.embeddings.register_forward_hook(scale_hook(res)))
            for norm in self._norms():
                handles.append(norm.register_forward_hook(norm_hook(res)))
            for layer in self.base.layers:
                handles.append(layer.attention.o_proj.register_forward_hook(scale_hook(res)))
                handles.append(layer.mlp.fc2.register_forward_hook(scale_hook(res)))
        for b, layer in enumerate(self.base.layers):
            attn = masks.get(f"attn.{b}")
            if attn is not None:
                for lin in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj):
                    handles.append(lin.register_forward_hook(scale_hook(attn)))
            ffn = masks.get(f"ffn.{b}")
            if ffn is not None:
                handles.append(layer.mlp.activation_fn.register_forward_hook(scale_hook(ffn)))
            if f"attn.{b}" in skip:
                handles.append(layer.attention.o_proj.register_forward_hook(zero_hook))
            if f"ffn.{b}" in skip:
                handles.append(layer.mlp.fc2.register_forward_hook(zero_hook))
        return handles

    # ---------------------------------------------------------------- unit-by-unit forward (ViTLayer split in two)
    def begin(self, inputs: torch.Tensor) -> Stream:
        return Stream(self.base.embeddings(inputs))

    def run(self, unit: str, stream: Stream) -> Stream:
        kind, _, b = unit.partition(".")
        layer, x = self.base.layers[int(b)], stream.x
        if kind == "attn":
            out, _ = layer.attention(layer.layernorm_before(x), None)
            return stream.replace(x + layer.dropout(out))
        return stream.replace(x + layer.dropout(layer.mlp(layer.layernorm_after(x))))

    def end(self, stream: Stream) -> torch.Tensor:
        seq = self.base.layernorm(stream.x)
        logits = [getattr(self.model, h)(seq[:, i]) for i, h in enumerate(self.heads)]
        return (sum(logits) / len(logits)).unsqueeze(1)

    def ffn_rank1(self, unit: str, stream: Stream) -> tuple[Stream, torch.Tensor, torch.Tensor] | None:
        if self.model.training:
            return None
        layer, x = self.base.layers[int(unit.split(".")[1])], stream.x
        mlp = layer.mlp
        acts = mlp.activation_fn(mlp.fc1(layer.layernorm_after(x)))
        return stream.replace(x + layer.dropout(mlp.fc2(acts))), acts, mlp.fc2.weight.t()

    # ================================================================ surgery
    def rebuild(self, plan):
        topo = self.topology()
        if plan.units is not None and len(plan.units) != len(topo.units):
            raise UpvitError(f"{type(self.model).__name__} is rebuilt with all its layers here: depth pruning is not "
                             "supported for this family yet")
        dim, heads, head_dim = plan.embed_dim, plan.num_heads, plan.head_dim(0)
        old_hd = self.base.layers[0].attention.head_dim
        state = self._slice(plan)
        factor = q_scale(old_hd, head_dim)
        if factor is not None:
            for b in range(len(self.base.layers)):
                fold_q_scale(state, f"{self.prefix}.layers.{b}.attention.q_proj", len(plan.keep[f"attn.{b}"]), factor)
        changes = {"hidden_size": dim, "num_attention_heads": heads, "intermediate_size": plan.ffn_dim(0)}
        drop = ()
        if head_dim * heads != dim:
            changes["head_dim"] = head_dim  # honoured by ViT/DeiT and by a plain reload (see the module doc)
        else:
            drop = ("head_dim",)
        new = rebuild_from_config(self.model, changes, state, drop_keys=drop)
        return new, hf_config(self.model, new, FAMILY)

    def _slice(self, plan) -> dict[str, torch.Tensor]:
        """The state dict sliced as :meth:`channel_slices` declares."""
        return apply_rules(self.model, self.declared_slice_rules(plan.keep), type(self.model).__name__)


# ------------------------------------------------------------------------------------- family record
def _data_config(model: nn.Module) -> dict:
    """The image size and channels of the config; HF ViT image processors default to mean = std = 0.5."""
    cfg = model.config
    size = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size, cfg.image_size)
    c = int(cfg.num_channels)
    return {"task": str(Task.IMAGE_CLASSIFICATION), "input_size": [c, int(size[0]), int(size[1])],
            "mean": [0.5] * c, "std": [0.5] * c, "crop_pct": 1.0, "interpolation": "bilinear"}


# ``head_dim``: read by ViT/DeiT although their configs do not declare it (the free attention width)
FAMILY = Family("hf_vit", "hf", classes=dict.fromkeys(CLASSES, Task.IMAGE_CLASSIFICATION),
                model_types={"vit": "ViTForImageClassification", "deit": "DeiTForImageClassification"},
                config_keys=("head_dim",), data_config=_data_config)
