"""Naive, independent references for the scores of Hugging Face GPT-2, BERT and ViT: slice one channel
out of the weights and run a hand-written functional forward (explicit per-head attention, masks,
LayerNorms of the sliced width), teacher and student both re-run in float64 for every channel.

Nothing here uses upvit's adapters or transformers' modules: only the state dict and a few config
numbers (eps, head count, attention scale flags) are read from the model, so a residual channel
removal genuinely shrinks every table and LayerNorm instead of being masked."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _drop(p, name, dim, remove, width):
    keep = torch.tensor([i for i in range(width) if i not in remove], dtype=torch.long)
    p[name] = p[name].index_select(dim, keep)


def _heads(num_heads, size, block_count):
    hd = size // num_heads
    return [[list(range(h * hd, (h + 1) * hd)) for h in range(num_heads)] for _ in range(block_count)]


def _remove_dim(heads, channel):
    new, pos = [], 0
    for dims in heads:
        n = len([d for d in dims if d != channel])
        new.append(list(range(pos, pos + n)))
        pos += n
    return new


def _attention(q, k, v, heads, scale, mask):
    """q, k, v [B, T, A]; heads: dim lists; mask [B, T, T] bool (True = attend)."""
    outs = []
    for dims in heads:
        d = torch.tensor(dims, dtype=torch.long)
        att = (q[..., d] @ k[..., d].transpose(-1, -2)) * scale
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        outs.append(att @ v[..., d])
    return torch.cat(outs, -1)


# ------------------------------------------------------------------------------------------- GPT-2
def sliced_gpt2(model, key=None, channel=None, dtype=torch.float64):
    p = {k: v.detach().to(dtype, copy=True) for k, v in model.state_dict().items()}
    cfg = model.config
    L, D = cfg.n_layer, cfg.n_embd
    heads = _heads(cfg.n_head, D, L)
    if key is None:
        return p, heads
    kind, b = key.split(".")
    b = int(b)
    if kind == "res":
        for n in ("transformer.wte.weight", "transformer.wpe.weight"):
            _drop(p, n, 1, {channel}, D)
        p["lm_head.weight"] = p["transformer.wte.weight"]  # tied
        for i in range(L):
            pre = f"transformer.h.{i}."
            for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.weight", "mlp.c_fc.weight"):
                _drop(p, pre + n, 0, {channel}, D)  # LayerNorms, and Conv1D input rows ([in, out])
            for n in ("attn.c_proj.weight", "mlp.c_proj.weight"):
                _drop(p, pre + n, 1, {channel}, D)
            for n in ("attn.c_proj.bias", "mlp.c_proj.bias"):
                _drop(p, pre + n, 0, {channel}, D)
        for n in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
            _drop(p, n, 0, {channel}, D)
        return p, heads
    pre = f"transformer.h.{b}."
    if kind == "attn":
        A = D
        three = {channel, channel + A, channel + 2 * A}
        _drop(p, pre + "attn.c_attn.weight", 1, three, 3 * A)
        _drop(p, pre + "attn.c_attn.bias", 0, three, 3 * A)
        _drop(p, pre + "attn.c_proj.weight", 0, {channel}, A)
        heads[b] = _remove_dim(heads[b], channel)
    else:
        H = p[pre + "mlp.c_fc.weight"].shape[1]
        _drop(p, pre + "mlp.c_fc.weight", 1, {channel}, H)
        _drop(p, pre + "mlp.c_fc.bias", 0, {channel}, H)
        _drop(p, pre + "mlp.c_proj.weight", 0, {channel}, H)
    return p, heads


def functional_gpt2(model, p, heads, ids, attention_mask):
    cfg = model.config
    eps = cfg.layer_norm_epsilon
    B, T = ids.shape
    x = p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][torch.arange(T)]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool)).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
    for b in range(cfg.n_layer):
        pre = f"transformer.h.{b}."
        h = F.layer_norm(x, x.shape[-1:], p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], eps)
        qkv = h @ p[pre + "attn.c_attn.weight"] + p[pre + "attn.c_attn.bias"]
        A = qkv.shape[-1] // 3
        scale = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0  # the original head size
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= b + 1
        o = _attention(qkv[..., :A], qkv[..., A:2 * A], qkv[..., 2 * A:], heads[b], scale, mask)
        x = x + o @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]
        h = F.layer_norm(x, x.shape[-1:], p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], eps)
        h = F.gelu(h @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"], approximate="tanh")  # gelu_new
        x = x + h @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"]
    x = F.layer_norm(x, x.shape[-1:], p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    return x @ p["lm_head.weight"].T


def naive_gpt2_score(model, inputs, key, channel):
    """sum over sequences and non-padding positions of KL(q || p), both models re-run from scratch."""
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        logq = torch.log_softmax(functional_gpt2(model, *sliced_gpt2(model), ids, am), -1)
        logp = torch.log_softmax(functional_gpt2(model, *sliced_gpt2(model, key, channel), ids, am), -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return float((kl * am.double()).sum())


# ------------------------------------------------------------------------------------------- BERT
def sliced_bert(model, key=None, channel=None, dtype=torch.float64):
    """BertModel or BertForMaskedLM (prefix ``bert.``); the pooler is not used by the references."""
    p = {k: v.detach().to(dtype, copy=True) for k, v in model.state_dict().items()}
    cfg = model.config
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    pf = "bert." if "bert.embeddings.word_embeddings.weight" in p else ""
    heads = _heads(cfg.num_attention_heads, D, L)
    if key is None:
        return p, heads
    kind, b = key.split(".")
    b = int(b)
    if kind == "res":
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            _drop(p, f"{pf}embeddings.{n}.weight", 1, {channel}, D)
        norms = [f"{pf}embeddings.LayerNorm"]
        for i in range(L):
            pre = f"{pf}encoder.layer.{i}."
            norms += [pre + "attention.output.LayerNorm", pre + "output.LayerNorm"]
            for n in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"):
                _drop(p, pre + n + ".weight", 1, {channel}, D)
            for n in ("attention.output.dense", "output.dense"):
                _drop(p, pre + n + ".weight", 0, {channel}, D)
                _drop(p, pre + n + ".bias", 0, {channel}, D)
        if pf:  # MLM head: transform dense is residual -> residual, then its LayerNorm; decoder tied
            t = "cls.predictions.transform."
            _drop(p, t + "dense.weight", 0, {channel}, D)
            _drop(p, t + "dense.weight", 1, {channel}, D)
            _drop(p, t + "dense.bias", 0, {channel}, D)
            norms.append(t + "LayerNorm")
            p["cls.predictions.decoder.weight"] = p[f"{pf}embeddings.word_embeddings.weight"]
        for n in norms:
            _drop(p, n + ".weight", 0, {channel}, D)
            _drop(p, n + ".bias", 0, {channel}, D)
        return p, heads
    pre = f"{pf}encoder.layer.{b}."
    if kind == "attn":
        for n in ("query", "key", "value"):
            _drop(p, pre + f"attention.self.{n}.weight", 0, {channel}, D)
            _drop(p, pre + f"attention.self.{n}.bias", 0, {channel}, D)
        _drop(p, pre + "attention.output.dense.weight", 1, {channel}, D)
        heads[b] = _remove_dim(heads[b], channel)
    else:
        H = p[pre + "intermediate.dense.weight"].shape[0]
        _drop(p, pre + "intermediate.dense.weight", 0, {channel}, H)
        _drop(p, pre + "intermediate.dense.bias", 0, {channel}, H)
        _drop(p, pre + "output.dense.weight", 1, {channel}, H)
    return p, heads


def functional_bert(model, p, heads, ids, attention_mask):
    """Last hidden states [B, T, D] (post-norm layers), and the MLM logits if the model has the head."""
    cfg = model.config
    eps = cfg.layer_norm_eps
    pf = "bert." if "bert.embeddings.word_embeddings.weight" in p else ""
    B, T = ids.shape
    x = (p[f"{pf}embeddings.word_embeddings.weight"][ids]
         + p[f"{pf}embeddings.position_embeddings.weight"][torch.arange(T)]
         + p[f"{pf}embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)])
    ln = lambda t, n: F.layer_norm(t, t.shape[-1:], p[n + ".weight"], p[n + ".bias"], eps)  # noqa: E731
    x = ln(x, f"{pf}embeddings.LayerNorm")
    mask = attention_mask.bool().unsqueeze(1).expand(B, T, T)
    scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
    lin = lambda t, n: t @ p[n + ".weight"].T + p[n + ".bias"]  # noqa: E731
    for b in range(cfg.num_hidden_layers):
        pre = f"{pf}encoder.layer.{b}."
        q, k, v = (lin(x, pre + f"attention.self.{n}") for n in ("query", "key", "value"))
        o = _attention(q, k, v, heads[b], scale, mask)
        x = ln(lin(o, pre + "attention.output.dense") + x, pre + "attention.output.LayerNorm")
        h = F.gelu(lin(x, pre + "intermediate.dense"))
        x = ln(lin(h, pre + "output.dense") + x, pre + "output.LayerNorm")
    if not pf:
        return x, None
    t = ln(F.gelu(lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
    return x, t @ p["cls.predictions.decoder.weight"].T + p["cls.predictions.decoder.bias"]


def _sentence(x, am):
    m = am.double().unsqueeze(-1)
    return F.normalize((x * m).sum(1) / m.sum(1), dim=-1)


def naive_bert_score(model, inputs, key, channel):
    """BertForMaskedLM: the KL of the MLM distributions summed over non-padding positions. BertModel:
    sum over sentences of 1 - cos(e, e') with e' the sliced model's embedding, compared in the
    original's coordinates (a removed residual channel is a 0 coordinate of e')."""
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        h0, lm0 = functional_bert(model, *sliced_bert(model), ids, am)
        h1, lm1 = functional_bert(model, *sliced_bert(model, key, channel), ids, am)
    if lm0 is not None:
        logq, logp = torch.log_softmax(lm0, -1), torch.log_softmax(lm1, -1)
        return float(((logq.exp() * (logq - logp)).sum(-1) * am.double()).sum())
    e0, e1 = _sentence(h0, am), _sentence(h1, am)
    if key.startswith("res"):
        e1 = torch.cat([e1[:, :channel], torch.zeros_like(e1[:, :1]), e1[:, channel:]], dim=1)
    return float((1 - (e0 * e1).sum(-1)).sum())


# ------------------------------------------------------------------------------------------- ViT / DeiT
def sliced_vit(model, key=None, channel=None, dtype=torch.float64):
    p = {k: v.detach().to(dtype, copy=True) for k, v in model.state_dict().items()}
    cfg = model.config
    pf = "vit" if "vit.layernorm.weight" in p else "deit"
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    A = p[f"{pf}.layers.0.attention.q_proj.weight"].shape[0]
    heads = _heads(cfg.num_attention_heads, A, L)
    if key is None:
        return p, heads
    kind, b = key.split(".")
    b = int(b)
    if kind == "res":
        for n in ("cls_token", "distillation_token", "position_embeddings"):
            if f"{pf}.embeddings.{n}" in p:
                _drop(p, f"{pf}.embeddings.{n}", 2, {channel}, D)
        for n in ("weight", "bias"):
            _drop(p, f"{pf}.embeddings.patch_embeddings.projection.{n}", 0, {channel}, D)
            _drop(p, f"{pf}.layernorm.{n}", 0, {channel}, D)
        for i in range(L):
            pre = f"{pf}.layers.{i}."
            for n in ("layernorm_before", "layernorm_after", "attention.o_proj", "mlp.fc2"):
                _drop(p, pre + n + ".weight", 0, {channel}, D)
                _drop(p, pre + n + ".bias", 0, {channel}, D)
            for n in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1"):
                _drop(p, pre + n + ".weight", 1, {channel}, D)
        for h in ("classifier", "cls_classifier", "distillation_classifier"):
            if h + ".weight" in p:
                _drop(p, h + ".weight", 1, {channel}, D)
        return p, heads
    pre = f"{pf}.layers.{b}."
    if kind == "attn":
        for n in ("q_proj", "k_proj", "v_proj"):
            _drop(p, pre + f"attention.{n}.weight", 0, {channel}, A)
            _drop(p, pre + f"attention.{n}.bias", 0, {channel}, A)
        _drop(p, pre + "attention.o_proj.weight", 1, {channel}, A)
        heads[b] = _remove_dim(heads[b], channel)
    else:
        H = p[pre + "mlp.fc1.weight"].shape[0]
        _drop(p, pre + "mlp.fc1.weight", 0, {channel}, H)
        _drop(p, pre + "mlp.fc1.bias", 0, {channel}, H)
        _drop(p, pre + "mlp.fc2.weight", 1, {channel}, H)
    return p, heads


def functional_vit(model, p, heads, images):
    cfg = model.config
    eps = cfg.layer_norm_eps
    pf = "vit" if "vit.layernorm.weight" in p else "deit"
    lin = lambda t, n: t @ p[n + ".weight"].T + p[n + ".bias"]  # noqa: E731
    ln = lambda t, n: F.layer_norm(t, t.shape[-1:], p[n + ".weight"], p[n + ".bias"], eps)  # noqa: E731
    x = F.conv2d(images.to(torch.float64), p[f"{pf}.embeddings.patch_embeddings.projection.weight"],
                 p[f"{pf}.embeddings.patch_embeddings.projection.bias"],
                 stride=cfg.patch_size).flatten(2).transpose(1, 2)
    B = x.shape[0]
    tokens = [p[f"{pf}.embeddings.cls_token"].expand(B, -1, -1)]
    if f"{pf}.embeddings.distillation_token" in p:
        tokens.append(p[f"{pf}.embeddings.distillation_token"].expand(B, -1, -1))
    x = torch.cat(tokens + [x], 1) + p[f"{pf}.embeddings.position_embeddings"]
    N = x.shape[1]
    mask = torch.ones(B, N, N, dtype=torch.bool)
    A0 = model.state_dict()[f"{pf}.layers.0.attention.q_proj.weight"].shape[0]
    scale = (A0 // cfg.num_attention_heads) ** -0.5
    for b in range(cfg.num_hidden_layers):
        pre = f"{pf}.layers.{b}."
        h = ln(x, pre + "layernorm_before")
        o = _attention(lin(h, pre + "attention.q_proj"), lin(h, pre + "attention.k_proj"),
                       lin(h, pre + "attention.v_proj"),
                       heads[b], scale, mask)
        x = x + lin(o, pre + "attention.o_proj")
        h = F.gelu(lin(ln(x, pre + "layernorm_after"), pre + "mlp.fc1"))
        x = x + lin(h, pre + "mlp.fc2")
    x = ln(x, f"{pf}.layernorm")
    if "cls_classifier.weight" in p:
        return (lin(x[:, 0], "cls_classifier") + lin(x[:, 1], "distillation_classifier")) / 2
    return lin(x[:, 0], "classifier")


def naive_vit_score(model, images, key, channel):
    with torch.no_grad():
        logq = torch.log_softmax(functional_vit(model, *sliced_vit(model), images), -1)
        logp = torch.log_softmax(functional_vit(model, *sliced_vit(model, key, channel), images), -1)
    return float((logq.exp() * (logq - logp)).sum())


__all__ = ["functional_bert", "functional_gpt2", "functional_vit", "naive_bert_score", "naive_gpt2_score",
           "naive_vit_score", "sliced_bert", "sliced_gpt2", "sliced_vit"]
