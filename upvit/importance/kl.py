"""The paper's exact criterion (docs/method.md section 2), computed fast without changing a score.

For every channel c of every site, ``s_c = sum_i KL(q_i || p_i)`` over the proxy inputs (and over
the output events of each input: one for an image, every non-padding position for a language
model), with ``q`` the softmax of the original logits and ``p`` the softmax of the logits with
channel c removed (temperature 1). What makes it fast, none of which changes the definition:

* the teacher's log-probabilities are computed once;
* the stream entering each unit is cached (unit by unit, so only one cache per proxy batch lives at
  once): candidates of a site start from the unit where its mask first acts
  (:meth:`upvit.topology.Topology.start_unit`); residual stage 0 starts from the inputs;
* many candidates share one forward: they are stacked on the batch axis with per-sample masks
  ``[C*B, size]``;
* where the adapter offers them: removing FFN unit j changes the unit's output by a rank-1 term
  (``Adapter.ffn_rank1``), so that FFN is not recomputed per candidate; and the last FFN runs on
  the tokens the head reads only (``Topology.head_tokens``).

Forwards run in float32, the KL is accumulated in float64. Work is split into fixed units (a site's
candidate chunk), so a unit's numbers do not depend on which process computes it: runs under
``torchrun`` and resumed runs give scores bit-identical to one uninterrupted process.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable

import torch

from .. import distributed as dist_utils
from ..adapters.base import Adapter, Inputs, Masks, Stream, batch_len, batch_to, forward_from, removal_masks
from ..errors import UpvitError
from ..fingerprint import digest
from ..progress import job, note, running
from ..topology import Site, Topology
from .api import register_method
from .reference import TOKEN_ROWS, Reference, check_proxy, criterion_name, samples_word  # noqa: F401 (re-exported)
from .scores import Scores

PARTIAL_FORMAT = "upvit-kl-partial"
ENGINE_VERSION = 2
DEFAULT_MEMORY_GB = 6.0  # activation budget of the candidates' stacked forwards: safe on a 16 GB machine
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def partial_path(out: str) -> str:
    """Where the site-by-site state of a run writing ``out`` lives until the run finishes."""
    return out + ".partial"


# --------------------------------------------------------------------------------------- helpers
def resolve_candidates(topology: Topology, candidates: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """Site key -> sorted unique channel indices to score (all channels when ``candidates`` is None)."""
    if candidates is None:
        return {s.key: torch.arange(s.size) for s in topology.sites}
    out = {}
    for key, idx in candidates.items():
        site = topology.site(key)
        t = torch.as_tensor(idx, dtype=torch.long).flatten().unique(sorted=True)
        if t.numel() and (t[0] < 0 or t[-1] >= site.size):
            raise UpvitError(f"candidate channel out of range for {key} (size {site.size}): {t.tolist()[:8]}")
        if t.numel():
            out[key] = t
    return out


def compute_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The precision of the candidates' forwards: ``fp32`` (default, the reference), ``bf16`` (CPU or CUDA)
    or ``fp16`` (CUDA only: CPU half matmuls are slow and overflow-prone)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        name = {v: k for k, v in COMPUTE_DTYPES.items()}.get(name, str(name))
    if name not in COMPUTE_DTYPES:
        raise UpvitError(f"unknown scoring dtype {name!r}: use fp32, bf16 or fp16 (fp16 on CUDA only)")
    if name == "fp16" and device.type != "cuda":
        raise UpvitError("--dtype fp16 needs a CUDA device: use bf16 on the CPU (or --device cuda)")
    return COMPUTE_DTYPES[name]


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX flags in /proc/cpuinfo). Without
    them bf16 matrix products are emulated and run far slower than float32 (about 65x on an AVX2 EPYC:
    benchmarks/results/scale.md), so ``dtype='bf16'`` only pays on CPUs that have them, or on a GPU."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bytes_per_candidate_input(tokens: int, width: int, hidden: int, heads: int, element_bytes: int = 4,
                              keys: int | None = None) -> int:
    """Activation bytes one candidate on one proxy input holds at the peak of a block's forward (no autograd).

    Live at once, per token: the residual stream and its normed copy (2 x width), q, k, v (3 x width), the
    attention output and the projection (2 x width), the FFN's hidden layer before and after its activation
    (2 x hidden); plus one attention matrix per head (tokens x ``keys``, default tokens: materialised by the
    unfused path). An upper bound on what one stacked forward keeps, so a budget built on it is not exceeded.
    """
    per_token = 7 * width + 2 * hidden
    return element_bytes * (tokens * per_token + heads * tokens * (tokens if keys is None else keys))


def candidate_batch_for_memory(memory_gb: float, rows: int, tokens: int, width: int, hidden: int, heads: int,
                               fixed_bytes: int = 0, element_bytes: int = 4, keys: int | None = None) -> int:
    """Candidates to stack per forward of ``rows`` proxy inputs so their activations fit ``memory_gb``
    (GiB) after ``fixed_bytes`` (weights, stream caches); at least 1."""
    free = memory_gb * 2**30 - fixed_bytes
    per = bytes_per_candidate_input(tokens, width, hidden, heads, element_bytes, keys) * rows
    return max(1, int(free // per))


class Fingerprint(str):
    """The run fingerprint (a hex string) carrying ``parts``: one hash each of the weights, the proxy
    inputs and the options, recorded with the partial state so a refused ``--resume`` can say which differs."""

    parts: dict[str, str]


def fingerprint(adapter: Adapter, inputs: Inputs, options: dict[str, Any]) -> Fingerprint:
    """sha256 over the model's weights, the proxy inputs and the options that affect the scores."""
    def weights():
        for name, t in sorted(adapter.model.state_dict().items()):
            yield f"{name}|{t.dtype}|{list(t.shape)}"
            yield t

    def proxy():
        if isinstance(inputs, torch.Tensor):  # images: the same bytes as before text inputs existed
            imgs = inputs.detach().cpu().float()
            yield f"images|{list(imgs.shape)}"
            yield imgs
        else:
            for key, t in sorted(inputs.items()):
                t = t.detach().cpu()
                yield f"input:{key}|{t.dtype}|{list(t.shape)}"
                yield t

    def parts():
        yield from weights()
        yield from proxy()
        yield json.dumps(options, sort_keys=True)

    fp = Fingerprint(digest(parts()).hexdigest())  # unchanged spelling: earlier runs' states still resume
    fp.parts = {"weights": digest(weights()).hexdigest(), "proxy": digest(proxy()).hexdigest(),
                "options": digest([json.dumps(options, sort_keys=True)]).hexdigest()}
    return fp


