"""Exact KL scoring at real size: rates against the machine's matmul rate, reduced precision, memory,
the fast scorers verified against exact, and the projected cost of the paper's setting.

    .venv/bin/python benchmarks/scale.py                     # every part not yet in the results (resumable)
    .venv/bin/python benchmarks/scale.py --parts rates       # one part again (rates, memory, bf16, fast)
    .venv/bin/python benchmarks/scale.py --smoke --out /tmp/scale   # seconds, tiny models (the test suite)

Parts (each stored in benchmarks/results/scale.json as soon as it finishes; a rerun skips finished parts
unless named in --parts):

* ``rates``: DeiT-S and DeiT-B shapes at 224 px (seeded random weights: speed does not depend on them), a
  seeded sample of candidates of one site per kind (residual, a middle block's attention and FFN),
  fp32 and bf16. A candidate's cost is the difference of two runs (k+1 and 1 candidates), so the
  teacher's forward and the cache advance are not counted; its FLOPs are counted the same way with
  torch's FlopCounterMode. The engine-shaped matmul rate (fp32 and bf16) is measured before and after
  each engine measurement, so the achieved fraction is a ratio within one stretch of machine load.
* ``memory``: peak resident memory (ru_maxrss) of a fresh process scoring a full candidate stack of
  DeiT-B at 224 px with the default budget, and with a 2 GiB budget.
* ``bf16``: the shipped teacher's exact scores in fp32 and bf16 on one proxy set: error per site kind
  and keep-set differences at the S (96/6/384) and T (48/3/192) targets.
* ``fast``: exact (fp32) vs fisher vs hybrid on a ViT-S at 56 px: the converted DINOv2 ViT-S/14 with
  its emoji head (runs/dinov2/emoji_teacher_112, position table resized) when present, else a
  DeiT-S shape (``--fast-model``, ``--fast-px``, ``--fast-images``); per site kind fisher's speed-up and
  Spearman against exact; per target (Ti-like 192/3/768, mild 288/6/1152) hybrid's exact fraction (per
  kind), speed-up and keep-set differences, with a diagnosis of each differing channel (its value in both
  runs, the exact gap to the channel it swapped with, the engine's error on the channels both scored
  exactly). Times: per-core CPU seconds with one thread (``OMP_NUM_THREADS=1``). Every stage (exact,
  fisher, each hybrid target) persists under ``--runs`` (default runs/scale/): a rerun reuses finished
  stages and exact resumes site by site.
* the projection (always recomputed): the paper's setting (DeiT-B, 224 px, 2,000 images) for exact
  (fp32, bf16), hybrid and fisher from the measured rates.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UPVIT_NO_PROGRESS", "1")

from _machine import machine  # noqa: E402 (benchmarks/ is on sys.path)
from upvit.adapters import get_adapter  # noqa: E402
from upvit.importance.kl import cpu_bf16_native, kl_scores  # noqa: E402
from upvit.models import load_model  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
VIT = "timm:vit_base_patch16_224,img_size={px},patch_size={patch},num_classes={classes},embed_dim={e},depth={d}," \
      "num_heads={h},mlp_ratio=4.0"
SHAPES = {"deit_s": dict(e=384, d=12, h=6), "deit_b": dict(e=768, d=12, h=12)}
SMOKE_SHAPES = {"tiny_s": dict(e=32, d=4, h=2), "tiny_b": dict(e=48, d=4, h=4)}
TEACHER = os.path.join(ROOT, "upvit", "assets", "teacher")
EMOJI = os.path.join(ROOT, "runs", "dinov2", "emoji_teacher_112")
TEACHER_TARGETS = {"S": dict(embed_dim=96, num_heads=6, mlp_hidden=384),
                   "T": dict(embed_dim=48, num_heads=3, mlp_hidden=192)}
VIT_S_TARGETS = {"Ti-like": dict(embed_dim=192, num_heads=3, mlp_hidden=768),
                 "mild": dict(embed_dim=288, num_heads=6, mlp_hidden=1152)}
PAPER = dict(images=2000, shape="deit_b")


# ------------------------------------------------------------------------------------------ machine


def clock() -> float:
    """Process CPU time with one thread (the shared machine's load then does not enter the rates: a
    descheduled process accrues none), wall time with several threads (CPU time would count spinning)."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def clock_name() -> str:
    return ("process CPU time, 1 thread" if torch.get_num_threads() == 1
            else f"wall time, {torch.get_num_threads()} threads")


