"""Before fine-tuning (issue 26): how much of the teacher a one-shot pruned student keeps, with whole heads
and with compensation, for every selection.

For the shipped teacher (``upvit/assets/teacher``, 192 wide, 12 heads, 6 blocks) at the quality benchmark's
S (96 / 6 heads / 384) and T (48 / 3 / 192) shapes, each row prunes once and measures, without any training:
top-1 on the 2,000 validation images, KL(teacher || student) summed over the 256 proxy images the scores and
the compensation used, the same KL on 512 *held-out* training images outside the proxy set (a refit that
only memorised the proxy set would show here), and the seconds compensation took. Rows: selection (exact KL scores,
magnitude, Taylor, random) x heads (merge = the paper, whole) x compensation (none = the paper, bias, lsq); then, for
kl + lsq, the ridge strength and a variant that leaves the classifier head as sliced (how much of the gain
is the residual-channel correction at the head).

    python benchmarks/compensation.py [--kl-scores FILE] [--smoke]

Writes ``benchmarks/results/compensation.json`` and ``.md``.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import upvit  # noqa: E402
from quality import kl_sum  # noqa: E402  (the quality benchmark's proxy KL, the same measure)
from upvit import compensation as comp  # noqa: E402
from upvit.demo import SHAPES, machine_description  # noqa: E402
from upvit.evaluation import evaluate  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
KL_SCORES = os.path.join(RESULTS, "teacher60_scores_p256_seed0.safetensors")
TAYLOR_SCORES = os.path.join(RESULTS, "quality", "scores_taylor_p256_seed0.safetensors")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=os.path.join(ROOT, "upvit", "assets", "teacher"))
    ap.add_argument("--kl-scores", default=KL_SCORES)
    ap.add_argument("--selections", nargs="+", default=["kl", "magnitude", "taylor", "random"],
                    choices=["kl", "magnitude", "taylor", "random"])
    ap.add_argument("--smoke", action="store_true", help="a tiny random ViT, 16 proxy images: checks the script runs")
    args = ap.parse_args(argv)
    from upvit.data import load_data, sample_proxy
    from upvit.importance.api import proxy_labels, proxy_tensor
    from upvit.importance.heads import head_scores
    from upvit.importance.scores import Scores

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out_dir, shapes, proxy_size, val_n = RESULTS, SHAPES, 256, 2000
    if args.smoke:
        from _smoke import smoke_dir, tiny_teacher

        out_dir = smoke_dir("compensation")
        args.teacher = tiny_teacher("vit", out_dir)
        shapes = {"S": {"embed_dim": 12, "num_heads": 2, "mlp_hidden": 24}}
        proxy_size, val_n = 16, 100
    teacher = upvit.load(args.teacher).eval()
    dc = teacher.upvit_config.data_config
    val = torch.utils.data.Subset(load_data("animal-mnist:val", data_config=dc)[0], list(range(val_n)))
    train = load_data("animal-mnist:train", data_config=dc)[0]
    proxy, record = sample_proxy(train, size=proxy_size, seed=0)
    # held out from the fit: training images outside the proxy set (the validation set has only 2,000 images)
    used = set(proxy.indices)
    rest = [i for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(1)).tolist() if i not in used]
    held_out = proxy_tensor(torch.utils.data.Subset(train, rest[:512 if not args.smoke else 16]),
                            tuple(dc["input_size"]))
    images, labels = proxy_tensor(proxy, tuple(dc["input_size"])), proxy_labels(proxy)
    selections = {
        "kl": (Scores.load(args.kl_scores) if not args.smoke else upvit.score(teacher, images, method="kl")),
        "magnitude": upvit.score(teacher, images, method="magnitude"),
        "taylor": (Scores.load(TAYLOR_SCORES) if not args.smoke and os.path.isfile(TAYLOR_SCORES)
                   else upvit.score(teacher, images, method="taylor", labels=labels)),
        "random": upvit.score(teacher, images, method="random", seed=0),
    }
    t0 = time.time()
    exact_heads = head_scores(teacher, images)
    head_seconds = time.time() - t0
    partial = os.path.join(out_dir, "compensation.partial.json")  # rows so far: a rerun continues from them
    rows = []
    if os.path.isfile(partial) and not args.smoke:
        with open(partial) as f:
            rows = json.load(f)
    done = {(r["selection"], r["shape"], r["heads"], r["compensation"], r["ridge"], tuple(r["exclude"])) for r in rows}

    def measure(selection, shape, heads, mode, ridge=comp.DEFAULT_RIDGE, exclude=()):
        if (selection, shape, heads, mode, ridge, tuple(exclude)) in done:
            return
        scores = selections[selection]
        ranking = exact_heads if heads == "whole" and selection == "kl" else None
        plan = upvit.make_plan(teacher, scores, heads=heads, head_scores=ranking, **shapes[shape])
        student = upvit.prune(teacher, plan)
        t1 = time.time()
        report = comp.compensate(teacher, student, plan, images, mode=mode, ridge=ridge, exclude=exclude)
        row = {"selection": selection, "shape": shape, "heads": heads, "compensation": mode, "ridge": ridge,
               "exclude": list(exclude), "seconds": round(time.time() - t1, 2),
               "top1_before_ft": evaluate(student, val)["top1"], "proxy_kl": kl_sum(teacher, student, images),
               "held_out_kl": kl_sum(teacher, student, held_out),
               "layers_refitted": sum(layer.changed for layer in report.layers)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(partial + ".tmp", "w") as f:
            json.dump(rows, f)
        os.replace(partial + ".tmp", partial)

    for shape in shapes:
        for selection in args.selections:
            for heads in ("merge", "whole"):
                for mode in comp.MODES:
                    measure(selection, shape, heads, mode)
        for ridge in (0.0, 1e-5, 1e-1):
            measure("kl", shape, "merge", "lsq", ridge=ridge)
        measure("kl", shape, "merge", "lsq", exclude=("head",))
    result = {"teacher": os.path.relpath(args.teacher, ROOT) if not args.smoke else "tiny random ViT",
              "proxy": record, "val_images": val_n, "held_out_images": len(held_out), "shapes": shapes,
              "head_scores_seconds": round(head_seconds, 2), "machine": machine_description(), "rows": rows}
    with open(os.path.join(out_dir, "compensation.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "compensation.md"), "w") as f:
        f.write(markdown(result))
    if os.path.isfile(partial):
        os.unlink(partial)  # everything is in compensation.json now
    print(f"wrote {out_dir}/compensation.md")
    return 0


def markdown(result: dict) -> str:
    lines = ["# Before fine-tuning: whole heads and compensation (issue 26)", "",
             f"Teacher `{result['teacher']}`; proxy: {result['proxy'].get('num_images')} training images (seed 0), the "
             f"scoring proxy, also the compensation's fitting set; top-1 on {result['val_images']} validation images; "
             f"held-out KL on {result['held_out_images']} training images outside the proxy set. "
             "Whole-head exact scores: "
             f"{result['head_scores_seconds']:.1f} s for every head of the model. Machine: {result['machine']} "
             "(shared). Written by `python benchmarks/compensation.py`.", "",
             "| shape | selection | heads | compensation | top-1 before FT | proxy KL | held-out KL | seconds |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    main_rows = sorted((r for r in result["rows"] if r["ridge"] == comp.DEFAULT_RIDGE and not r["exclude"]),
                       key=lambda r: (r["shape"], ["kl", "magnitude", "taylor", "random"].index(r["selection"]),
                                      r["heads"] != "merge", comp.MODES.index(r["compensation"])))
    for r in main_rows:
        lines.append(f"| {r['shape']} | {r['selection']} | {r['heads']} | {r['compensation']} | "
                     f"{r['top1_before_ft']:.2f} "
                     f"| {r['proxy_kl']:.1f} | {r['held_out_kl']:.1f} | {r['seconds']:.1f} |")
    lines += ["", "kl + merged heads + lsq, variants (ridge relative to the mean diagonal of the inputs' "
              "second moment; "
              f"default {comp.DEFAULT_RIDGE:g}):", "",
              "| shape | variant | top-1 before FT | proxy KL | held-out KL |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        if r["selection"] == "kl" and r["heads"] == "merge" and r["compensation"] == "lsq":
            name = (f"ridge {r['ridge']:g}" + (", head left as sliced" if r["exclude"] else "")
                    + (" (default)" if r["ridge"] == comp.DEFAULT_RIDGE and not r["exclude"] else ""))
            lines.append(f"| {r['shape']} | {name} | {r['top1_before_ft']:.2f} | {r['proxy_kl']:.1f} | "
                         f"{r['held_out_kl']:.1f} |")
    reading = os.path.join(ROOT, "benchmarks", "readings", "compensation.md")
    if os.path.isfile(reading) and result["teacher"] != "tiny random ViT":
        with open(reading) as f:
            lines += ["", f.read().strip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