# why a --resume is refused, per differing part of the fingerprint
_RESUME_WHY = {
    "weights": "the model's weights differ from the interrupted run's: pass the same --checkpoint (or the same "
               "model directory) as that run; a timm:/hf: spec without --checkpoint has seeded random weights, "
               "not trained ones",
    "proxy": "the proxy set differs from the interrupted run's: pass the same --data, --proxy-size or "
             "--per-class and --seed",
    "options": "the scoring options differ from the interrupted run's (--batch-size, --device or the candidates)",
}


def _resume_mismatch(recorded: Any, fp: str) -> str:
    """Which part of the fingerprint differs, in words (the generic list for states without parts)."""
    mine = getattr(fp, "parts", None)
    if isinstance(recorded, str):
        try:
            recorded = json.loads(recorded)
        except json.JSONDecodeError:
            recorded = None
    if isinstance(recorded, dict) and mine:
        differ = [_RESUME_WHY[k] for k in ("weights", "proxy", "options") if recorded.get(k) != mine.get(k)]
        if differ:
            return "; ".join(differ)
    return ("it was computed for a different model, proxy set or options (other weights: a different "
            "--checkpoint or model directory; other proxy: --data, --proxy-size or --seed; --batch-size)")


# --------------------------------------------------------------------------------------- engine
@register_method("kl")
def kl_scores(
    adapter: Adapter,
    inputs: Inputs,
    batch_size: int = 64,
    candidate_batch: int | None = None,
    candidates: dict[str, Any] | None = None,
    out: str | None = None,
    resume: bool = False,
    progress: bool = True,
    proxy_meta: dict[str, Any] | None = None,
    callback: Callable[[str], None] | None = None,
    meta: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    memory_gb: float | None = None,
    reference: Reference | None = None,
) -> Scores:
    """Exact KL importance of every channel (or of ``candidates`` only; other entries are NaN).

    Args:
        adapter: the adapted model (its own forward is never changed outside this call).
        inputs: proxy inputs: images ``[N, C, H, W]`` or a dict of per-sample tensors (token ids and
            attention mask for text). Labels are not used.
        batch_size: proxy inputs per forward; candidates are stacked on top of it.
        candidate_batch: candidates stacked per forward (default: about 32k token rows per forward).
        candidates: optional ``{site key: [channel, ...]}``; only those channels are scored.
        out: persist site by site to ``out + '.partial'`` and the final scores to ``out``.
        resume: continue from ``out + '.partial'`` (refused if model, proxy or options differ).
        progress: show the job's progress bar (with ETA) and, for a run of its own (not inside another
            scorer), a first line with the plan and, after a short measured start, the estimated time.
        proxy_meta: how the proxy set was sampled (recorded in the metadata).
        callback: called with each site key once that site is scored and persisted.
        meta: extra metadata recorded with the scores (e.g. the model spec and the command line).
        dtype: precision of the candidates' forwards: ``fp32`` (default), ``bf16`` or ``fp16`` (CUDA). The
            teacher's reference outputs and stream caches stay in the model's dtype and the KL in float64.
        memory_gb: activation budget (GiB) that caps the automatic candidate batch (default 6: safe on a
            16 GB machine); ignored when ``candidate_batch`` is given.
        reference: the original's outputs on these inputs and batches, from an earlier call (a caller that
            scores in rounds, like the hybrid scorer, keeps one); without ``out``, no fingerprint is taken.

    >>> from upvit.adapters import get_adapter                      # doctest: +SKIP
    >>> s = kl_scores(get_adapter(model), images, out="scores.safetensors")  # doctest: +SKIP
    """
    t_start = time.time()
    check_proxy(inputs)
    if batch_size < 1 or (candidate_batch is not None and candidate_batch < 1):
        raise UpvitError("batch_size and candidate_batch must be at least 1")
    if resume and not out:
        raise UpvitError("resume needs the output path (out=...) of the interrupted run")
    if memory_gb is not None and not memory_gb > 0:
        raise UpvitError(f"memory_gb must be a positive number of GiB, got {memory_gb!r}")
    model = adapter.model
    param = next(model.parameters())
    compute = compute_dtype(dtype, param.device)
    device, dtype = param.device, param.dtype
    inputs = batch_to(inputs, device, dtype)
    topology = adapter.topology()
    cands = resolve_candidates(topology, candidates)
    N = batch_len(inputs)
    batches = [(s, min(s + batch_size, N)) for s in range(0, N, batch_size)]

    options = {"engine": ENGINE_VERSION, "batch_size": batch_size, "candidate_batch": candidate_batch,
               "candidates": None if candidates is None else {k: v.tolist() for k, v in cands.items()},
               "dtype": str(dtype), "device": device.type}
    if compute != torch.float32:  # only then: fp32 runs keep the fingerprint (and resume) of earlier versions
        options["compute_dtype"] = str(compute)
    if reference is not None and not reference.fits(adapter, batches):
        raise UpvitError("the reference given to kl_scores was computed for another model or other proxy batches")
    # the fingerprint hashes every weight: needed to persist or resume, not for a caller's in-memory round
    fp = fingerprint(adapter, inputs, options) if reference is None or out else None
    done: dict[str, torch.Tensor] = {}
    previous_wall = 0.0
    if out and resume:
        done, previous_wall, finished = _load_state(out, fp)
        if finished is not None:
            return finished

    if progress and not running():
        total = sum(int(v.numel()) for k, v in cands.items() if k not in done)
        what = samples_word(inputs)
        note(f"exact {criterion_name(adapter.divergence)} scores: {total:,} channels x {N:,} proxy {what} = "
             f"{total * N:,} candidate evaluations on {len(cands) - len(set(done) & set(cands))} sites"
             f"{' (resumed: ' + str(len(done)) + ' sites done)' if done else ''}; the time estimate follows a short "
             "measured start (part of the run)")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            engine = _Engine(adapter, inputs, batches, cands, candidate_batch, progress, compute,
                             DEFAULT_MEMORY_GB if memory_gb is None else memory_gb, reference)
            result = engine.run(done, lambda key, res: _persist(out, fp, res, previous_wall + time.time() - t_start,
                                                                 callback, key))
    finally:
        model.train(was_training)

    wall = time.time() - t_start
    info = {
        **(meta or {}),
        "criterion": criterion_name(adapter.divergence), "method": "kl",
        "divergence": adapter.divergence, "temperature": 1.0, "reduction": "sum over proxy inputs and events",
        "proxy": dict(proxy_meta or {}), "num_images": N, "model": adapter.describe(),
        "candidates": {k: int(v.numel()) for k, v in cands.items()} if candidates is not None else "all",
        "batch_size": batch_size, "candidate_batch": candidate_batch, "candidate_batch_used": engine.C,
        "compute_dtype": str(compute).replace("torch.", ""), "device": str(device),
        "world_size": dist_utils.world_size(), "torch": torch.__version__,
        "wall_time_s": round(wall, 3), "wall_time_total_s": round(wall + previous_wall, 3),
        "resumed": bool(done), "fingerprint": fp, "fingerprint_parts": getattr(fp, "parts", None),
    }
    scores = Scores.from_sites(topology, result, info)
    if out and dist_utils.is_main():
        scores.save(out)
        if os.path.exists(partial_path(out)):
            os.unlink(partial_path(out))
    dist_utils.barrier()
    return scores


