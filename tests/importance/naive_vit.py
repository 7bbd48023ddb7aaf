"""A naive, independent reference for the KL score: slice the channel out of the weights and run a
hand-written functional ViT (explicit per-head attention, no timm modules, no masks), teacher and
student both re-run for every channel. Covers timm ViT/DeiT (class token first, optional distillation
token, position embedding over all tokens, optional LayerScale, qkv bias)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sliced_params(model: torch.nn.Module, key: str | None = None, channel: int | None = None,
                  dtype: torch.dtype = torch.float64):
    """(params, heads): a state dict with one channel genuinely removed, and per block the list of
    attention dims (into the sliced q/k/v) that make up each head."""
    p = {k: v.detach().to(dtype, copy=True) for k, v in model.state_dict().items()}
    depth = len(model.blocks)
    nh, hd = model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
    heads = [[list(range(h * hd, (h + 1) * hd)) for h in range(nh)] for _ in range(depth)]
    if key is None:
        return p, heads
    D = model.embed_dim
    if key in ("res.0", "embed"):
        keep = torch.tensor([i for i in range(D) if i != channel])
        for k, v in list(p.items()):
            if k == "patch_embed.proj.weight" or k == "patch_embed.proj.bias":
                p[k] = v[keep]
            elif k in ("cls_token", "dist_token", "pos_embed"):
                p[k] = v[..., keep]
            elif k.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1.gamma", "ls2.gamma",
                             "attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")) \
                    or k in ("norm.weight", "norm.bias"):
                p[k] = v[keep]
            if k.endswith(("attn.qkv.weight", "mlp.fc1.weight")) or k in ("head.weight", "head_dist.weight"):
                p[k] = p[k][:, keep]
        return p, heads
    comp, b = key.split(".")
    b = int(b)
    pre = f"blocks.{b}."
    if comp == "attn":
        A = model.blocks[b].attn.attn_dim
        keep = torch.tensor([i for i in range(A) if i != channel])
        rows = torch.cat([keep, keep + A, keep + 2 * A])
        p[pre + "attn.qkv.weight"] = p[pre + "attn.qkv.weight"][rows]
        if pre + "attn.qkv.bias" in p:
            p[pre + "attn.qkv.bias"] = p[pre + "attn.qkv.bias"][rows]
        p[pre + "attn.proj.weight"] = p[pre + "attn.proj.weight"][:, keep]
        new_heads, pos = [], 0
        for dims in heads[b]:
            n = len([d for d in dims if d != channel])
            new_heads.append(list(range(pos, pos + n)))
            pos += n
        heads[b] = new_heads
    else:
        H = model.blocks[b].mlp.fc1.out_features
        keep = torch.tensor([i for i in range(H) if i != channel])
        p[pre + "mlp.fc1.weight"] = p[pre + "mlp.fc1.weight"][keep]
        p[pre + "mlp.fc1.bias"] = p[pre + "mlp.fc1.bias"][keep]
        p[pre + "mlp.fc2.weight"] = p[pre + "mlp.fc2.weight"][:, keep]
    return p, heads


def functional_vit(p: dict, heads: list, x: torch.Tensor, patch: int, scale: float, eps: float = 1e-6,
                   skip: frozenset[str] = frozenset()) -> torch.Tensor:
    """Eval-mode logits of a (possibly sliced) timm ViT/DeiT given its state dict, in the params' dtype;
    the sub-layers named in ``skip`` (``attn.b``, ``ffn.b``) are left out (the stream passes unchanged)."""
    x = x.to(p["pos_embed"].dtype)
    t = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    B, D = t.shape[0], t.shape[-1]
    prefix = [p["cls_token"].expand(B, 1, D)]
    if "dist_token" in p:
        prefix.append(p["dist_token"].expand(B, 1, D))
    t = torch.cat([*prefix, t], 1) + p["pos_embed"]
    for b in range(len(heads)):
        pre = f"blocks.{b}."
        y = F.layer_norm(t, (D,), p[pre + "norm1.weight"], p[pre + "norm1.bias"], eps)
        qkv = y @ p[pre + "attn.qkv.weight"].T + p.get(pre + "attn.qkv.bias", 0)
        A = qkv.shape[-1] // 3
        q, k, v = qkv[..., :A], qkv[..., A:2 * A], qkv[..., 2 * A:]
        sizes = {len(dims) for dims in heads[b]}
        if len(sizes) == 1:  # equal heads: all at once, [B, heads, T, head_dim]
            nh, hd = len(heads[b]), sizes.pop()
            qh, kh, vh = (z.reshape(B, -1, nh, hd).transpose(1, 2) for z in (q, k, v))
            att = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, -1)
            o = (att @ vh).transpose(1, 2).reshape(B, -1, nh * hd)
        else:  # one head lost a dimension: head by head
            outs = []
            for dims in heads[b]:
                att = torch.softmax((q[..., dims] @ k[..., dims].transpose(1, 2)) * scale, -1)
                outs.append(att @ v[..., dims])
            o = torch.cat(outs, -1)
        o = o @ p[pre + "attn.proj.weight"].T + p[pre + "attn.proj.bias"]
        if f"attn.{b}" not in skip:
            t = t + o * p.get(pre + "ls1.gamma", 1.0)
        y = F.layer_norm(t, (D,), p[pre + "norm2.weight"], p[pre + "norm2.bias"], eps)
        hdn = F.gelu(y @ p[pre + "mlp.fc1.weight"].T + p[pre + "mlp.fc1.bias"])
        if f"ffn.{b}" not in skip:
            t = t + (hdn @ p[pre + "mlp.fc2.weight"].T + p[pre + "mlp.fc2.bias"]) * p.get(pre + "ls2.gamma", 1.0)
    t = F.layer_norm(t, (D,), p["norm.weight"], p["norm.bias"], eps)
    if "head.weight" not in p:  # a headless model (num_classes=0, class-token pooling): the embedding
        return t[:, 0]
    logits = t[:, 0] @ p["head.weight"].T + p["head.bias"]
    if "head_dist.weight" in p:
        logits = (logits + t[:, 1] @ p["head_dist.weight"].T + p["head_dist.bias"]) / 2
    return logits


def naive_score(model: torch.nn.Module, images: torch.Tensor, key: str, channel: int,
                dtype: torch.dtype = torch.float64) -> float:
    """sum_i KL(q_i || p_i): teacher and genuinely sliced student re-run from scratch (KL in float64)."""
    patch = model.patch_embed.patch_size[0]
    scale = model.blocks[0].attn.head_dim ** -0.5
    with torch.no_grad():
        logq = torch.log_softmax(functional_vit(*sliced_params(model, dtype=dtype), images, patch, scale).double(), -1)
        logp = torch.log_softmax(functional_vit(*sliced_params(model, key, channel, dtype), images, patch,
                                                scale).double(), -1)
    return float((logq.exp() * (logq - logp)).sum())


def naive_skip_score(model: torch.nn.Module, images: torch.Tensor, units, dtype: torch.dtype = torch.float64) -> float:
    """sum_i KL(q_i || p_i) with p from the model with the sub-layers ``units`` left out: teacher and
    skipped model both re-run from scratch by the functional ViT (KL in float64)."""
    patch = model.patch_embed.patch_size[0]
    scale = model.blocks[0].attn.head_dim ** -0.5
    p, heads = sliced_params(model, dtype=dtype)
    with torch.no_grad():
        logq = torch.log_softmax(functional_vit(p, heads, images, patch, scale).double(), -1)
        logp = torch.log_softmax(functional_vit(p, heads, images, patch, scale, skip=frozenset(units)).double(), -1)
    return float((logq.exp() * (logq - logp)).sum())
