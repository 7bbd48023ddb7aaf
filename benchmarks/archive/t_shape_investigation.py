"""Why did magnitude beat the KL selection at the T shape in the demo? Tests two explanations.

1. Proxy noise: the demo scores on 32 images. Here the T student is also built from a 256-image
   Fisher estimate of the KL (read from ``runs/fisher256_seed0.safetensors`` if present,
   else computed here), and fine-tuned exactly like the demo's students (5 epochs, seed 0).
2. Fine-tuning noise: the demo's KL-T and magnitude-T students are fine-tuned again with seed 1.

Writes benchmarks/results/t_shape_investigation.{json,md}.
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/t_shape_investigation.py
"""
import json
import os
import time

import torch

import upvit
from upvit.data import load_data, sample_proxy
from upvit.demo import SharedTeacher, machine_description
from upvit.importance.scores import Scores
from upvit.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T_SHAPE = dict(embed_dim=48, num_heads=3, mlp_hidden=192)


def main() -> None:
    teacher = upvit.load(os.path.join(ROOT, "upvit", "assets", "teacher"))
    dc = teacher.upvit_config.data_config
    train_eval = load_data("animal-mnist:train", data_config=dc)[0]
    val = load_data("animal-mnist:val", data_config=dc)[0]
    fisher_path = os.path.join(ROOT, "runs", "fisher256_seed0.safetensors")
    if os.path.exists(fisher_path):
        fisher256 = Scores.load(fisher_path)
    else:
        fisher256 = upvit.score(teacher, sample_proxy(train_eval, size=256, seed=0)[0], method="fisher")
    kl32 = upvit.score(teacher, sample_proxy(train_eval, size=32, seed=0)[0], method="hybrid", targets=[T_SHAPE])
    magnitude = upvit.score(teacher, torch.zeros(1, *dc["input_size"]), method="magnitude")
    runs = [("fisher256-T", fisher256, 0), ("kl32-T", kl32, 1), ("magnitude-T", magnitude, 1)]
    shared = SharedTeacher(teacher)
    rows = []
    for name, scores, seed in runs:
        student = upvit.prune(teacher, upvit.make_plan(teacher, scores, **T_SHAPE))
        train = load_data("animal-mnist:train", data_config=dc, train=True, seed=seed)[0]
        cfg = TrainConfig(epochs=5, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=0.5, seed=seed)
        out = os.path.join(ROOT, "runs", "t_investigation", f"{name}-seed{seed}")
        if os.path.isdir(out):
            import shutil

            shutil.rmtree(out)
        t0 = time.time()
        rec = upvit.finetune(student, shared, train, cfg, out, alpha=1.0, val_data=val)
        rows.append({"student": name, "finetune_seed": seed, "top1": rec["val_top1"], "seconds": round(time.time() - t0)})
        print(rows[-1], flush=True)
    result = {"rows": rows, "demo_5_epochs_seed0": {"kl32-T (hybrid)": 64.0, "magnitude-T": 69.7, "random-T": 59.75},
              "machine": machine_description()}
    res = os.path.join(ROOT, "benchmarks", "results", "t_shape_investigation")
    with open(res + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = ["| T student | scores | fine-tune seed | top-1 after 5 epochs |", "|---|---|---:|---:|"]
    lines += [f"| {r['student']} | {r['student'].split('-')[0]} | {r['finetune_seed']} | {r['top1']:.2f} |" for r in rows]
    with open(res + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