def _persist(out: str | None, fp: str, result: dict[str, torch.Tensor], wall: float,
             callback: Callable[[str], None] | None, key: str) -> None:
    if out and dist_utils.is_main():
        _save_state(out, fp, result, wall)
    if callback is not None:
        callback(key)


class _Engine:
    """One exact-KL run: the teacher's outputs, the per-unit stream caches and the scoring of sites."""

    def __init__(self, adapter: Adapter, inputs: Inputs, batches: list[tuple[int, int]],
                 cands: dict[str, torch.Tensor], candidate_batch: int | None, show_progress: bool,
                 compute: torch.dtype = torch.float32, memory_gb: float = DEFAULT_MEMORY_GB,
                 reference: Reference | None = None) -> None:
        self.adapter, self.inputs, self.batches, self.cands = adapter, inputs, batches, cands
        self.compute, self.memory_gb = compute, memory_gb
        self.topology = adapter.topology()
        self.candidate_batch = candidate_batch
        self.show_progress = show_progress
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.dtype = next(adapter.model.parameters()).dtype
        self.reference = reference

    # ---------------------------------------------------------------- set-up
    def _teacher(self) -> None:
        """The original's outputs (once) and the streams entering the first unit: the shared
        :class:`~upvit.importance.reference.Reference`; the candidate batch from the token rows and memory."""
        if self.reference is None:
            self.reference = Reference(self.adapter, self.inputs, batches=self.batches)
        streams = self.reference.entry
        x0 = streams[0].x
        tokens = max(1, x0[0].numel() // x0.shape[-1])
        rows = self.reference.rows(0)
        self.C = self.candidate_batch or min(self.reference.candidate_batch(), self._memory_cap(streams, rows, tokens))

    def _memory_cap(self, streams: list[Stream], rows: int, tokens: int) -> int:
        """The candidate batch whose stacked activations fit ``memory_gb`` beside the weights and caches.
        (Keep when refactoring: it needs the widest site's sizes, the cached streams and the weights.)"""
        model = self.adapter.model
        fixed = sum(p.numel() * p.element_size() for p in model.parameters())
        fixed += sum(st.x.numel() * st.x.element_size() for st in streams)
        width = int(streams[0].x.shape[-1])
        by_kind: dict[str, int] = {}
        for s in self.topology.sites:
            by_kind[s.kind] = max(by_kind.get(s.kind, 0), s.size)
        hidden = max(by_kind.get("ffn", 4 * width), width)
        heads = max([s.heads or 1 for s in self.topology.sites if s.kind == "attn"] or [1])
        # hierarchical models (several stages) attend within windows or over reduced keys: no tokens x tokens matrix
        keys = tokens if len({s.stage for s in self.topology.sites}) == 1 else min(tokens, 64)
        return candidate_batch_for_memory(self.memory_gb, rows, tokens, width, hidden, heads, fixed,
                                          4 if self.compute == torch.float32 else 2, keys)

    def _plan_work(self, done: dict[str, torch.Tensor]) -> None:
        """Fixed work units (site, chunk of C candidates); unit u belongs to rank u % world."""
        self.chunks: dict[str, list[torch.Tensor]] = {}
        self.mine: dict[str, list[bool]] = {}
        counter = 0
        for site in self.topology.sites:
            idx = self.cands.get(site.key)
            chunks = list(idx.split(self.C)) if idx is not None else []
            self.chunks[site.key] = chunks
            self.mine[site.key] = [(counter + i) % self.world == self.rank for i in range(len(chunks))]
            counter += len(chunks)
        U = len(self.topology.units)
        # cost of one candidate on one input, in forward passes of the whole model: the units it runs
        self.cost = {s.key: max(1, U - max(self.topology.start_unit(s.key), 0)) / U for s in self.topology.sites}
        self.total_cost = sum(len(c) * self.cost[s.key] for s in self.topology.sites if s.key not in done
                              for c, m in zip(self.chunks[s.key], self.mine[s.key]) if m) * batch_len(self.inputs)

    # ---------------------------------------------------------------- the run
    def run(self, done: dict[str, torch.Tensor],
            persist: Callable[[str, dict[str, torch.Tensor]], None]) -> dict[str, torch.Tensor]:
        unit = "seq-fwd" if isinstance(self.inputs, dict) else "img-fwd"
        with job(f"{criterion_name(self.adapter.divergence)} exact", unit=unit, show=self.show_progress) as bar:
            self.bar = bar
            self._teacher()
            self._plan_work(done)
            bar.extend(self.total_cost)
            bar.begin()  # the estimate measures the scoring itself: its first candidates are the warm-up
            result: dict[str, torch.Tensor] = dict(done)
            by_start: dict[int, list[Site]] = {}
            for site in self.topology.sites:
                by_start.setdefault(self.topology.start_unit(site.key), []).append(site)
            for site in by_start.get(-1, []):
                self._score(site, -1, None, result, persist)
            for i, streams in self.reference.walk():  # the stream cache, advanced unit by unit
                for site in by_start.get(i, []):
                    self._score(site, i, streams, result, persist)
        return result

    def _score(self, site: Site, start: int, streams: list[Stream] | None, result: dict[str, torch.Tensor],
               persist: Callable[[str, dict[str, torch.Tensor]], None]) -> None:
        """Score one site from the unit where its mask first acts; persist it."""
        key = site.key
        if key in result:
            return
        full = torch.full((site.size,), float("nan"), dtype=torch.float64)
        idx_all = self.cands.get(key)
        if idx_all is not None:
            acc = torch.zeros(idx_all.numel(), dtype=torch.float64, device=self.reference.device)
            offsets = [0]
            for chunk in self.chunks[key]:
                offsets.append(offsets[-1] + len(chunk))
            for n, (s, e) in enumerate(self.batches):
                rank1 = None
                if site.kind == "ffn" and streams is not None and any(self.mine[key]):
                    rank1 = self.adapter.ffn_rank1(key, streams[n])
                for i, chunk in enumerate(self.chunks[key]):
                    if not self.mine[key][i]:
                        continue
                    logits = self._candidates(site, start, n, chunk, streams, rank1)
                    acc[offsets[i]:offsets[i + 1]] += self.reference.divergence(n, logits)
                    self.bar.detail(key)
                    self.bar.update(len(chunk) * (e - s) * self.cost[key])
            full[idx_all] = dist_utils.all_reduce_sum(acc).cpu()
        result[key] = full
        persist(key, result)

    def _candidates(self, site: Site, start: int, n: int, idx: torch.Tensor, streams: list[Stream] | None,
                    rank1: tuple[Stream, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Logits ``[C, B, E, K]`` of the model with channel ``idx[c]`` of ``site`` removed, for batch ``n``."""
        a, topo = self.adapter, self.topology
        s, e = self.batches[n]
        rows, C = e - s, len(idx)
        if rank1 is not None:
            out, acts, dirs = rank1
            if start == len(topo.units) - 1 and topo.head_tokens:
                out, acts = out.head_only(topo.head_tokens), acts[:, :topo.head_tokens]
            idx_d = idx.to(acts.device)
            act = acts.index_select(-1, idx_d).movedim(-1, 0).unsqueeze(-1)  # [C, B, ..., 1]
            direction = dirs.index_select(0, idx_d).view(C, *([1] * (act.dim() - 2)), -1)
            x = (out.x.unsqueeze(0) - act * direction).reshape(C * rows, *out.x.shape[1:])
            stream = Stream(x, {k: v.repeat(C, *([1] * (v.dim() - 1))) for k, v in out.batch.items()}, dict(out.info))
            with self._precision():
                logits = forward_from(a, stream, start + 1, topo)
        else:
            mask = removal_masks(site.size, idx, rows, torch.empty(0, dtype=self.dtype, device=self.reference.device))
            with a.masking(Masks({site.key: mask})), self._precision():
                return self.reference.run(n, start, C, streams).to(self.dtype)
        return logits.view(C, rows, *logits.shape[1:]).to(self.dtype)

    def _precision(self):
        """Reduced precision (``compute``) for the candidates' forwards only: the teacher's reference and
        the cached streams are computed outside it, the KL in float64. (Keep when refactoring: every
        candidate forward runs inside this, nothing else does.)"""
        if self.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.reference.device.type, dtype=self.compute)


# --------------------------------------------------------------------------------------- persistence
def _save_state(out: str, fp: str, result: dict[str, torch.Tensor], wall: float) -> None:
    """Atomically write the finished sites to ``out + '.partial'`` (never mistaken for a scores file:
    it has no complete set of sites and its metadata says so)."""
    from ..io import save_tensors

    meta = {"format": PARTIAL_FORMAT, "fingerprint": fp, "done": json.dumps(sorted(result)), "wall_time_s": repr(wall),
            "fingerprint_parts": json.dumps(getattr(fp, "parts", None))}
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
            raise UpvitError(f"cannot resume from {path}: {_resume_mismatch(meta.get('fingerprint_parts'), fp)}; "
                             "or drop --resume to start over")
        done = {k[len("partial/"):]: v for k, v in tensors.items()}
        return done, float(meta.get("wall_time_s", "0")), None
    if os.path.exists(out):
        scores = Scores.load(out)
        if scores.meta.get("fingerprint") != fp:
            raise UpvitError(f"cannot resume: {out} holds other scores: "
                             f"{_resume_mismatch(scores.meta.get('fingerprint_parts'), fp)}; or drop --resume and "
                             "add --force to overwrite it")
        return {}, 0.0, scores
    return {}, 0.0, None