def matmul_rate(rows: int, width: int, dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of an engine-shaped product [rows, width] @ [width, 4 width] in ``dtype``."""
    a, b = torch.randn(rows, width).to(dtype), torch.randn(width, 4 * width).to(dtype)
    a @ b
    reps, t0, w0 = 0, clock(), time.perf_counter()
    while time.perf_counter() - w0 < seconds or reps < 2:
        a @ b
        reps += 1
    return 2 * rows * width * 4 * width * reps / max(clock() - t0, 1e-9)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from fast_scoring import spearman as sp

    return sp(a, b)


# ------------------------------------------------------------------------------------------ rates
def _timed(adapter, images, key, idx, dtype) -> tuple[float, torch.Tensor]:
    t0 = clock()
    s = kl_scores(adapter, images, candidates={key: idx}, dtype=dtype, progress=False)
    return clock() - t0, s[key][idx]


def _flops(adapter, images, key, idx) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        kl_scores(adapter, images, candidates={key: idx}, progress=False)
    return float(counter.get_total_flops())


def part_rates(cfg: dict) -> dict:
    out = {}
    for name, shape in cfg["shapes"].items():
        spec = VIT.format(px=cfg["px"], patch=cfg["patch"], classes=cfg["classes"], **shape)
        model = load_model(spec, init_seed=0).eval()
        adapter = get_adapter(model)
        images = torch.randn(cfg["images"], 3, cfg["px"], cfg["px"], generator=torch.Generator().manual_seed(0))
        mid = shape["d"] // 2
        tokens = (cfg["px"] // cfg["patch"]) ** 2 + 1
        rows = cfg["k"] * cfg["images"] * tokens
        g = torch.Generator().manual_seed(1)
        res: dict = {"spec": spec, "images": cfg["images"], "candidates_per_site": cfg["k"], "sites": {},
                     "clock": clock_name(), "native_bf16": cpu_bf16_native()}
        for kind, key in (("residual", "res.0"), ("attn", f"attn.{mid}"), ("ffn", f"ffn.{mid}")):
            size = adapter.topology().site(key).size
            idx = torch.randperm(size, generator=g)[:cfg["k"] + 1].sort().values
            # FLOPs per candidate-image: difference of 3 and 1 candidates on one image (same work per candidate)
            one = images[:1]
            f_per = (_flops(adapter, one, key, idx[:3]) - _flops(adapter, one, key, idx[:1])) / 2
            row: dict = {"site": key, "flop_per_candidate_image": f_per}
            scores = {}
            for dname, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                if dname == "bf16" and not (cfg["smoke"] or cpu_bf16_native() or (name == "deit_s" and kind == "ffn")):
                    # emulated bf16 GEMMs (no AVX-512 BF16 / AMX) run tens of times slower than fp32: one site shows it
                    row[dname] = {"skipped": "no native bf16 on this CPU: measured on deit_s ffn only",
                                  "candidate_images_per_s": None, "fraction_of_matmul": None,
                                  "matmul_flop_per_s": matmul_rate(rows, shape["e"], dt, cfg["mm_seconds"])}
                    continue
                mm_before = matmul_rate(rows, shape["e"], dt, cfg["mm_seconds"])
                t1, _ = _timed(adapter, images, key, idx[:1], dname)
                tk, sc = _timed(adapter, images, key, idx, dname)
                mm_after = matmul_rate(rows, shape["e"], dt, cfg["mm_seconds"])
                scores[dname] = sc
                # candidate-images per second; None when load noise hides the difference (tiny smoke shapes)
                rate = cfg["images"] * cfg["k"] / (tk - t1) if tk > t1 else None
                mm = (mm_before + mm_after) / 2
                row[dname] = {"seconds_k_plus_1": tk, "seconds_1": t1,
                              "candidate_images_per_s": rate, "flop_per_s": rate and rate * f_per,
                              "matmul_flop_per_s": mm, "matmul_before_after": [mm_before, mm_after],
                              "fraction_of_matmul": rate and rate * f_per / mm, "load_after": os.getloadavg()[0]}
            if "bf16" in scores:
                a, b = scores["fp32"], scores["bf16"]
                row["bf16_max_rel_err_vs_site_max"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
                row["bf16_spearman"] = spearman(a, b) if len(a) > 2 else None
            rf, rb = row["fp32"]["candidate_images_per_s"], row["bf16"]["candidate_images_per_s"]
            row["bf16_speedup"] = rb / rf if rf and rb else None
            res["sites"][kind] = row
            print(f"  {name} {kind}: fp32 {rf} cand-img/s ({row['fp32']['fraction_of_matmul']} of matmul), bf16 {rb} "
                  f"({row['bf16']['fraction_of_matmul']}), load {os.getloadavg()[0]:.1f}", flush=True)
        # fisher and hybrid's screen per image, on the same model (for the projection)
        from upvit.importance.fisher import fisher_scores

        n = cfg["images"]
        for what, opts in (("fisher_s_per_image", {}), ("fisher_local_attn_s_per_image", {"attention": "local"})):
            t0 = clock()
            fisher_scores(adapter, images, batch_size=n, progress=False, **opts)
            res[what] = (clock() - t0) / n
        topo = adapter.topology()
        U = len(topo.units)
        res["sites_all"] = [{"key": s.key, "kind": s.kind, "size": s.size,
                             "cost": max(1, U - max(topo.start_unit(s.key), 0)) / U} for s in topo.sites]
        out[name] = res
        del model, adapter
    return out


# ------------------------------------------------------------------------------------------ memory
def memory_child(spec: str, images: int, memory_gb: float | None, key: str, px: int) -> dict:
    """Run in a fresh process: peak RSS after loading, and after scoring one full candidate stack."""
    model = load_model(spec, init_seed=0).eval()
    adapter = get_adapter(model)
    x = torch.randn(images, 3, px, px, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x[:1])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    site = adapter.topology().site(key)
    # enough candidates to fill one automatic stack: probe the batch the engine picks with one candidate
    probe = kl_scores(adapter, x, candidates={key: [0]}, memory_gb=memory_gb, progress=False)
    C = int(probe.meta["candidate_batch_used"])
    t0 = time.perf_counter()
    kl_scores(adapter, x, candidates={key: list(range(min(C, site.size)))}, memory_gb=memory_gb, progress=False)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"spec": spec, "images": images, "site": key, "memory_gb": memory_gb, "candidate_batch": C,
            "stacked_images": C * images, "rss_after_load_bytes": base, "peak_rss_bytes": peak,
            "peak_gib": peak / 2**30, "scoring_increase_gib": (peak - base) / 2**30, "wall_s": round(wall, 2)}


def part_memory(cfg: dict) -> dict:
    shape = cfg["shapes"][list(cfg["shapes"])[-1]]
    spec = VIT.format(px=cfg["px"], patch=cfg["patch"], classes=cfg["classes"], **shape)
    key = f"attn.{shape['d'] - 1}"
    out = {}
    for label, budget in (("default", None), ("2GiB", 2.0))[:1 if cfg["smoke"] else 2]:
        args = [sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(
            {"spec": spec, "images": cfg["mem_images"], "memory_gb": budget, "key": key, "px": cfg["px"]})]
        p = subprocess.run(args, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise SystemExit(f"memory child failed: {p.stderr[-2000:]}")
        out[label] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  memory {label}: peak {out[label]['peak_gib']:.2f} GiB, stack {out[label]['stacked_images']} images",
              flush=True)
    return out


# ------------------------------------------------------------------------------------------ bf16
def keep_diff(model, a, b, target) -> dict:
    """Channels whose keep/drop decision differs between scores a and b at ``target``, per component."""
    from upvit.plan import make_plan

    pa, pb = make_plan(model, a, **target), make_plan(model, b, **target)
    return {"embed": len(set(pa.keep_embed) ^ set(pb.keep_embed)) // 2,
            "attn": sum(len(set(x) ^ set(y)) for x, y in zip(pa.keep_attn, pb.keep_attn)) // 2,
            "ffn": sum(len(set(x) ^ set(y)) for x, y in zip(pa.keep_ffn, pb.keep_ffn)) // 2}


def error_by_kind(a, b, topology) -> dict:
    out = {}
    for kind in ("residual", "attn", "ffn"):
        keys = [s.key for s in topology.sites if s.kind == kind]
        rel, med, sp = [], [], []  # a and b: Scores, or {site key: scores of the sampled channels}
        for k in keys:
            x, y = a[k].double(), b[k].double()
            top = x.abs().max().clamp_min(1e-300)
            rel.append(float((x - y).abs().max() / top))
            med.append(float(((x - y).abs() / x.abs().clamp_min(1e-300)).median()))
            sp.append(spearman(x, y))
        out[kind] = {"max_abs_err_over_site_max": max(rel), "median_rel_err": float(torch.tensor(med).median()),
                     "min_spearman": min(sp)}
    return out


def part_bf16(cfg: dict) -> dict:
    from upvit.data import load_data, sample_proxy
    from upvit.importance.api import proxy_tensor

    if cfg["smoke"] or not os.path.isfile(os.path.join(TEACHER, "config.json")):
        from upvit.models import ModelConfig  # noqa: F401  (tiny stand-in below)

        spec = VIT.format(px=16, patch=4, classes=10, e=24, d=2, h=4).replace("num_classes", "in_chans=1,num_classes")
        model = load_model(spec, init_seed=0).eval()
        images = torch.randn(cfg["bf16_images"], 1, 16, 16, generator=torch.Generator().manual_seed(0))
        desc, targets = spec, {"S": dict(embed_dim=12, num_heads=2, mlp_hidden=48),
                               "T": dict(embed_dim=6, num_heads=1, mlp_hidden=24)}
    else:
        model = load_model(TEACHER).eval()
        ds, _ = load_data("animal-mnist:train", data_config=model.upvit_config.data_config or None)
        subset, _ = sample_proxy(ds, size=cfg["bf16_images"], seed=0)
        images, desc, targets = proxy_tensor(subset), "upvit/assets/teacher", TEACHER_TARGETS
    adapter = get_adapter(model)
    cands, frac = None, cfg.get("bf16_fraction", 1.0)
    if frac < 1:  # a seeded sample of every site's channels (emulated bf16 cannot afford them all)
        g = torch.Generator().manual_seed(0)
        cands = {s.key: torch.randperm(s.size, generator=g)[:max(3, round(s.size * frac))].tolist()
                 for s in adapter.topology().sites}
    t0 = clock()
    a = kl_scores(adapter, images, progress=False, candidates=cands)
    t_fp32 = clock() - t0
    t0 = clock()
    b = kl_scores(adapter, images, progress=False, dtype="bf16", candidates=cands)
    t_bf16 = clock() - t0
    if cands is not None:
        a = {k: a[k][torch.tensor(v)] for k, v in cands.items()}
        b = {k: b[k][torch.tensor(v)] for k, v in cands.items()}
    out = {"model": desc, "proxy_images": len(images), "fp32_s": round(t_fp32, 2), "bf16_s": round(t_bf16, 2),
           "clock": clock_name(), "channels_fraction": frac,
           "error_by_kind": error_by_kind(a, b, adapter.topology()), "load_after": os.getloadavg()[0]}
    if cands is None:
        out["keep_set_differences"] = {t: keep_diff(model, b, a, tg) for t, tg in targets.items()}
    else:
        out["keep_set_differences"] = "not computed: a sample of channels was scored (keep sets need them all)"
    return out


# ------------------------------------------------------------------------------------------ fast
def vit_s_at(px: int, path: str = EMOJI):
    """The emoji-headed DINOv2 ViT-S/14 at ``px`` (position table resized as the conversion does, without
    antialiasing), or a DeiT-S shape with seeded random weights when the converted model is absent."""
    from upvit.io import load_tensors

    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        spec = VIT.format(px=px, patch=16, classes=1000, **SHAPES["deit_s"])
        return load_model(spec, init_seed=0).eval(), f"{spec} (random weights: {path} absent)", None
    from timm.layers import resample_abs_pos_embed

    spec = f"timm:vit_small_patch14_dinov2,img_size={px},num_classes=9"
    model = load_model(spec, init_seed=0).eval()
    state, _ = load_tensors(os.path.join(path, "model.safetensors"))
    g = px // 14
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (g, g), num_prefix_tokens=1,
                                                interpolation="bicubic",
                                                antialias=False)
    model.load_state_dict(state, strict=True)
    return model, f"{os.path.relpath(path, ROOT)} at {px} px (pos_embed resized 8x8 -> {g}x{g})", "emoji"


def _stage(path: str, compute):
    """A stage of the fast part whose result (scores + timing) persists beside ``path``: a rerun reuses it.
    ``compute()`` returns (Scores, timing dict); the timing records per-core CPU and wall seconds."""
    from upvit.importance.scores import Scores

    if os.path.exists(path) and os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            return Scores.load(path), json.load(f)
    scores, timing = compute()
    scores.save(path)
    timing = {**timing, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    with open(path + ".json", "w") as f:
        json.dump(timing, f, indent=2)
    return scores, timing


def _exact_timed(adapter, images, out: str, batch_size: int, progress: bool):
    """Exact KL of every channel, resumable (``out`` + '.partial'); per-site CPU seconds (this process's
    clock between two persisted sites) accumulate in ``out + '.sites.json'`` across resumes."""
    side = out + ".sites.json"
    sites = {}
    if os.path.exists(side):
        with open(side) as f:
            sites = json.load(f)
    last = [clock(), time.perf_counter()]

    def done(key: str) -> None:
        c, w = clock(), time.perf_counter()
        sites[key] = {"cpu_s": c - last[0], "wall_s": w - last[1], "load": round(os.getloadavg()[0], 2)}
        last[:] = [c, w]
        with open(side, "w") as f:
            json.dump(sites, f, indent=1)

    def compute():
        s = kl_scores(adapter, images, out=out + ".run", resume=True, batch_size=batch_size, progress=progress,
                      callback=done)
        return s, {"cpu_s": sum(v["cpu_s"] for v in sites.values()), "wall_s": sum(v["wall_s"] for v in sites.values()),
                   "sites": sites, "clock": clock_name(), "resumed": bool(s.meta.get("resumed"))}
    return _stage(out, compute)


def keep_swaps(model, scores, exact, target) -> list[dict]:
    """The channels whose keep decision differs between ``scores`` and ``exact`` at ``target``, per
    selection problem (site, merged head group for attention): the ones only exact keeps and the ones only
    ``scores`` keeps."""
    from upvit.plan import make_plan
    from upvit.selection import problems

    topo = get_adapter(model).topology()
    t = __import__("upvit.targets", fromlist=["Targets"]).Targets.parse(topo, target)
    pa, pb = make_plan(model, scores, **target), make_plan(model, exact, **target)
    kept_a = {"res.0": set(pa.keep_embed), **{f"attn.{b}": set(x) for b, x in enumerate(pa.keep_attn)},
              **{f"ffn.{b}": set(x) for b, x in enumerate(pa.keep_ffn)}}
    kept_b = {"res.0": set(pb.keep_embed), **{f"attn.{b}": set(x) for b, x in enumerate(pb.keep_attn)},
              **{f"ffn.{b}": set(x) for b, x in enumerate(pb.keep_ffn)}}
    out = []
    for p in problems(topo, t):
        ch = set(int(c) for c in p.channels)
        only_exact, only_scores = (sorted((kept_b[p.site] - kept_a[p.site]) & ch),
                                   sorted((kept_a[p.site] - kept_b[p.site]) & ch))
        if only_exact or only_scores:
            out.append({"site": p.site, "group": [min(ch), max(ch) + 1], "k": p.k,
                        "only_exact_keeps": only_exact, "only_scores_keeps": only_scores})
    return out


def diagnose(model, hyb, exact, target, screen=None) -> dict:
    """Why hybrid's keep sets differ from exact's: for every differing channel its value in both runs, whether
    hybrid scored it exactly, the exact gap to the channel it swapped with (relative to their size), and the
    engine's own error: |hybrid exact value - full run value| / value over every channel both scored exactly
    (hybrid stacks other candidates per forward than the full run). With ``screen`` (hybrid's estimate), a
    channel hybrid did not score exactly also gets its screen error: |log(exact / calibrated estimate)| against
    the margin hybrid required (the larger of z sigma and tail x the largest error among the site's exactly
    scored channels, from hybrid's final calibration)."""
    import math

    from upvit.importance.hybrid import _calibration
    known = hyb.meta.get("exact_channels") or {}
    errs = {}
    for k, idx in known.items():
        if idx:
            ix = torch.tensor(idx)
            a, b = hyb[k].double()[ix], exact[k].double()[ix]
            errs[k] = ((a - b).abs() / b.abs().clamp_min(1e-300))
    allerr = torch.cat(list(errs.values())) if errs else torch.zeros(1)
    swaps = keep_swaps(model, hyb, exact, target)
    for s in swaps:
        k = s["site"]
        sk = set(known.get(k, []))
        calib = None
        if screen is not None:
            known_k = torch.zeros(len(exact[k]), dtype=torch.bool)
            known_k[torch.tensor(sorted(sk), dtype=torch.long)] = True
            mu, sigma, max_dev = _calibration(screen[k].double(), exact[k].double(), known_k)
            calib = {"mu": mu, "sigma": sigma, "z_sigma": hyb.meta["z"] * sigma, "max_dev_scored": max_dev,
                     "margin": max(hyb.meta["z"] * sigma, hyb.meta["tail"] * max_dev)}
            s["calibration"] = calib

        def rec(c):
            r = {"channel": c, "exact": float(exact[k][c]), "hybrid": float(hyb[k][c]),
                 "hybrid_scored_exactly": c in sk}
            if calib is not None and c not in sk:
                r["screen_log_error"] = abs(math.log(float(exact[k][c]) / float(screen[k][c])) - calib["mu"])
            return r
        s["only_exact_keeps"] = [rec(c) for c in s["only_exact_keeps"]]
        s["only_scores_keeps"] = [rec(c) for c in s["only_scores_keeps"]]
        xs = [r["exact"] for r in s["only_exact_keeps"]] + [r["exact"] for r in s["only_scores_keeps"]]
        s["exact_gap_rel"] = (max(xs) - min(xs)) / max(abs(v) for v in xs) if xs else None
        s["site_engine_rel_err_max"] = float(errs[k].max()) if k in errs else None
    return {"engine_rel_err": {"max": float(allerr.max()), "median": float(allerr.median()),
                               "bit_identical_fraction": float((allerr == 0).double().mean())},
            "swaps": swaps}


def tail_sweep(adapter, model, images, exact, targets, n: int, tails=(1.6, 2.0, 2.5, 3.0, 4.0)) -> list[dict]:
    """Hybrid's decision rule replayed for other ``tail`` margins with the full run's exact values standing in
    for its exact rounds (valid where its rounds gave bit-identical values, as the diagnosis checks): per tail
    and target, the keep-set differences and the share of channels (and of exact's CPU time, from the per-site
    times) it would score exactly. Costs the screens only."""
    import upvit.importance.kl as klmod
    from upvit.importance.hybrid import hybrid_scores

    sites = {s.key: s.size for s in adapter.topology().sites}
    cost = {k: exact.meta.get("site_cpu_s", {}).get(k) for k in sites}
    real = klmod.kl_scores
    klmod.kl_scores = lambda *a, **kw: {k: exact[k] for k in sites}  # hybrid imports it at call time
    out = []
    try:
        for tail in tails:
            for tname, tg in targets.items():
                h = hybrid_scores(adapter, images, targets=[tg], batch_size=n, progress=False, tail=tail)
                row = {"tail": tail, "target": tname, "exact_fraction": h.meta["exact_fraction"],
                       "rounds": h.meta["rounds"],
                       "keep_set_differences_vs_exact": keep_diff(model, h, exact, tg)}
                if all(c is not None for c in cost.values()):
                    row["exact_cpu_fraction"] = sum(len(v) * cost[k] / sites[k] for k, v in
                                                    h.meta["exact_channels"].items()) / sum(cost.values())
                out.append(row)
    finally:
        klmod.kl_scores = real
    return out


def part_fast(cfg: dict) -> dict:
    """Exact vs fisher vs hybrid on one model and proxy set. Each stage persists under cfg['runs'] (a rerun
    reuses finished stages; exact resumes site by site). Times: per-core CPU seconds with one thread."""
    from upvit.importance.fisher import fisher_scores
    from upvit.importance.hybrid import hybrid_scores

    if cfg["smoke"]:
        spec = VIT.format(px=16, patch=4, classes=10, e=24, d=2, h=4)
        model, desc, data = load_model(spec, init_seed=0).eval(), spec, None
        targets = {"Ti-like": dict(embed_dim=12, num_heads=2, mlp_hidden=48),
                   "mild": dict(embed_dim=16, num_heads=4, mlp_hidden=64)}
        px, chans = 16, 3
    else:
        model, desc, data = vit_s_at(cfg["fast_px"], cfg.get("fast_model") or EMOJI)
        targets, px, chans = VIT_S_TARGETS, cfg["fast_px"], 3
    adapter = get_adapter(model)
    n = cfg["fast_images"]
    if data == "emoji":
        from upvit.data import load_data, sample_proxy
        from upvit.importance.api import proxy_tensor

        dc = {**model.upvit_config.data_config, "input_size": [3, px, px]} if model.upvit_config.data_config else \
            {"input_size": [3, px, px], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 1.0,
             "interpolation": "bicubic"}
        ds, _ = load_data("emoji:train", data_config=dc)
        subset, _ = sample_proxy(ds, size=n, seed=0)
        images, proxy = proxy_tensor(subset), f"emoji:train, {n} images, seed 0, {px} px"
    else:
        images = torch.randn(n, chans, px, px, generator=torch.Generator().manual_seed(0))
        proxy = f"{n} seeded Gaussian images at {px} px"
    os.makedirs(cfg["runs"], exist_ok=True)
    stem = os.path.join(cfg["runs"], f"fast_{px}px_p{n}")
    print(f"  fast: {desc}; {proxy}; stages persist as {stem}_*", flush=True)
    exact, te = _exact_timed(adapter, images, stem + "_exact.safetensors", n, progress=not cfg["smoke"])
    print(f"  exact: {te['cpu_s']:.1f} s CPU", flush=True)

    def timed(fn):
        def compute():
            c, w = clock(), time.perf_counter()
            s = fn()
            return s, {"cpu_s": clock() - c, "wall_s": time.perf_counter() - w, "clock": clock_name()}
        return compute

    fisher, tf = _stage(stem + "_fisher.safetensors",
                        timed(lambda: fisher_scores(adapter, images, batch_size=n, progress=False)))
    print(f"  fisher: {tf['cpu_s']:.2f} s CPU", flush=True)
    topo = adapter.topology()
    kinds = {}
    for kind in ("residual", "attn", "ffn"):
        keys = [s.key for s in topo.sites if s.kind == kind]
        cpu = sum(te["sites"][k]["cpu_s"] for k in keys)
        kinds[kind] = {"sites": len(keys), "channels": sum(topo.site(k).size for k in keys), "exact_cpu_s": cpu,
                       # fisher scores every kind in one pass: its whole time set against this kind's exact time
                       "fisher_speedup_vs_exact_kind": cpu / tf["cpu_s"],
                       "spearman_pooled": spearman(torch.cat([fisher[k] for k in keys]),
                                                   torch.cat([exact[k] for k in keys])),
                       "spearman_min_per_site": min(spearman(fisher[k], exact[k]) for k in keys),
                       "spearman_per_site": {k: spearman(fisher[k], exact[k]) for k in keys}}
    # hybrid's screen (Fisher, attention by the local estimate), for the diagnosis of any differing channel
    screen = fisher_scores(adapter, images, batch_size=n, progress=False, attention="local")
    hyb = {}
    for tname, tg in targets.items():
        h, th = _stage(f"{stem}_hybrid_{tname}.safetensors",
                       timed(lambda tg=tg: hybrid_scores(adapter, images, targets=[tg], batch_size=n, progress=False)))
        counts = h.meta["exact_counts"]
        hyb[tname] = {"target": tg, "cpu_s": th["cpu_s"], "wall_s": th["wall_s"],
                      "speedup_vs_exact": te["cpu_s"] / th["cpu_s"],
                      "exact_fraction": h.meta["exact_fraction"], "rounds": h.meta["rounds"],
                      "exact_fraction_by_kind": {kind: sum(counts[s.key] for s in topo.sites if s.kind == kind) /
                                                 kinds[kind]["channels"] for kind in kinds},
                      "screen_wall_s": h.meta["fisher_time_s"], "exact_rounds_wall_s": h.meta["exact_time_s"],
                      "keep_set_differences_vs_exact": keep_diff(model, h, exact, tg),
                      "fisher_keep_set_differences_vs_exact": keep_diff(model, fisher, exact, tg),
                      "diagnosis": diagnose(model, h, exact, tg, screen), "timing": th}
        print(f"  hybrid {tname}: {th['cpu_s']:.1f} s CPU, {h.meta['exact_fraction']:.1%} exact, diffs "
              f"{hyb[tname]['keep_set_differences_vs_exact']}", flush=True)
    exact.meta["site_cpu_s"] = {k: v["cpu_s"] for k, v in te["sites"].items()}
    sweep = tail_sweep(adapter, model, images, exact, targets, n) if all(
        h["diagnosis"]["engine_rel_err"]["max"] == 0 for h in hyb.values()) else None
    return {"model": desc, "proxy": proxy, "images": n, "px": px, "clock": clock_name(), "tail_sweep": sweep,
            "exact_cpu_s": te["cpu_s"], "exact_wall_s": te["wall_s"], "exact_timing": te,
            "fisher_cpu_s": tf["cpu_s"], "fisher_wall_s": tf["wall_s"],
            "fisher_speedup_vs_exact": te["cpu_s"] / tf["cpu_s"],
            "kinds": kinds, "hybrid": hyb, "stages": os.path.relpath(stem, ROOT) + "_*",
            "load_after": os.getloadavg()[0]}


# ------------------------------------------------------------------------------------------ projection
def projection(report: dict, shape: str) -> dict | None:
    r = report.get("rates", {}).get(shape)
    if not r:
        return None
    N = PAPER["images"]
    out = {"images": N, "model_shape": shape}
    kinds = {}
    for dname in ("fp32", "bf16"):
        total, by_kind = 0.0, {}
        for s in r["sites_all"]:  # per kind: the measured middle-block rate, scaled by the site's remaining work
            m = r["sites"][s["kind"]]
            ref_cost = next(x["cost"] for x in r["sites_all"] if x["key"] == m["site"])
            rate = m[dname]["candidate_images_per_s"]
            t = s["size"] * N * (s["cost"] / ref_cost) / rate if rate else float("nan")
            total += t
            by_kind[s["kind"]] = by_kind.get(s["kind"], 0.0) + t / 3600
        out[f"exact_{dname}_hours"] = total / 3600
        kinds[dname] = by_kind
    out["exact_fp32_hours_by_kind"] = kinds["fp32"]
    fast = report.get("fast") or {}
    out["fisher_hours"] = r["fisher_s_per_image"] * N / 3600
    hyb = (fast.get("hybrid") or {}).values()
    if hyb and all("exact_fraction_by_kind" in h for h in hyb):
        # per kind, the largest exact fraction the fast part measured (over its targets) of exact's time on that kind
        frac = {k: max(h["exact_fraction_by_kind"][k] for h in hyb) for k in kinds["fp32"]}
        out["hybrid_exact_fraction_by_kind_used"] = frac
        out["hybrid_hours"] = r["fisher_local_attn_s_per_image"] * N / 3600 + sum(
            frac[k] * kinds["fp32"][k] for k in frac)
        out["hybrid_exact_fraction_used"] = (out["hybrid_hours"] - r["fisher_local_attn_s_per_image"] * N / 3600) / \
            out["exact_fp32_hours"]
    elif hyb:
        frac = max(h["exact_fraction"] for h in hyb)
        out["hybrid_exact_fraction_used"] = frac
        out["hybrid_hours"] = r["fisher_local_attn_s_per_image"] * N / 3600 + frac * out["exact_fp32_hours"]
    return out


# ------------------------------------------------------------------------------------------ report
def num(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def fast_markdown(f: dict) -> list[str]:
    """The fast part's section: per site kind fisher vs exact, per target hybrid vs exact and its diagnosis."""
    if "kinds" not in f:  # a result of the earlier format (wall times, no per-kind split)
        return ["", "## Fast scorers against exact", "", f"Model: {f['model']}; proxy: {f['proxy']} (earlier format: "
                f"exact {f['exact_s']:.1f} s, fisher {f['fisher_s']:.2f} s wall)."]
    L = ["", "## Fast scorers against exact", "", f"Model: {f['model']}; proxy: {f['proxy']}. Clock: {f['clock']} "
         "(per-core CPU seconds; wall seconds in the JSON).", "",
         f"Exact KL (fp32, every channel): **{f['exact_cpu_s']:,.0f} s** of one core. Fisher (every kind in one pass): "
         f"**{f['fisher_cpu_s']:.2f} s** = **{f['fisher_speedup_vs_exact']:,.0f}x** faster than exact "
         "(goal >= 1000x).", "",
         "| kind | sites | channels | exact CPU s | "
         "fisher speed-up vs exact's time on this kind | Spearman fisher vs exact "
         "(pooled) | worst site |", "|---|---|---|---|---|---|---|"]
    for k, s in f["kinds"].items():
        worst = min(s["spearman_per_site"], key=s["spearman_per_site"].get)
        L.append(f"| {k} | {s['sites']} | {s['channels']:,} | {s['exact_cpu_s']:,.0f} | "
                 f"{s['fisher_speedup_vs_exact_kind']:,.0f}x | "
                 f"{s['spearman_pooled']:.3f} | {worst} {s['spearman_min_per_site']:.3f} |")
    L += ["", "The fisher speed-up per kind sets fisher's whole time (it scores every kind in one pass) "
          "against exact's "
          "time on that kind alone, so it is a lower bound.", "",
          "| hybrid target | CPU s | speed-up vs exact | exact fraction (all / res / attn / ffn) | rounds | "
          "keep-set diffs vs "
          "exact (embed/attn/ffn) | fisher's diffs |", "|---|---|---|---|---|---|---|"]
    for t, h in f["hybrid"].items():
        d, fd, e = (h["keep_set_differences_vs_exact"], h["fisher_keep_set_differences_vs_exact"],
                    h["exact_fraction_by_kind"])
        tg = h["target"]
        L.append(f"| {t} ({tg['embed_dim']} / {tg['num_heads']} heads / {tg['mlp_hidden']}) | {h['cpu_s']:,.0f} | "
                 f"{h['speedup_vs_exact']:.1f}x | {h['exact_fraction']:.1%} / {e['residual']:.0%} / {e['attn']:.0%} / "
                 f"{e['ffn']:.0%} | {h['rounds']} | {d['embed']}/{d['attn']}/{d['ffn']} | "
                 f"{fd['embed']}/{fd['attn']}/{fd['ffn']} |")
    for t, h in f["hybrid"].items():
        g = h["diagnosis"]
        err = g["engine_rel_err"]
        L += ["", f"Hybrid at {t}: its exact values against the full run's on the channels it scored exactly (other "
              f"candidates stacked per forward): relative difference max {err['max']:.1e}, median {err['median']:.1e}, "
              f"{err['bit_identical_fraction']:.1%} bit-identical."]
        for s in g["swaps"]:
            def fmt(rs):
                return ", ".join(f"{r['channel']} (exact {r['exact']:.4e}, hybrid {r['hybrid']:.4e}"
                                 f"{', scored exactly' if r['hybrid_scored_exactly'] else ', estimated'}"
                                 + (f", screen log-error {r['screen_log_error']:.3f}"
                                    if "screen_log_error" in r else "")
                                 + ")" for r in rs)
            L.append(f"- {s['site']} group {s['group'][0]}:{s['group'][1]} keep {s['k']}: only exact keeps "
                     f"{fmt(s['only_exact_keeps'])}; only hybrid keeps {fmt(s['only_scores_keeps'])}; exact gap "
                     f"{s['exact_gap_rel']:.1e} relative"
                     + (f"; margin required {s['calibration']['margin']:.3f} "
                        f"(z sigma {s['calibration']['z_sigma']:.3f}, "
                        f"largest scored error {s['calibration']['max_dev_scored']:.3f})" if "calibration" in s else "")
                     + ".")
    if f.get("tail_sweep"):
        L += ["", "Hybrid's rule replayed with other `tail` margins (the full run's exact values standing in for its "
              "exact rounds: its rounds gave bit-identical values; the default 1.6 row reproduces the measured "
              "run):", "",
              "| tail | target | keep-set diffs (embed/attn/ffn) | exact fraction of channels | "
              "of exact's CPU time | rounds |",
              "|---|---|---|---|---|---|"]
        for r in f["tail_sweep"]:
            d = r["keep_set_differences_vs_exact"]
            L.append(f"| {r['tail']} | {r['target']} | {d['embed']}/{d['attn']}/{d['ffn']} | "
                     f"{r['exact_fraction']:.1%} | "
                     f"{num(r.get('exact_cpu_fraction'), '.1%')} | {r['rounds']} |")
    return L


def markdown(rep: dict) -> str:
    L = ["# Exact KL scoring at real size", "",
         f"Machine: {rep['machine']['cpu']}, {rep['machine']['cores']} cores, torch {rep['machine']['torch']}, "
         f"{rep['machine']['torch_threads']} threads; load average at start {rep['machine']['loadavg_1_5_15']} "
         "(other agents share the machine). Rates part clock: "
         f"{next(iter(rep.get('rates', {}).values()), {}).get('clock', 'wall time')} "
         "(rates per core when CPU time).", ""]
    if rep.get("rates"):
        L += ["## Candidate-images/s per site kind (224 px, seeded random weights)", "",
              "Achieved fraction = the engine's FLOP/s on the FLOPs exactness requires (counted) / the engine-shaped "
              "matmul rate measured before and after, in the same precision.", "",
              "| shape | kind | site | GFLOP per cand-img | fp32 cand-img/s | fp32 % matmul | bf16 cand-img/s | "
              "bf16 % matmul | bf16 speed-up | bf16 max err / site max | matmul fp32 / bf16 GFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rep["rates"].items():
            for kind, s in r["sites"].items():
                f, b = s["fp32"], s["bf16"]
                L.append(f"| {name} | {kind} | {s['site']} | {s['flop_per_candidate_image'] / 1e9:.2f} | "
                         f"{num(f['candidate_images_per_s'])} | {num(f['fraction_of_matmul'], '.0%')} | "
                         f"{num(b['candidate_images_per_s'])} | {num(b['fraction_of_matmul'], '.0%')} | "
                         f"{num(s['bf16_speedup'])}{'x' if s['bf16_speedup'] else ''} | "
                         f"{num(s.get('bf16_max_rel_err_vs_site_max'), '.1e')} | {f['matmul_flop_per_s'] / 1e9:.0f} / "
                         f"{b['matmul_flop_per_s'] / 1e9:.0f} |")
        L += ["", f"Sample: {next(iter(rep['rates'].values()))['candidates_per_site']} candidates per site (+1 for the "
              f"difference), {next(iter(rep['rates'].values()))['images']} images."]
    if rep.get("memory"):
        L += ["", "## Peak memory (fresh process, one full candidate stack)", "",
              "| budget | site | candidate batch | stacked images | RSS after load (GiB) | peak RSS (GiB) |",
              "|---|---|---|---|---|---|"]
        for label, m in rep["memory"].items():
            L.append(f"| {label} | {m['site']} | {m['candidate_batch']} | {m['stacked_images']} | "
                     f"{m['rss_after_load_bytes'] / 2**30:.2f} | {m['peak_gib']:.2f} |")
        L += ["", f"Model: `{next(iter(rep['memory'].values()))['spec']}`."]
    if rep.get("bf16"):
        b = rep["bf16"]
        L += ["", "## bf16 against fp32 on one proxy set", "",
              f"Model: {b['model']}, {b['proxy_images']} proxy images, {b.get('channels_fraction', 1):.0%} of every "
              f"site's channels (seeded); fp32 {b['fp32_s']} s, bf16 {b['bf16_s']} s "
              f"({b.get('clock', 'wall time')}).", "",
              "| kind | max abs error / site max | median relative error | min Spearman (per site) |",
              "|---|---|---|---|"]
        for k, e in b["error_by_kind"].items():
            L.append(f"| {k} | {e['max_abs_err_over_site_max']:.2e} | {e['median_rel_err']:.2e} | "
                     f"{e['min_spearman']:.5f} |")
        if isinstance(b["keep_set_differences"], str):
            L += ["", f"Keep sets: {b['keep_set_differences']}; bf16 stays an option, fp32 the default."]
        else:
            L += ["", "Keep-set differences (channels swapped between kept and dropped, bf16 vs fp32):", "",
                  "| target | embed | attn | ffn |", "|---|---|---|---|"]
            for t, d in b["keep_set_differences"].items():
                L.append(f"| {t} | {d['embed']} | {d['attn']} | {d['ffn']} |")
            same = all(v == 0 for d in b["keep_set_differences"].values() for v in d.values())
            L += ["", "Keep sets " + ("match: bf16 is safe here, still an option (`dtype='bf16'`)." if same else
                                      "differ: bf16 stays an option, fp32 the default.")]
    if rep.get("fast"):
        L += fast_markdown(rep["fast"])
    for shape, p in (rep.get("projection") or {}).items():
        if not p:
            continue
        per_core = "CPU" in (rep.get("rates", {}).get(shape, {}).get("clock") or "")
        L += ["", f"## Projected cost of the paper's setting ({shape}, 224 px, {p['images']:,} images) "
              "on this machine", "",
              "| method | " + ("hours of one core (CPU time; halve for both cores of an idle machine)" if per_core
                                else "hours") + " |", "|---|---|",
              f"| exact fp32 | {p['exact_fp32_hours']:,.0f} |",
              f"| exact bf16 | {p['exact_bf16_hours']:,.0f} |" if p["exact_bf16_hours"] == p["exact_bf16_hours"] else
              "| exact bf16 | not projected (bf16 not measured on this shape: no native bf16) |",
              f"| fisher | {p['fisher_hours']:,.2f} |"]
        if "hybrid_hours" in p:
            L.append(f"| hybrid ({p['hybrid_exact_fraction_used']:.1%} of exact's time, "
                     "from the fast part's fractions) | "
                     f"{p['hybrid_hours']:,.0f} |")
        L += ["", "Exact: every site's channels x images / the measured rate of its kind, scaled by the share of the "
              "model the site's candidates rerun. Hybrid: its screen (Fisher with local attention) "
              "plus, per site kind, "
              "the exact fraction of that kind's channels measured in the fast part (the larger of its two targets) "
              "times exact's time on that kind (on a ViT-S at low resolution with a small proxy: the fraction varies "
              "with the model, the proxy and the target)."]
    if rep.get("reading"):
        L += ["", "## Reading", "", rep["reading"]]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, seconds (for the test suite)")
    ap.add_argument("--parts", nargs="*", default=None, help="rates memory bf16 fast (default: those not yet done)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "scale"), help="results path without extension")
    ap.add_argument("--candidates", type=int, default=12, help="candidates per site in the rates part (+1)")
    ap.add_argument("--images", type=int, default=2, help="proxy images in the rates part")
    ap.add_argument("--bf16-images", type=int, default=16)
    ap.add_argument("--bf16-fraction", type=float, default=1.0, help="share of every site's channels in the bf16 part "
                    "(keep sets need 1)")
    ap.add_argument("--fast-images", type=int, default=16)
    ap.add_argument("--fast-px", type=int, default=56)
    ap.add_argument("--fast-model", default=EMOJI, help="the emoji-headed DINOv2 ViT-S/14 directory of the fast part")
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "scale"), help="where the fast part's stages persist")
    ap.add_argument("--reading", default=None, help="a Markdown file attached as the reading")
    ap.add_argument("--merge", nargs="*", default=[], help="results JSON of other runs (e.g. a part run with its own "
                    "--out at the same time): their parts are taken into this report")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        c = json.loads(args.memory_child)
        print(json.dumps(memory_child(c["spec"], c["images"], c["memory_gb"], c["key"], c["px"])))
        return

    if args.smoke:
        cfg = dict(shapes=SMOKE_SHAPES, px=16, patch=4, classes=10, images=2, k=3, mm_seconds=0.01, mem_images=2,
                   bf16_images=4, fast_images=4, fast_px=16, smoke=True,
                   runs=os.path.join(os.path.dirname(args.out), "runs"))
    else:
        cfg = dict(shapes=SHAPES, px=224, patch=16, classes=1000, images=args.images, k=args.candidates, mm_seconds=1.5,
                   mem_images=4, bf16_images=args.bf16_images, bf16_fraction=args.bf16_fraction,
                   fast_images=args.fast_images, fast_px=args.fast_px,
                   fast_model=args.fast_model, smoke=False, runs=args.runs)
    path = args.out + ".json"
    report = {}
    if os.path.exists(path) and not args.smoke:
        with open(path) as f:
            report = json.load(f)
    report.setdefault("machine", machine())
    for other in args.merge:  # parts measured by another process (the machine stated in its part_info)
        with open(other) as f:
            got = json.load(f)
        for name in ("rates", "memory", "bf16", "fast"):
            if name in got:
                report[name] = got[name]
                report.setdefault("part_info", {})[name] = {**got.get("part_info", {}).get(name, {}),
                                                            "merged_from": os.path.relpath(other, ROOT),
                                                            "machine_at_start": got.get("machine")}
    parts = {"rates": part_rates, "memory": part_memory, "bf16": part_bf16, "fast": part_fast}
    todo = args.parts if args.parts is not None else [p for p in parts if p not in report]
    for name in todo:
        print(f"{name} ...", flush=True)
        t0 = time.perf_counter()
        report[name] = parts[name](cfg)
        report.setdefault("part_info", {})[name] = {"seconds": round(time.perf_counter() - t0, 1),
                                                    "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                                                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        report["projection"] = {s: projection(report, s) for s in cfg["shapes"]}
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=float)
        if args.reading and os.path.exists(args.reading):
            with open(args.reading) as f:
                report["reading"] = f.read().strip()
        with open(args.out + ".md", "w") as f:
            f.write(markdown(report))
    report["projection"] = {s: projection(report, s) for s in cfg["shapes"]}
    if args.reading and os.path.exists(args.reading):
        with open(args.reading) as f:
            report["reading"] = f.read().strip()
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
