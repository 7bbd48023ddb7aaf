"""One GPU, under 8 minutes: exact KL rates, the fast scorers, fine-tuning and inference throughput.

    .venv/bin/python benchmarks/gpu.py                          # on a CUDA machine -> benchmarks/results/gpu.{json,md}
    .venv/bin/python benchmarks/gpu.py --smoke --out /tmp/gpu  # CPU, tiny shapes, seconds (the test suite)

Every model has seeded random weights (timm shapes; no downloads): speed does not depend on them,
but hybrid's exact fraction does, so its figure here is a speed check, not a quality claim. Parts,
each recorded with its own wall time; a part that would start after ``--budget-s`` (default 420 s)
is skipped and says so, so the whole script ends inside 8 minutes:

1. ``exact``: candidate-images/s of the exact KL engine on DeiT-B at 224 px per site kind (residual,
   a middle block's attention and FFN; a sample of candidates, cost = difference of k+1 and 1
   candidates), fp32 and bf16 (and fp16 on CUDA), beside the engine-shaped matmul rate;
2. ``fast``: fisher and hybrid (Ti-like target) on a 64-image proxy (DeiT-S shape, 224 px), with
   the exact rate of part 1's model kind for their speed-ups;
3. ``finetune``: training images/s of a DeiT-S student distilled from a DeiT-B teacher (AdamW,
   autocast bf16 on CUDA, upvit.distill.distillation_loss, batch 128);
4. ``inference``: images/s of DeiT-B and its pruned DeiT-S / DeiT-T shapes (fp16 on CUDA, batch 256).

Output format: see benchmarks/README.md ("gpu.json").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UPVIT_NO_PROGRESS", "1")

from upvit.adapters import get_adapter  # noqa: E402
from upvit.importance.kl import kl_scores  # noqa: E402
from upvit.models import load_model  # noqa: E402

FORMAT = "upvit-gpu-bench/1"
VIT = "timm:vit_base_patch16_224,img_size={px},patch_size={patch},num_classes={classes},embed_dim={e},depth={d}," \
      "num_heads={h},mlp_ratio=4.0"
FULL = dict(px=224, patch=16, classes=1000, B=dict(e=768, d=12, h=12), S=dict(e=384, d=12, h=6),
            T=dict(e=192, d=12, h=3),
            exact_images=4, exact_k=32, proxy=64, ft_batch=128, ft_steps=20, inf_batch=256, inf_reps=10, mm_rows=16384,
            mm_seconds=1.0)
SMOKE = dict(px=16, patch=4, classes=10, B=dict(e=48, d=4, h=4), S=dict(e=24, d=4, h=2), T=dict(e=12, d=4, h=1),
             exact_images=2, exact_k=3, proxy=4, ft_batch=4, ft_steps=2, inf_batch=4, inf_reps=2, mm_rows=256,
             mm_seconds=0.01)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(cfg: dict, shape: str, device: torch.device) -> torch.nn.Module:
    spec = VIT.format(px=cfg["px"], patch=cfg["patch"], classes=cfg["classes"], **cfg[shape])
    return load_model(spec, init_seed=0).eval().to(device)


def images(cfg: dict, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, cfg["px"], cfg["px"], generator=g).to(device)


def matmul_rate(rows: int, width: int, dtype: torch.dtype, device: torch.device, seconds: float) -> float:
    a = torch.randn(rows, width, device=device).to(dtype)
    b = torch.randn(width, 4 * width, device=device).to(dtype)
    a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or reps < 2:
        a @ b
        reps += 1
        if reps % 10 == 0:
            sync(device)
    sync(device)
    return 2 * rows * width * 4 * width * reps / (time.perf_counter() - t0)


def dtypes(device: torch.device) -> list[str]:
    return ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]


# ------------------------------------------------------------------------------------------ parts
def part_exact(cfg: dict, device: torch.device) -> dict:
    model = build(cfg, "B", device)
    adapter = get_adapter(model)
    x = images(cfg, cfg["exact_images"], device)
    mid = cfg["B"]["d"] // 2
    g = torch.Generator().manual_seed(1)
    out: dict = {"model": "DeiT-B shape", "images": cfg["exact_images"], "candidates_per_site": cfg["exact_k"],
                 "matmul_flop_per_s": {d: matmul_rate(cfg["mm_rows"], cfg["B"]["e"], {"fp32": torch.float32,
                                                                                    "bf16": torch.bfloat16,
                                                                                    "fp16": torch.float16}[d], device,
                                                          cfg["mm_seconds"])
                                       for d in dtypes(device)}, "sites": {}}
    for kind, key in (("residual", "res.0"), ("attn", f"attn.{mid}"), ("ffn", f"ffn.{mid}")):
        size = adapter.topology().site(key).size
        idx = torch.randperm(size, generator=g)[:cfg["exact_k"] + 1].sort().values
        row = {"site": key}
        for d in dtypes(device):
            kl_scores(adapter, x, candidates={key: idx[:1]}, dtype=d, progress=False)  # warm-up (kernels, autotune)
            t0 = time.perf_counter()
            kl_scores(adapter, x, candidates={key: idx[:1]}, dtype=d, progress=False)
            t1 = time.perf_counter() - t0
            t0 = time.perf_counter()
            kl_scores(adapter, x, candidates={key: idx}, dtype=d, progress=False)
            tk = time.perf_counter() - t0
            # None when noise hides the difference (tiny smoke shapes on a loaded machine)
            rate = cfg["exact_images"] * cfg["exact_k"] / (tk - t1) if tk > t1 else None
            row[d] = {"candidate_images_per_s": rate,
                      "seconds_k_plus_1": round(tk, 4), "seconds_1": round(t1, 4)}
        out["sites"][kind] = row
    topo = adapter.topology()
    U = len(topo.units)
    out["sites_all"] = [{"key": s.key, "kind": s.kind, "size": s.size,
                         "cost": max(1, U - max(topo.start_unit(s.key), 0)) / U} for s in topo.sites]
    return out


def exact_seconds_per_image(exact: dict, d: str) -> float:
    """Projected seconds of exact KL per proxy image for the whole model, from the per-kind rates."""
    total = 0.0
    for s in exact["sites_all"]:
        m = exact["sites"][s["kind"]]
        ref = next(x["cost"] for x in exact["sites_all"] if x["key"] == m["site"])
        rate = m[d]["candidate_images_per_s"]
        if rate is None:
            return float("nan")
        total += s["size"] * (s["cost"] / ref) / rate
    return total


def part_fast(cfg: dict, device: torch.device) -> dict:
    from upvit.importance.fisher import fisher_scores
    from upvit.importance.hybrid import hybrid_scores

    model = build(cfg, "S", device)
    adapter = get_adapter(model)
    x = images(cfg, cfg["proxy"], device, seed=2)
    fisher_scores(adapter, x[:2], batch_size=2, progress=False)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    fisher_scores(adapter, x, batch_size=min(64, cfg["proxy"]), progress=False)
    sync(device)
    t_fisher = time.perf_counter() - t0
    target = {"embed_dim": cfg["T"]["e"], "num_heads": cfg["T"]["h"], "mlp_hidden": 4 * cfg["T"]["e"]}
    t0 = time.perf_counter()
    h = hybrid_scores(adapter, x, targets=[target], batch_size=min(64, cfg["proxy"]), progress=False)
    sync(device)
    t_h = time.perf_counter() - t0
    return {"model": "DeiT-S shape (random weights)", "proxy_images": cfg["proxy"], "fisher_s": round(t_fisher, 3),
            "hybrid_s": round(t_h, 3), "hybrid_target": target, "hybrid_exact_fraction": h.meta["exact_fraction"],
            "hybrid_rounds": h.meta["rounds"], "hybrid_exact_s": round(h.meta["exact_time_s"], 3)}


def part_finetune(cfg: dict, device: torch.device) -> dict:
    from upvit.distill import distillation_loss

    student, teacher = build(cfg, "S", device).train(), build(cfg, "B", device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    amp = device.type == "cuda"
    x = images(cfg, cfg["ft_batch"], device, seed=3)
    y = torch.randint(0, cfg["classes"], (cfg["ft_batch"],), generator=torch.Generator().manual_seed(3)).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t = teacher(x)
            loss, _, _ = distillation_loss(student(x), t.float(), y, alpha=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg["ft_steps"]):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    return {"student": "DeiT-S shape", "teacher": "DeiT-B shape", "batch": cfg["ft_batch"], "steps": cfg["ft_steps"],
            "autocast": "bf16" if amp else "off", "images_per_s": cfg["ft_batch"] * cfg["ft_steps"] / dt}


def part_inference(cfg: dict, device: torch.device) -> dict:
    dt_ = torch.float16 if device.type == "cuda" else torch.bfloat16
    out: dict = {"dtype": str(dt_).replace("torch.", ""), "batch": cfg["inf_batch"], "models": {}}
    models = {name: build(cfg, name, device).to(dt_) for name in ("B", "S", "T")}
    x = images(cfg, cfg["inf_batch"], device, seed=4).to(dt_)
    with torch.no_grad():
        for m in models.values():
            m(x)
        times: dict[str, list[float]] = {n: [] for n in models}
        for _ in range(cfg["inf_reps"]):  # in turns: a slow moment slows every model alike
            for n, m in models.items():
                sync(device)
                t0 = time.perf_counter()
                m(x)
                sync(device)
                times[n].append(time.perf_counter() - t0)
    for n, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        out["models"][f"DeiT-{n} shape"] = {"images_per_s": cfg["inf_batch"] / med, "median_s": med}
    b = out["models"]["DeiT-B shape"]["images_per_s"]
    for v in out["models"].values():
        v["speedup_vs_B"] = v["images_per_s"] / b
    return out


# ------------------------------------------------------------------------------------------ report
def fmt(rate: float | None) -> str:
    return "n/a (noise)" if rate is None else f"{rate:.1f}"


def markdown(r: dict) -> str:
    L = [f"# GPU benchmark ({r['device']['name']})", "",
         f"Format {r['format']}; torch {r['device']['torch']}; smoke: {r['smoke']}; total {r['total_s']:.0f} s.", ""]
    e = r["parts"].get("exact")
    if e and "sites" in e:
        ds = [d for d in ("fp32", "bf16", "fp16") if d in next(iter(e["sites"].values()))]
        L += ["## Exact KL, DeiT-B shape at 224 px (candidate-images/s)", "",
              "| kind | site | " + " | ".join(ds) + " |",
              "|---|---|" + "---|" * len(ds)]
        for kind, s in e["sites"].items():
            L.append(f"| {kind} | {s['site']} | " + " | ".join(fmt(s[d]["candidate_images_per_s"]) for d in ds) + " |")
        L += ["", "Matmul GFLOP/s: " + ", ".join(f"{d} {v / 1e9:.0f}" for d, v in e["matmul_flop_per_s"].items()),
              "", "Projected exact KL for 2,000 images: " + ", ".join(
                  f"{d} {h:.1f} h" for d, h in r.get("projection_hours_2000_images", {}).items())]
    f = r["parts"].get("fast")
    if f and "fisher_s" in f:
        L += ["", f"## Fast scorers ({f['model']}, {f['proxy_images']} images)", "",
              f"fisher {f['fisher_s']} s; hybrid {f['hybrid_s']} s ({f['hybrid_exact_fraction']:.1%} exact, "
              f"{f['hybrid_rounds']} rounds)"]
    ft = r["parts"].get("finetune")
    if ft and "images_per_s" in ft:
        L += ["", f"## Fine-tuning: {ft['images_per_s']:.0f} images/s ({ft['student']} from {ft['teacher']}, "
              f"batch {ft['batch']}, autocast {ft['autocast']})"]
    inf = r["parts"].get("inference")
    if inf and "models" in inf:
        L += ["", f"## Inference ({inf['dtype']}, batch {inf['batch']})", "", "| model | images/s | vs DeiT-B |",
              "|---|---|---|"]
        for n, v in inf["models"].items():
            L.append(f"| {n} | {v['images_per_s']:.0f} | {v['speedup_vs_B']:.2f}x |")
    for n, p in r["parts"].items():
        if "skipped" in p:
            L.append(f"\n{n}: skipped ({p['skipped']})")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no part starts after this many seconds")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = SMOKE if args.smoke else FULL
    t_start = time.perf_counter()
    report: dict = {"format": FORMAT, "smoke": args.smoke, "device": {
        "type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads()},
        "parts": {}}
    for name, fn in (("exact", part_exact), ("fast", part_fast), ("finetune", part_finetune),
                     ("inference", part_inference)):
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            report["parts"][name] = {"skipped": f"{elapsed:.0f} s spent, budget {args.budget_s:.0f} s"}
            continue
        t0 = time.perf_counter()
        report["parts"][name] = fn(cfg, device)
        report["parts"][name]["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {report['parts'][name]['wall_s']} s", flush=True)
    e = report["parts"].get("exact", {})
    if "sites" in e:
        report["projection_hours_2000_images"] = {d: exact_seconds_per_image(e, d) * 2000 / 3600
                                                  for d in next(iter(e["sites"].values())) if d != "site"}
        f = report["parts"].get("fast", {})
        if "fisher_s" in f:
            f["note"] = "speed-ups vs exact need exact on the same model: see exact's DeiT-B rates"
    report["total_s"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(report, fh, indent=2)
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
