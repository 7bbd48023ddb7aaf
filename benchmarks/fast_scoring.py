"""Exact KL vs its Fisher estimate vs screen-then-verify (hybrid), on one model and proxy set.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fast_scoring.py --proxy-size 8
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fast_scoring.py --smoke   # seconds, a tiny random ViT

Writes benchmarks/results/fast_scoring.json and .md: wall times of the three methods in one run,
Spearman correlation of the estimate with exact (per component and per block), and keep-set
agreement with exact at the S (embed 96 / 6 heads / mlp 384) and T (48 / 3 / 192) targets.

Exact scores: when ``--exact-scores`` names a file computed on this model with the same proxy set
(size and seed), it is reused and its recorded wall time stands for exact's time; otherwise exact
scoring runs here on the proxy set (the default, so all three times come from one process).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

RANDOM_SPEC = ("timm:vit_base_patch16_224,img_size=28,patch_size=4,in_chans=1,num_classes=10,"
               "embed_dim=192,depth=6,num_heads=12,mlp_ratio=4.0")
TARGETS = {"S": dict(embed_dim=96, num_heads=6, mlp_hidden=384), "T": dict(embed_dim=48, num_heads=3, mlp_hidden=192)}
SMOKE_TARGETS = {"S": dict(embed_dim=12, num_heads=2, mlp_hidden=24),
                 "T": dict(embed_dim=8, num_heads=1, mlp_hidden=12)}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # average ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def keep_agreement(model, scores, reference, target) -> dict[str, float]:
    """Share of channels whose keep/drop decision equals the reference's, per component and overall."""
    from upvit.plan import make_plan

    a, b = make_plan(model, scores, **target), make_plan(model, reference, **target)
    sizes = {"embed": len(scores.embed), "attn": sum(len(t) for t in scores.attn),
             "ffn": sum(len(t) for t in scores.ffn)}
    diff = {"embed": len(set(a.keep_embed) ^ set(b.keep_embed)),
            "attn": sum(len(set(x) ^ set(y)) for x, y in zip(a.keep_attn, b.keep_attn)),
            "ffn": sum(len(set(x) ^ set(y)) for x, y in zip(a.keep_ffn, b.keep_ffn))}
    out = {k: 1 - diff[k] / sizes[k] for k in sizes}
    out["all"] = 1 - sum(diff.values()) / sum(sizes.values())
    return out


