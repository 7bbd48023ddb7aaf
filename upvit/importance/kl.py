"""The paper's exact criterion (docs/method.md section 2), computed fast without changing a score.

For every channel c of every site, ``s_c = sum_i KL(q_i || p_i)`` over the proxy images, with ``q``
the softmax of the original logits and ``p`` the softmax of the logits with channel c removed
(temperature 1). What makes it fast, none of which changes the definition:

* the teacher's log-probabilities are computed once;
* the residual stream entering each stage is cached (block by block, so only two caches live at
  once): candidates of ``attn.b`` run from ``attn_half(b)``, those of ``ffn.b`` from ``ffn_half(b)``;
  ``embed`` candidates run from the stem, the residual channel being everywhere;
* many candidates share one forward: they are stacked on the batch axis with per-sample masks
  ``[C*B, size]``;
* where the adapter offers them: removing FFN unit j changes the block output by a rank-1 term
  (``Adapter.ffn_rank1``), so the FFN of that block is not recomputed per candidate; and the last
  block's FFN runs on the tokens the head reads only (``Adapter.head_tokens``).

Forwards run in float32, the KL is accumulated in float64. Work is split into fixed units (a site's
candidate chunk), so a unit's numbers do not depend on which process computes it: runs under
``torchrun`` and resumed runs give scores bit-identical to one uninterrupted process.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import torch

from .. import distributed as dist_utils
from ..adapters.base import Adapter, Masks, Site, removal_masks
from ..errors import UpvitError
from ..fingerprint import digest
from .api import register_method
from .scores import Scores

PARTIAL_FORMAT = "upvit-kl-partial"
ENGINE_VERSION = 1
TOKEN_ROWS = 32768  # target size of a stacked forward, in token rows, when candidate_batch is automatic


def partial_path(out: str) -> str:
    """Where the site-by-site state of a run writing ``out`` lives until the run finishes."""
    return out + ".partial"


# --------------------------------------------------------------------------------------- helpers
def resolve_candidates(adapter: Adapter, candidates: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """Site key -> sorted unique channel indices to score (all channels when ``candidates`` is None)."""
    sites = {s.key: s for s in adapter.sites()}
    if candidates is None:
        return {k: torch.arange(s.size) for k, s in sites.items()}
    out = {}
    for key, idx in candidates.items():
        if key not in sites:
            raise UpvitError(f"candidates name site {key!r}, which this model does not have: use embed, attn.B or ffn.B")
        t = torch.as_tensor(idx, dtype=torch.long).flatten().unique(sorted=True)
        if t.numel() and (t[0] < 0 or t[-1] >= sites[key].size):
            raise UpvitError(f"candidate channel out of range for {key} (size {sites[key].size}): {t.tolist()[:8]}")
        if t.numel():
            out[key] = t
    return out


def fingerprint(adapter: Adapter, images: torch.Tensor, options: dict[str, Any]) -> str:
    """sha256 over the model's weights, the proxy images and the options that affect the scores."""
    def parts():
        for name, t in sorted(adapter.model.state_dict().items()):
            yield f"{name}|{t.dtype}|{list(t.shape)}"
            yield t
        imgs = images.detach().cpu().float()
        yield f"images|{list(imgs.shape)}"
        yield imgs
        yield json.dumps(options, sort_keys=True)

    return digest(parts()).hexdigest()


def continue_forward(adapter: Adapter, h: torch.Tensor, block: int, stage: str, prefix: int | None) -> torch.Tensor:
    """Logits from the residual stream ``h`` entering ``stage`` of ``block`` (``block == L``: the head).
    With ``prefix``, the last block's FFN half runs on the first ``prefix`` tokens only."""
    L = adapter.num_blocks
    for b in range(block, L):
        if not (b == block and stage == "ffn"):
            h = adapter.attn_half(b, h)
        if b == L - 1 and prefix:
            h = h[:, :prefix]
        h = adapter.ffn_half(b, h)
    if block >= L and prefix:
        h = h[:, :prefix]
    return adapter.head(h)


