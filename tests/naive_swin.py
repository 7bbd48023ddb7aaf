"""A naive, independent reference for the KL score of a timm Swin: slice the channel out of the weights
and run a hand-written functional Swin (explicit windows, cyclic shifts, per-head attention with the
relative-position bias, patch merging), teacher and student both re-run for every channel.

Only geometry is read from the model (patch size, per-block window and shift, relative-position index
and shift mask buffers, which do not depend on channels); every weight comes from the sliced state
dict, so a residual channel removal genuinely shrinks every LayerNorm of its stage (and the next
stage's merging LayerNorm over 4C) instead of being masked."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _blocks(model):
    return [(s, i, blk) for s, layer in enumerate(model.layers) for i, blk in enumerate(layer.blocks)]


def sliced_swin_params(model, key: str | None = None, channel: int | None = None, dtype=torch.float64):
    """(params, heads): the state dict with one channel removed, and per block the list of q/k/v row
    indices (into the sliced qkv) that make up each head."""
    p = {k: v.detach().to(dtype, copy=True) for k, v in model.state_dict().items()}
    heads = []
    for _, _, blk in _blocks(model):
        nh, a = blk.attn.num_heads, blk.attn.qkv.out_features // 3
        hd = a // nh
        heads.append([list(range(h * hd, (h + 1) * hd)) for h in range(nh)])
    if key is None:
        return p, heads
    kind, b = key.split(".")
    b = int(b)

    def drop(name, dim, idx_remove, width):
        keep = torch.tensor([i for i in range(width) if i not in idx_remove])
        p[name] = p[name].index_select(dim, keep)

    if kind == "res":
        s, C = b, model.layers[b].blocks[0].norm1.normalized_shape[0]
        if s == 0:
            for n in ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
                      "patch_embed.norm.bias"):
                drop(n, 0, {channel}, C)
        else:
            drop(f"layers.{s}.downsample.reduction.weight", 0, {channel}, C)
        for i in range(len(model.layers[s].blocks)):
            pre = f"layers.{s}.blocks.{i}."
            for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.weight", "attn.proj.bias",
                      "mlp.fc2.weight", "mlp.fc2.bias"):
                drop(pre + n, 0, {channel}, C)
            drop(pre + "attn.qkv.weight", 1, {channel}, C)
            drop(pre + "mlp.fc1.weight", 1, {channel}, C)
        if s + 1 < len(model.layers):
            four = {k * C + channel for k in range(4)}
            drop(f"layers.{s + 1}.downsample.norm.weight", 0, four, 4 * C)
            drop(f"layers.{s + 1}.downsample.norm.bias", 0, four, 4 * C)
            drop(f"layers.{s + 1}.downsample.reduction.weight", 1, four, 4 * C)
        else:
            drop("norm.weight", 0, {channel}, C)
            drop("norm.bias", 0, {channel}, C)
            drop("head.fc.weight", 1, {channel}, C)
        return p, heads
    s, i, blk = _blocks(model)[b]
    pre = f"layers.{s}.blocks.{i}."
    if kind == "attn":
        A = blk.attn.qkv.out_features // 3
        drop(pre + "attn.qkv.weight", 0, {channel, channel + A, channel + 2 * A}, 3 * A)
        if pre + "attn.qkv.bias" in p:
            drop(pre + "attn.qkv.bias", 0, {channel, channel + A, channel + 2 * A}, 3 * A)
        drop(pre + "attn.proj.weight", 1, {channel}, A)
        new, pos = [], 0
        for dims in heads[b]:
            n = len([d for d in dims if d != channel])
            new.append(list(range(pos, pos + n)))
            pos += n
        heads[b] = new
    else:
        H = blk.mlp.fc1.out_features
        drop(pre + "mlp.fc1.weight", 0, {channel}, H)
        drop(pre + "mlp.fc1.bias", 0, {channel}, H)
        drop(pre + "mlp.fc2.weight", 1, {channel}, H)
    return p, heads


def _windows(x, wh, ww):
    B, H, W, C = x.shape
    return x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)


def _unwindows(w, wh, ww, B, H, W):
    C = w.shape[-1]
    return w.view(B, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def functional_swin(model, p, heads, images, skip=frozenset()):
    """Logits of the (sliced) Swin; the sub-layers named in ``skip`` (``attn.b``, ``ffn.b``) add nothing
    (a stage transition before a skipped attention still runs)."""
    eps = model.norm.eps
    x = images.to(p["norm.weight"].dtype)
    patch = model.patch_embed.patch_size
    x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch).permute(0, 2, 3, 1)
    x = F.layer_norm(x, x.shape[-1:], p["patch_embed.norm.weight"], p["patch_embed.norm.bias"], eps)
    for b, (s, i, blk) in enumerate(_blocks(model)):
        if i == 0 and s > 0:  # patch merging
            B, H, W, C = x.shape
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            B, H, W, C = x.shape
            x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
            pre = f"layers.{s}.downsample."
            x = F.layer_norm(x, x.shape[-1:], p[pre + "norm.weight"], p[pre + "norm.bias"], eps)
            x = x @ p[pre + "reduction.weight"].T
        pre = f"layers.{s}.blocks.{i}."
        B, H, W, C = x.shape
        wh, ww = blk.window_size
        sh, sw = blk.shift_size
        y = F.layer_norm(x, (C,), p[pre + "norm1.weight"], p[pre + "norm1.bias"], eps)
        if sh or sw:
            y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
        ph, pw = (wh - H % wh) % wh, (ww - W % ww) % ww
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        win = _windows(y, wh, ww)  # [B*nW, N, C]
        qkv = win @ p[pre + "attn.qkv.weight"].T + p[pre + "attn.qkv.bias"]
        A = qkv.shape[-1] // 3
        q, k, v = qkv[..., :A], qkv[..., A:2 * A], qkv[..., 2 * A:]
        scale = (blk.attn.qkv.out_features // 3 // blk.attn.num_heads) ** -0.5  # the original head dim's
        table = p[pre + "attn.relative_position_bias_table"]
        index = blk.attn.relative_position_index.view(-1)
        N = wh * ww
        mask = blk.attn_mask
        outs = []
        for h, dims in enumerate(heads[b]):
            d = torch.tensor(dims, dtype=torch.long)
            att = (q[..., d] * scale) @ k[..., d].transpose(-1, -2) + table[index, h].view(N, N)
            if mask is not None:
                nW = mask.shape[0]
                att = (att.view(-1, nW, N, N) + mask.to(att.dtype).unsqueeze(0)).view(-1, N, N)
            outs.append(att.softmax(-1) @ v[..., d])
        o = torch.cat(outs, -1) @ p[pre + "attn.proj.weight"].T + p[pre + "attn.proj.bias"]
        y = _unwindows(o, wh, ww, B, Hp, Wp)[:, :H, :W]
        if sh or sw:
            y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
        if f"attn.{b}" not in skip:
            x = x + y
        y = F.layer_norm(x, (C,), p[pre + "norm2.weight"], p[pre + "norm2.bias"], eps)
        y = F.gelu(y @ p[pre + "mlp.fc1.weight"].T + p[pre + "mlp.fc1.bias"])
        if f"ffn.{b}" not in skip:
            x = x + y @ p[pre + "mlp.fc2.weight"].T + p[pre + "mlp.fc2.bias"]
    x = F.layer_norm(x, x.shape[-1:], p["norm.weight"], p["norm.bias"], eps)
    return x.mean((1, 2)) @ p["head.fc.weight"].T + p["head.fc.bias"]


def naive_swin_score(model, images, key: str, channel: int, dtype=torch.float64) -> float:
    """sum_i KL(q_i || p_i): teacher and genuinely sliced student re-run from scratch (KL in float64)."""
    with torch.no_grad():
        logq = torch.log_softmax(functional_swin(model, *sliced_swin_params(model, dtype=dtype), images).double(), -1)
        logp = torch.log_softmax(functional_swin(model, *sliced_swin_params(model, key, channel, dtype),
                                                 images).double(), -1)
    return float((logq.exp() * (logq - logp)).sum())


def naive_swin_skip_score(model, images, units, dtype=torch.float64) -> float:
    """sum_i KL(q_i || p_i), p from the functional Swin with the sub-layers ``units`` left out."""
    p, heads = sliced_swin_params(model, dtype=dtype)
    with torch.no_grad():
        logq = torch.log_softmax(functional_swin(model, p, heads, images).double(), -1)
        logp = torch.log_softmax(functional_swin(model, p, heads, images, frozenset(units)).double(), -1)
    return float((logq.exp() * (logq - logp)).sum())
