"""A naive, independent reference for the KL score of a timm PVTv2: slice the channel out of the weights and
run a hand-written functional PVTv2 (convs with F.conv2d, explicit per-head attention on q and kv, the
spatial-reduction conv and its LayerNorm, the depthwise conv with F.conv2d(groups=...)), teacher and
student both re-run for every channel.

Only geometry is read from the model (conv strides/paddings, sr ratios, the linear-SR flag, LayerNorm
eps); every weight comes from the sliced state dict. A residual channel c of stage s is removed from
the patch-embedding conv's output and its LayerNorm, every norm of the stage, q/kv input columns,
proj/fc2 output rows, the sr conv's input AND output channels with the sr LayerNorm (upvit ties the
sr output channels to the residual index), the stage norm, and the next stage's patch-embedding
conv input (or the head's column), so every LayerNorm genuinely shrinks."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _blocks(model):
    return [(s, i, blk) for s, stage in enumerate(model.stages) for i, blk in enumerate(stage.blocks)]


def sliced_pvt_params(model, key: str | None = None, channel: int | None = None, dtype=torch.float64):
    """(params, heads): the state dict with one channel removed, and per block the list of q/k/v dims
    (indices into the sliced q / each half of the sliced kv) that make up each head."""
    p = {k: v.detach().to(dtype, copy=True) for k, v in model.state_dict().items()}
    heads = []
    for _, _, blk in _blocks(model):
        nh, a = blk.attn.num_heads, blk.attn.q.out_features
        hd = a // nh
        heads.append([list(range(h * hd, (h + 1) * hd)) for h in range(nh)])
    if key is None:
        return p, heads
    kind, n = key.split(".")
    n = int(n)

    def drop(name, dim, remove, width):
        if name not in p:
            return
        assert p[name].shape[dim] == width, (name, p[name].shape, dim, width)
        keep = torch.tensor([i for i in range(width) if i not in remove])
        p[name] = p[name].index_select(dim, keep)

    if kind == "res":
        s, C = n, model.stages[n].norm.normalized_shape[0]
        embed = "patch_embed" if s == 0 else f"stages.{s}.downsample"
        for name in ("proj.weight", "proj.bias", "norm.weight", "norm.bias"):
            drop(f"{embed}.{name}", 0, {channel}, C)
        for i in range(len(model.stages[s].blocks)):
            pre = f"stages.{s}.blocks.{i}."
            for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.weight",
                         "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias", "attn.sr.weight", "attn.sr.bias",
                         "attn.norm.weight", "attn.norm.bias"):
                drop(pre + name, 0, {channel}, C)
            for name in ("attn.q.weight", "attn.kv.weight", "mlp.fc1.weight", "attn.sr.weight"):
                drop(pre + name, 1, {channel}, C)
        drop(f"stages.{s}.norm.weight", 0, {channel}, C)
        drop(f"stages.{s}.norm.bias", 0, {channel}, C)
        if s + 1 < len(model.stages):
            drop(f"stages.{s + 1}.downsample.proj.weight", 1, {channel}, C)
        else:
            drop("head.weight", 1, {channel}, C)
        return p, heads
    s, i, blk = _blocks(model)[n]
    pre = f"stages.{s}.blocks.{i}."
    if kind == "attn":
        A = blk.attn.q.out_features
        drop(pre + "attn.q.weight", 0, {channel}, A)
        drop(pre + "attn.q.bias", 0, {channel}, A)
        drop(pre + "attn.kv.weight", 0, {channel, channel + A}, 2 * A)
        drop(pre + "attn.kv.bias", 0, {channel, channel + A}, 2 * A)
        drop(pre + "attn.proj.weight", 1, {channel}, A)
        new, pos = [], 0
        for dims in heads[n]:
            k = len([d for d in dims if d != channel])
            new.append(list(range(pos, pos + k)))
            pos += k
        heads[n] = new
    else:
        H = blk.mlp.fc1.out_features
        drop(pre + "mlp.fc1.weight", 0, {channel}, H)
        drop(pre + "mlp.fc1.bias", 0, {channel}, H)
        drop(pre + "mlp.dwconv.weight", 0, {channel}, H)
        drop(pre + "mlp.dwconv.bias", 0, {channel}, H)
        drop(pre + "mlp.fc2.weight", 1, {channel}, H)
    return p, heads


def _conv(x, p, prefix, conv, groups=1):
    return F.conv2d(x, p[f"{prefix}.weight"], p.get(f"{prefix}.bias"), stride=conv.stride, padding=conv.padding,
                    groups=groups)


def _ln(x, p, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], p[f"{prefix}.weight"], p[f"{prefix}.bias"], eps)


def _linear(x, p, prefix):
    return x @ p[f"{prefix}.weight"].T + p[f"{prefix}.bias"]


def functional_pvt(model, p, heads, images):
    x = images.to(p["head.weight"].dtype)
    B = x.shape[0]
    tokens = None
    b = 0
    for s, stage in enumerate(model.stages):
        if s == 0:
            embed, pre = model.patch_embed, "patch_embed"
        else:
            embed, pre = stage.downsample, f"stages.{s}.downsample"
            x = tokens.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # noqa: F821 (H, W from the previous stage)
        x = _conv(x, p, f"{pre}.proj", embed.proj).permute(0, 2, 3, 1)  # NHWC
        x = _ln(x, p, f"{pre}.norm", embed.norm.eps)
        _, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        for i, blk in enumerate(stage.blocks):
            pre = f"stages.{s}.blocks.{i}."
            attn = blk.attn
            y = _ln(x, p, pre + "norm1", blk.norm1.eps)
            q = _linear(y, p, pre + "attn.q")
            src = y
            if attn.pool is not None:  # linear SR: 7x7 average pool, 1x1 conv, LayerNorm, GELU
                m = y.transpose(1, 2).reshape(B, -1, H, W)
                m = _conv(F.adaptive_avg_pool2d(m, 7), p, pre + "attn.sr", attn.sr)
                src = F.gelu(_ln(m.flatten(2).transpose(1, 2), p, pre + "attn.norm", attn.norm.eps))
            elif attn.sr is not None:
                m = _conv(y.transpose(1, 2).reshape(B, -1, H, W), p, pre + "attn.sr", attn.sr)
                src = _ln(m.flatten(2).transpose(1, 2), p, pre + "attn.norm", attn.norm.eps)
            kv = _linear(src, p, pre + "attn.kv")
            A = kv.shape[-1] // 2
            k, v = kv[..., :A], kv[..., A:]
            scale = (attn.q.out_features // attn.num_heads) ** -0.5  # the original head dim's
            outs = []
            for dims in heads[b]:
                d = torch.tensor(dims, dtype=torch.long)
                att = (q[..., d] * scale) @ k[..., d].transpose(-1, -2)
                outs.append(att.softmax(-1) @ v[..., d])
            x = x + _linear(torch.cat(outs, -1), p, pre + "attn.proj")
            y = _ln(x, p, pre + "norm2", blk.norm2.eps)
            h = _linear(y, p, pre + "mlp.fc1")
            h = h.transpose(1, 2).reshape(B, -1, H, W)
            if not isinstance(blk.mlp.relu, torch.nn.Identity):
                h = F.relu(h)
            h = _conv(h, p, pre + "mlp.dwconv", blk.mlp.dwconv, groups=h.shape[1])
            h = F.gelu(h.flatten(2).transpose(1, 2))
            x = x + _linear(h, p, pre + "mlp.fc2")
            b += 1
        tokens = _ln(x, p, f"stages.{s}.norm", stage.norm.eps)
    return tokens.mean(1) @ p["head.weight"].T + p["head.bias"]


def naive_pvt_score(model, images, key: str, channel: int, dtype=torch.float64) -> float:
    """sum_i KL(q_i || p_i): teacher and genuinely sliced student re-run from scratch (KL in float64)."""
    with torch.no_grad():
        logq = torch.log_softmax(functional_pvt(model, *sliced_pvt_params(model, dtype=dtype), images).double(), -1)
        logp = torch.log_softmax(functional_pvt(model, *sliced_pvt_params(model, key, channel, dtype), images).double(),
                                 -1)
    return float((logq.exp() * (logq - logp)).sum())