def _kl_sum(logq: torch.Tensor, q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[C]`` float64: sum over the batch of KL(q || softmax(logits)); ``logits`` is ``[C, B, K]``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return (q.unsqueeze(0) * (logq.unsqueeze(0) - logp)).sum(-1).sum(-1)


# --------------------------------------------------------------------------------------- engine
@register_method("kl")
def kl_scores(
    adapter: Adapter,
    images: torch.Tensor,
    batch_size: int = 64,
    candidate_batch: int | None = None,
    candidates: dict[str, Any] | None = None,
    out: str | None = None,
    resume: bool = False,
    progress: bool = True,
    proxy_meta: dict[str, Any] | None = None,
    callback: Callable[[str], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> Scores:
    """Exact KL importance of every channel (or of ``candidates`` only; other entries are NaN).

    Args:
        adapter: the adapted model (its own forward is never changed outside this call).
        images: proxy images ``[N, C, H, W]`` (labels are not used).
        batch_size: proxy images per forward; candidates are stacked on top of it.
        candidate_batch: candidates stacked per forward (default: about 32k token rows per forward).
        candidates: optional ``{site key: [channel, ...]}``; only those channels are scored.
        out: persist site by site to ``out + '.partial'`` and the final scores to ``out``.
        resume: continue from ``out + '.partial'`` (refused if model, proxy or options differ).
        progress: show progress bars (one per component, with ETA).
        proxy_meta: how the proxy set was sampled (recorded in the metadata).
        callback: called with each site key once that site is scored and persisted.
        meta: extra metadata recorded with the scores (e.g. the model spec and the command line).

    >>> from upvit.adapters import get_adapter                      # doctest: +SKIP
    >>> s = kl_scores(get_adapter(model), images, out="scores.safetensors")  # doctest: +SKIP
    """
    t_start = time.time()
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise UpvitError("the proxy set must be a non-empty [N, C, H, W] image tensor")
    if batch_size < 1 or (candidate_batch is not None and candidate_batch < 1):
        raise UpvitError("batch_size and candidate_batch must be at least 1")
    if resume and not out:
        raise UpvitError("resume needs the output path (out=...) of the interrupted run")
    model = adapter.model
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    images = images.to(device=device, dtype=dtype)
    cands = resolve_candidates(adapter, candidates)
    sites = adapter.sites()
    N, L = images.shape[0], adapter.num_blocks
    batches = [(s, min(s + batch_size, N)) for s in range(0, N, batch_size)]

    options = {"engine": ENGINE_VERSION, "batch_size": batch_size, "candidate_batch": candidate_batch,
               "candidates": None if candidates is None else {k: v.tolist() for k, v in cands.items()},
               "dtype": str(dtype), "device": device.type}
    fp = fingerprint(adapter, images, options)
    done: dict[str, torch.Tensor] = {}
    previous_wall = 0.0
    if out and resume:
        done, previous_wall, finished = _load_state(out, fp)
        if finished is not None:
            return finished

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = _run(adapter, images, batches, sites, cands, candidate_batch, done, out, fp, progress, callback,
                          previous_wall, t_start)
    finally:
        model.train(was_training)

    embed, attn, ffn = result["embed"], [result[f"attn.{b}"] for b in range(L)], [result[f"ffn.{b}"] for b in range(L)]
    wall = time.time() - t_start
    info = {
        **(meta or {}),
        "criterion": "kl", "method": "kl", "temperature": 1.0, "reduction": "sum over proxy images",
        "proxy": dict(proxy_meta or {}), "num_images": N, "model": adapter.describe(),
        "candidates": {k: int(v.numel()) for k, v in cands.items()} if candidates is not None else "all",
        "batch_size": batch_size, "candidate_batch": candidate_batch, "device": str(device),
        "world_size": dist_utils.world_size(), "torch": torch.__version__,
        "wall_time_s": round(wall, 3), "wall_time_total_s": round(wall + previous_wall, 3),
        "resumed": bool(done), "fingerprint": fp,
    }
    scores = Scores(embed, attn, ffn, info)
    if out and dist_utils.is_main():
        scores.save(out)
        if os.path.exists(partial_path(out)):
            os.unlink(partial_path(out))
    dist_utils.barrier()
    return scores


def _run(adapter: Adapter, images: torch.Tensor, batches: list[tuple[int, int]], sites: list[Site],
         cands: dict[str, torch.Tensor], candidate_batch: int | None, done: dict[str, torch.Tensor],
         out: str | None, fp: str, show_progress: bool, callback: Callable[[str], None] | None,
         previous_wall: float, t_start: float) -> dict[str, torch.Tensor]:
    from ..progress import progress

    L = adapter.num_blocks
    rank, world = dist_utils.rank(), dist_utils.world_size()
    prefix = adapter.head_tokens()

    # teacher: log-probabilities once; the stem output is the first cache
    logits = torch.cat([adapter.forward(images[s:e]) for s, e in batches])
    bad = (~torch.isfinite(logits)).any(-1)
    if bad.any():
        raise UpvitError(f"the model's logits are NaN or inf on {int(bad.sum())} of {len(bad)} proxy images: "
                         "check the weights and the input normalisation")
    logq = torch.log_softmax(logits.double(), dim=-1)
    q = logq.exp()
    h = torch.cat([adapter.stem(images[s:e]) for s, e in batches])
    tokens = h.shape[1]
    C = candidate_batch or max(1, round(TOKEN_ROWS / (min(len(images), batches[0][1]) * tokens)))

    # fixed work units: (site, chunk of C candidates); unit u belongs to rank u % world
    units: dict[str, list[torch.Tensor]] = {}
    counter = 0
    mine: dict[str, list[bool]] = {}
    for site in sites:
        idx = cands.get(site.key)
        chunks = list(idx.split(C)) if idx is not None else []
        units[site.key] = chunks
        mine[site.key] = [(counter + i) % world == rank for i in range(len(chunks))]
        counter += len(chunks)
    bars = {}
    if show_progress:
        for pos, comp in enumerate(("embed", "attn", "ffn")):
            total = sum(len(c) for s in sites if s.component == comp and s.key not in done
                        for c, m in zip(units[s.key], mine[s.key]) if m) * len(images)
            if total:
                bars[comp] = progress(total=total, desc=f"KL {comp}", unit="cand-img", position=pos, leave=True)

    result: dict[str, torch.Tensor] = dict(done)

    def score_site(site: Site, fn: Callable[[int, int, torch.Tensor], torch.Tensor],
                   prepare: Callable[[int, int], None] | None = None) -> None:
        """Score one site: ``fn(s, e, idx) -> logits [C, B, K]`` per image batch and chunk."""
        key = site.key
        if key in done:
            return
        idx_all = cands.get(key)
        full = torch.full((site.size,), float("nan"), dtype=torch.float64)
        if idx_all is not None:
            acc = torch.zeros(idx_all.numel(), dtype=torch.float64, device=images.device)
            offsets = [0]
            for chunk in units[key]:
                offsets.append(offsets[-1] + len(chunk))
            for s, e in batches:
                if prepare is not None:
                    prepare(s, e)
                for i, chunk in enumerate(units[key]):
                    if not mine[key][i]:
                        continue
                    acc[offsets[i]:offsets[i + 1]] += _kl_sum(logq[s:e], q[s:e], fn(s, e, chunk))
                    if site.component in bars:
                        bars[site.component].update(len(chunk) * (e - s))
            acc = dist_utils.all_reduce_sum(acc).cpu()
            full[idx_all] = acc
        result[key] = full
        if out and dist_utils.is_main():
            _save_state(out, fp, result, previous_wall + time.time() - t_start)
        if callback is not None:
            callback(key)

    try:
        # component 1: the residual channel is everywhere, so candidates run from the stem
        embed = sites[0]

        def embed_fn(s: int, e: int, idx: torch.Tensor) -> torch.Tensor:
            x = images[s:e]
            mask = removal_masks(embed.size, idx, e - s, x)
            with adapter.masking(Masks({"embed": mask})):
                hh = adapter.stem(x.repeat(len(idx), 1, 1, 1))
                return continue_forward(adapter, hh, 0, "attn", prefix).view(len(idx), e - s, -1)

        score_site(embed, embed_fn)

        by_key = {s.key: s for s in sites}
        for b in range(L):
            site = by_key[f"attn.{b}"]

            def attn_fn(s: int, e: int, idx: torch.Tensor, b: int = b, size: int = site.size) -> torch.Tensor:
                hh = h[s:e]
                mask = removal_masks(size, idx, e - s, hh)
                with adapter.masking(Masks({f"attn.{b}": mask})):
                    hh = adapter.attn_half(b, hh.repeat(len(idx), 1, 1))
                return continue_forward(adapter, hh, b, "ffn", prefix).view(len(idx), e - s, -1)

            score_site(site, attn_fn)
            h_mid = torch.cat([adapter.attn_half(b, h[s:e]) for s, e in batches])

            site = by_key[f"ffn.{b}"]
            cache: dict[str, Any] = {}

            def prepare(s: int, e: int, b: int = b) -> None:
                cache["rank1"] = adapter.ffn_rank1(b, h_mid[s:e])

            def ffn_fn(s: int, e: int, idx: torch.Tensor, b: int = b, size: int = site.size) -> torch.Tensor:
                r1 = cache.get("rank1")
                if r1 is not None:
                    full_out, acts, dirs = r1
                    if b == L - 1 and prefix:
                        full_out, acts = full_out[:, :prefix], acts[:, :prefix]
                    idx_d = idx.to(acts.device)
                    a = acts.index_select(-1, idx_d).permute(2, 0, 1).unsqueeze(-1)  # [C, B, T, 1]
                    hh = full_out.unsqueeze(0) - a * dirs.index_select(0, idx_d)[:, None, None, :]
                    hh = hh.reshape(-1, *full_out.shape[1:])
                    return continue_forward(adapter, hh, b + 1, "attn", prefix).view(len(idx), e - s, -1)
                hh = h_mid[s:e]
                mask = removal_masks(size, idx, e - s, hh)
                with adapter.masking(Masks({f"ffn.{b}": mask})):
                    return continue_forward(adapter, hh.repeat(len(idx), 1, 1), b, "ffn", prefix).view(len(idx), e - s, -1)

            score_site(site, ffn_fn, prepare if site.key not in done and site.key in cands else None)
            cache.clear()
            h = torch.cat([adapter.ffn_half(b, h_mid[s:e]) for s, e in batches])
            del h_mid
    finally:
        for bar in bars.values():
            bar.close()
    return result


# --------------------------------------------------------------------------------------- persistence
def _save_state(out: str, fp: str, result: dict[str, torch.Tensor], wall: float) -> None:
    """Atomically write the finished sites to ``out + '.partial'`` (never mistaken for a scores file:
    it has no complete set of sites and its metadata says so)."""
    from ..io import save_tensors

    meta = {"format": PARTIAL_FORMAT, "fingerprint": fp, "done": json.dumps(sorted(result)), "wall_time_s": repr(wall)}
    save_tensors(partial_path(out), {f"partial/{k}": v for k, v in result.items()}, metadata=meta)


def _load_state(out: str, fp: str) -> tuple[dict[str, torch.Tensor], float, Scores | None]:
    """Finished sites, wall time spent so far and, if the run had already finished, its scores."""
    from ..io import load_tensors

    path = partial_path(out)
    if os.path.exists(path):
        tensors, meta = load_tensors(path)
        if meta.get("format") != PARTIAL_FORMAT:
            raise UpvitError(f"{path} is not a partial KL scoring state: delete it or drop --resume")
        if meta.get("fingerprint") != fp:
            raise UpvitError(f"cannot resume from {path}: it was computed for a different model, proxy set or "
                             "options; drop --resume to start over")
        done = {k[len("partial/"):]: v for k, v in tensors.items()}
        return done, float(meta.get("wall_time_s", "0")), None
    if os.path.exists(out):
        scores = Scores.load(out)
        if scores.meta.get("fingerprint") != fp:
            raise UpvitError(f"cannot resume: {out} holds scores of a different model, proxy set or options; "
                             "drop --resume to overwrite it")
        return {}, 0.0, scores
    return {}, 0.0, None
