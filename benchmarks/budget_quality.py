"""Budget experiment (issue 25): the shape `upvit prune --budget macs=F` chooses vs the paper's uniform shapes,
after the same fine-tuning as the quality benchmark's (benchmarks/quality.py: 4 epochs, batch 128, lr 1e-3, wd
0.05, half an epoch of warm-up, distillation alpha 1 from the teacher, seeded data order and augmentation).

Budgets: the MACs fractions of the paper's S (96/6/384) and T (48/3/192) students of the shipped teacher, so
each budget-chosen student is compared with the paper's shape at (at most) the same MACs. Channels: the
teacher's exact KL scores on the 256-image proxy (benchmarks/results/teacher60_scores_p256_seed0.safetensors);
the budget search compares candidates by their joint KL on that same proxy (grid 8). The paper shapes' numbers
are the quality benchmark's KL cells at 4 epochs (same recipe and seeds, benchmarks/results/quality.json).
A budget-chosen shape equal to the paper's needs no run. Resumable: finished (budget, seed) records are kept.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/budget_quality.py [--seeds 0 1 2]
    .venv/bin/python benchmarks/budget_quality.py --smoke   # seconds: a tiny random ViT, a temporary folder
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import upvit  # noqa: E402
from upvit.bench import count_macs  # noqa: E402
from upvit.budget import Budget, choose  # noqa: E402
from upvit.io import atomic_write_json  # noqa: E402

STATE = os.path.join(HERE, "results", "deploy_budget.json")
WORK = os.path.join(ROOT, "runs", "budget_quality")
PAPER = {"S": dict(embed_dim=96, num_heads=6, mlp_hidden=384), "T": dict(embed_dim=48, num_heads=3, mlp_hidden=192)}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def smoke_settings(quality):
    """``--smoke``: the quality benchmark's smoke teacher and shapes (a tiny random ViT; its S and T stand in for
    the paper's), exact KL scores computed on a 16-image proxy, 1 step per epoch, 64 validation images, no paper
    cells; the state file, the runs and a Markdown rendering (deploy.py's budget section) in
    $UPVIT_BENCH_SMOKE_DIR/budget_quality. Checks that the script runs; its numbers mean nothing."""
    global STATE, WORK, PAPER
    from _smoke import smoke_dir, tiny_teacher

    where = smoke_dir("budget_quality")
    STATE, WORK, PAPER = os.path.join(where, "deploy_budget.json"), os.path.join(where, "work"), quality.SMOKE_SHAPES
    return quality.Settings(teacher=tiny_teacher("vit", where), kl_scores=None, proxy_size=16, batch_size=32,
                            max_steps_per_epoch=1, val_limit=64, shapes=quality.SMOKE_SHAPES)


def smoke_report() -> None:
    """The smoke run's Markdown: deploy.py's rendering of the budget experiment, read from the smoke folder."""
    import deploy

    deploy.RESULTS = os.path.dirname(STATE)
    with open(os.path.join(deploy.RESULTS, "budget_quality.md"), "w") as f:
        f.write("\n".join(deploy.budget_report()) + "\n")


def main() -> None:
    import quality

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--shapes", nargs="+", default=["S", "T"])
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny random ViT, 1 step per epoch, 64 "
                    "validation images, results in $UPVIT_BENCH_SMOKE_DIR/budget_quality")
    args = ap.parse_args()
    global STATE
    if args.smoke:
        settings = smoke_settings(quality)
    else:
        settings = quality.Settings(teacher=os.path.join(ROOT, "upvit", "assets", "teacher"),
                                    kl_scores=os.path.join(HERE, "results", "teacher60_scores_p256_seed0.safetensors"))
    if args.shapes != ["S", "T"]:  # one process per shape can run side by side: each keeps its own file
        STATE = STATE.replace(".json", f"_{'_'.join(args.shapes)}.json")
    state = json.load(open(STATE)) if os.path.isfile(STATE) else {}
    ctx = quality.Context(settings, os.path.join(WORK, "results"), WORK)
    teacher, kl = ctx.teacher, ctx.kl()
    m0 = count_macs(teacher)
    paper_cells = {} if args.smoke else json.load(open(os.path.join(HERE, "results", "quality.json")))["cells"]
    for shape in args.shapes:
        entry = state.setdefault(shape, {})
        paper_plan = upvit.make_plan(teacher, kl, **PAPER[shape])
        fraction = count_macs(upvit.prune(teacher, paper_plan)) / m0
        entry["paper"] = {"shape": PAPER[shape], "macs_fraction": fraction,
                          "quality_cell": paper_cells.get(f"{shape}-kl-ep4")}
        if "candidates" not in entry:
            t0 = time.time()
            log(f"{shape}: budget search at macs={fraction:.4f}")
            cands = choose(teacher, kl, ctx.images, Budget("macs", fraction), grid=args.grid)
            entry["search_seconds"] = round(time.time() - t0, 1)
            entry["candidates"] = [{"shape": c.shape(), "use": c.use, "joint_kl": c.divergence} for c in cands]
            entry["chosen"] = entry["candidates"][0]
            from upvit.budget import joint_divergences

            entry["paper"]["joint_kl"] = joint_divergences(teacher, [paper_plan], ctx.images)[0]
            entry["chosen_targets"] = cands[0].targets.to_dict()
            atomic_write_json(STATE, state)
            log(f"{shape}: chosen {entry['chosen']['shape']} (joint KL {entry['chosen']['joint_kl']:.2f}, paper's "
                f"{entry['paper']['joint_kl']:.2f}) in {entry['search_seconds']}s")
        from upvit.targets import Targets

        targets = Targets.from_dict(entry["chosen_targets"])
        st = targets.stages[0]
        if (st.residual, st.heads, st.attn, st.ffn) == (PAPER[shape]["embed_dim"], PAPER[shape]["num_heads"],
                                                         PAPER[shape]["embed_dim"], PAPER[shape]["mlp_hidden"]):
            entry["note"] = "the budget chose the paper's shape: no separate run"
            atomic_write_json(STATE, state)
            continue
        runs = entry.setdefault("runs", {})
        for seed in args.seeds:
            if str(seed) in runs:
                continue
            student = upvit.prune(teacher, upvit.make_plan(teacher, kl, targets=targets))
            out = os.path.join(WORK, "runs", f"{shape}-budget-seed{seed}")
            resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
            log(f"{shape}: fine-tuning the budget shape, seed {seed}{' (resuming)' if resume else ''}")
            t0, load0 = time.time(), os.getloadavg()[0]
            upvit.finetune(student, ctx.shared, ctx.train_data(seed), ctx.train_config(4, seed), out,
                           alpha=settings.alpha, val_data=ctx.val, resume=resume)
            with open(os.path.join(out, "log.jsonl")) as f:
                history = [json.loads(line) for line in f]
            runs[str(seed)] = {"top1": history[-1]["val_top1"], "curve": [r["val_top1"] for r in history],
                               "seconds": round(time.time() - t0, 1),
                               "loadavg_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)]}
            atomic_write_json(STATE, state)
            log(f"{shape}: seed {seed} top-1 {runs[str(seed)]['top1']:.2f}")
    if args.smoke:
        smoke_report()


if __name__ == "__main__":
    main()