def main() -> None:
    import upvit
    from upvit.adapters import get_adapter
    from upvit.data import load_data, sample_proxy
    from upvit.importance.api import proxy_tensor
    from upvit.importance.fisher import fisher_scores
    from upvit.importance.hybrid import hybrid_scores
    from upvit.importance.kl import kl_scores
    from upvit.importance.scores import Scores
    from upvit.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="upvit/assets/teacher")
    ap.add_argument("--proxy-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--exact-scores", default=None, help="reuse exact scores computed on the same proxy set")
    ap.add_argument("--fisher-rank", type=int, default=None, help="also time the rank-r truncated estimate")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/fast_scoring")
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny random ViT and 4 images, results to a "
                    "temporary folder (checks that the script runs, its numbers mean nothing)")
    args = ap.parse_args()
    global TARGETS
    if args.smoke:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _smoke import smoke_dir, tiny_teacher

        work = smoke_dir("fast_scoring")
        args.model, args.proxy_size, args.out = tiny_teacher("vit", work), 4, os.path.join(work, "fast_scoring")
        TARGETS = SMOKE_TARGETS
    if args.threads:
        torch.set_num_threads(args.threads)

    if os.path.isdir(args.model):
        model, model_desc = upvit.load(args.model), args.model
    else:
        model, model_desc = load_model(RANDOM_SPEC), f"{RANDOM_SPEC} (random weights: {args.model} not found)"
    model.eval()
    adapter = get_adapter(model)
    ds, _ = load_data("animal-mnist:train", getattr(getattr(model, "upvit_config", None), "data_config", None))
    proxy, proxy_record = sample_proxy(ds, args.proxy_size, seed=args.seed)
    images = proxy_tensor(proxy)
    result: dict = {"model": model_desc, "proxy": {"data": "animal-mnist:train", **proxy_record},
                    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
                    "targets": TARGETS}

    times = {}
    if args.exact_scores:
        exact = Scores.load(args.exact_scores)
        exact.check_matches(adapter)
        if exact.meta.get("num_images") != len(images):
            raise SystemExit(f"{args.exact_scores} has {exact.meta.get('num_images')} images, "
                             f"the proxy here {len(images)}")
        times["exact"] = float(exact.meta.get("wall_time_total_s", exact.meta["wall_time_s"]))
        result["exact_source"] = f"{args.exact_scores} (recorded wall time)"
    else:
        t = time.perf_counter()
        exact = kl_scores(adapter, images, batch_size=args.batch_size, progress=False)
        times["exact"] = time.perf_counter() - t
        result["exact_source"] = "computed here, all channels"

    t = time.perf_counter()
    est = fisher_scores(adapter, images, batch_size=args.batch_size)
    times["fisher"] = time.perf_counter() - t
    estimates = {"fisher": est}
    t = time.perf_counter()
    estimates["fisher_local_attn"] = fisher_scores(adapter, images, batch_size=args.batch_size, attention="local")
    times["fisher_local_attn"] = time.perf_counter() - t  # hybrid's screen: attention dims by upvit.importance.local
    if args.fisher_rank:
        t = time.perf_counter()
        estimates[f"fisher_rank{args.fisher_rank}"] = fisher_scores(adapter, images, batch_size=args.batch_size,
                                                                    rank=args.fisher_rank)
        times[f"fisher_rank{args.fisher_rank}"] = time.perf_counter() - t
        result["fisher_rank_captured_fraction"] = estimates[f"fisher_rank{args.fisher_rank}"].meta["captured_fraction"]

    t = time.perf_counter()
    hyb = hybrid_scores(adapter, images, targets=list(TARGETS.values()), batch_size=args.batch_size)
    times["hybrid"] = time.perf_counter() - t
    result["times_s"] = times
    result["speedup_vs_exact"] = {k: times["exact"] / v for k, v in times.items() if k != "exact"}
    result["hybrid"] = {k: hyb.meta[k] for k in ("rounds", "exact_calls", "exact_counts", "exact_fraction",
                                                  "fisher_time_s", "exact_time_s")}

    L = adapter.topology().num_blocks
    result["spearman"] = {}
    for name, s in estimates.items():
        comp = {"embed": spearman(s.embed, exact.embed),
                "attn": spearman(torch.cat(s.attn), torch.cat(exact.attn)),
                "ffn": spearman(torch.cat(s.ffn), torch.cat(exact.ffn))}
        per_block = {f"attn.{b}": spearman(s.attn[b], exact.attn[b]) for b in range(L)}
        per_block.update({f"ffn.{b}": spearman(s.ffn[b], exact.ffn[b]) for b in range(L)})
        result["spearman"][name] = {"component": comp, "per_block": per_block,
                                    "min_per_block": min(per_block.values())}
    result["keep_agreement"] = {
        name: {tn: keep_agreement(model, s, exact, t) for tn, t in TARGETS.items()}
        for name, s in {**estimates, "hybrid": hyb}.items()}

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(render(result))
    print(render(result))


def render(r: dict) -> str:
    t = r["times_s"]
    lines = ["# Fast scoring: exact KL vs Fisher estimate vs hybrid", "",
             f"Model: {r['model']}  ", f"Proxy: {r['proxy']}  ", f"Machine: {r['machine']}  ",
             f"Exact scores: {r['exact_source']}", "", "| method | time (s) | speed-up vs exact |", "|---|---|---|",
             f"| exact | {t['exact']:.1f} | 1 |"]
    lines += [f"| {k} | {v:.1f} | {r['speedup_vs_exact'][k]:.1f}x |" for k, v in t.items() if k != "exact"]
    h = r["hybrid"]
    lines += ["", f"Hybrid: {h['exact_fraction']:.1%} of channels scored exactly, {h['rounds']} rounds "
              f"(Fisher {h['fisher_time_s']:.1f} s, exact {h['exact_time_s']:.1f} s).", "",
              "## Spearman with exact", "", "| estimate | embed | attn | ffn | worst block |", "|---|---|---|---|---|"]
    for name, s in r["spearman"].items():
        c = s["component"]
        worst = min(s["per_block"], key=s["per_block"].get)
        lines.append(f"| {name} | {c['embed']:.3f} | {c['attn']:.3f} | {c['ffn']:.3f} | "
                     f"{worst} {s['per_block'][worst]:.3f} |")
    for name, s in r["spearman"].items():
        lines += ["", f"Per block ({name}): " + ", ".join(f"{k} {v:.4f}" for k, v in s["per_block"].items())]
    lines += ["",
              "## Keep-set agreement with exact (share of channels with the same keep/drop decision)", "",
              "| scores | target | embed | attn | ffn | all |", "|---|---|---|---|---|---|"]
    for name, per in r["keep_agreement"].items():
        for tn, a in per.items():
            lines.append(f"| {name} | {tn} | {a['embed']:.4f} | {a['attn']:.4f} | {a['ffn']:.4f} | {a['all']:.4f} |")
    if r.get("reading"):
        lines += ["", "## Reading", "", r["reading"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
