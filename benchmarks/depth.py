"""Depth pruning on the shipped ViT teacher: progressive exact KL (with hybrid blocks) against one-shot KL,
the last blocks, and ShortGPT's Block Influence, with the same fine-tuning budget.

Every method removes 2 of the teacher's 6 blocks-worth (4 of its 12 units) and fine-tunes with soft
distillation from the teacher for 4 epochs in all (the progressive method: 2 steps of 1 blocks-worth, 2
epochs after each; the others: one step, 4 epochs), with the demo's settings otherwise (batch 128, lr 1e-3,
weight decay 0.05, half an epoch of warm-up per fine-tuning run, alpha 1, seed 0). Scores use 128 training
images (seed 0, evaluation transform). Methods:

* ``kl-progressive``: the paper's procedure: score every block and hybrid block by summed KL, remove the
  lowest, fine-tune, re-score, repeat;
* ``kl-oneshot``: the same scores on the teacher, the two lowest candidates that can leave together;
* ``last``: the last two blocks (naive baseline);
* ``block-influence``: ShortGPT's 1 - cos(input, output) of each block on the proxy set, lowest two removed;
* ``kl-progressive-blocks``: the progressive run with whole blocks only, run when a KL method picked a
  hybrid block (does the hybrid help?);
* ``kl-oneshot-joint``: the pair of candidates whose removal *together* has the least KL on the teacher
  (every valid pair scored jointly), run when it differs from the greedy one-shot choice.

Also: the zero-shot accuracy of each method's final removal applied to the teacher without any fine-tuning,
the teacher's KL and Block Influence of all 11 candidates, and one throughput pass over the final models
(interleaved, median of 3). Runs live in ``runs/depth_bench/<method>`` and resume after an interruption.
Writes ``benchmarks/results/depth.{json,md}``.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/depth.py
    .venv/bin/python benchmarks/depth.py --reading reading.md   # attach the hand-written reading
    .venv/bin/python benchmarks/depth.py --smoke                # seconds: a tiny random ViT, a temporary folder
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch

import upvit
from upvit.adapters import get_adapter
from upvit.bench import count_macs, count_params, throughput
from upvit.data import load_data, sample_proxy
from upvit.demo import SharedTeacher, machine_description
from upvit.depth import candidates, describe_removed, remove_units, score_candidates, select
from upvit.evaluation import evaluate
from upvit.importance.api import proxy_tensor
from upvit.importance.units import unit_scores
from upvit.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "upvit", "assets", "teacher")
RUNS = os.path.join(ROOT, "runs", "depth_bench")
RESULT = os.path.join(ROOT, "benchmarks", "results", "depth")
METHODS = {  # name: (criterion, steps, candidate kinds)
    "kl-progressive": ("kl", 2, ("block", "hybrid")),
    "kl-oneshot": ("kl", 1, ("block", "hybrid")),
    "last": ("last", 1, ("block",)),
    "block-influence": ("block_influence", 1, ("block",)),
}
ABLATION = ("kl-progressive-blocks", ("kl", 2, ("block",)))


def wait_for_other_process(name: str) -> None:
    """Wait while another process started with ``--only name`` works on that method's run."""
    lock = os.path.join(RUNS, name + ".lock")
    while os.path.exists(lock):
        with open(lock) as f:
            pid = int(f.read().strip() or 0)
        if pid == os.getpid():
            return
        try:
            os.kill(pid, 0)
        except (OSError, ValueError):
            return  # a stale lock: that process is gone
        print(f"   waiting for process {pid} ({name})", flush=True)
        time.sleep(60)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(a).argsort().argsort().double(), torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs per method (all steps together)")
    ap.add_argument("--proxy-size", type=int, default=128)
    ap.add_argument("--reading", help="a Markdown file with the hand-written reading to attach to the results")
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny random ViT, 2 epochs of 1 batch, 64 val "
                    "images, results to a temporary folder (checks that the script runs, its numbers mean nothing)")
    ap.add_argument("--only", help="run only this method's fine-tuning (a second process on a shared machine; the "
                    "main run waits for it and picks up its result)")
    args = ap.parse_args()
    global RUNS, RESULT, TEACHER
    bench_batch, bench_runs, bench_rounds = 128, 5, 3
    if args.smoke:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _smoke import smoke_dir, tiny_teacher

        work = smoke_dir("depth")
        RUNS, RESULT, TEACHER = os.path.join(work, "runs"), os.path.join(work, "depth"), tiny_teacher("vit", work)
        args.epochs, args.proxy_size = 2, 4
        bench_batch, bench_runs, bench_rounds = 4, 1, 1
    t_start = time.time()
    teacher = upvit.load(TEACHER)
    dc = teacher.upvit_config.data_config
    train_eval = load_data("animal-mnist:train", data_config=dc)[0]
    train = load_data("animal-mnist:train", data_config=dc, train=True, seed=0)[0]
    val = load_data("animal-mnist:val", data_config=dc)[0]
    if args.smoke:
        val = torch.utils.data.Subset(val, list(range(64)))
    proxy_set, proxy_record = sample_proxy(train_eval, size=args.proxy_size, seed=0)
    proxy = proxy_tensor(proxy_set)
    shared = SharedTeacher(upvit.load(TEACHER))
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=0.5, seed=0,
                      max_steps_per_epoch=1 if args.smoke else None)

    # the teacher's candidates under both criteria (the same numbers the one-shot runs use)
    cands = candidates(teacher)
    t0 = time.time()
    kl = score_candidates(teacher, proxy, cands, "kl")
    kl_seconds = time.time() - t0
    t0 = time.time()
    bi = score_candidates(teacher, proxy, cands, "block_influence")
    bi_seconds = time.time() - t0
    table = [{"units": list(c.units), "kind": c.kind, "kl": float(k), "block_influence": float(b)}
             for c, k, b in zip(cands, kl, bi)]
    blocks = [r for r in table if r["kind"] == "block"]
    # one-shot greedy takes the two lowest single scores; is that the removal of least joint KL?
    adapter = get_adapter(teacher)
    units = [u.key for u in adapter.topology().units]
    pairs = []
    for i, a in enumerate(cands):
        for b in cands[i + 1:]:
            if set(a.units) & set(b.units):
                continue
            try:
                adapter.check_units([u for u in units if u not in set(a.units) | set(b.units)])
            except upvit.UpvitError:
                continue
            pairs.append((a, b))
    t0 = time.time()
    joint = unit_scores(adapter, proxy, [a.units + b.units for a, b in pairs])
    joint_seconds = time.time() - t0
    joint_rows = sorted(({"removed": f"{a.kind} {a.key}, {b.kind} {b.key}", "units": list(a.units + b.units),
                          "kl": float(v), "sum_of_single_kl": float(kl[cands.index(a)] + kl[cands.index(b)])}
                         for (a, b), v in zip(pairs, joint)), key=lambda r: r["kl"])

    done: list[dict] = []
    previous_reuse: dict[str, str] = {}
    reuse_path = os.path.join(RUNS, "reuse.json")
    if os.path.exists(reuse_path):
        with open(reuse_path) as f:
            previous_reuse = json.load(f)

    def first_removal(criterion: str, steps: int, kinds: tuple[str, ...]) -> list[str]:
        """What the driver's first step will remove (the same functions on the same teacher and proxy)."""
        cands = candidates(teacher, 1, kinds)
        chosen = select(teacher, cands, score_candidates(teacher, proxy, cands, criterion), 2 // steps)
        return sorted(u for c in chosen for u in c.units)

    def reuse_first_step(name: str, criterion: str, steps: int, kinds: tuple[str, ...]) -> str | None:
        """Identical fine-tuning runs are computed once: when an earlier method with the same number of
        steps removed the same units in its first step, the student and the whole fine-tuning run of that
        step are the same (same teacher, data, seed and settings), so its finished fine-tuning files seed
        this method's step 1 (the driver still scores and selects by itself; checked afterwards)."""
        out = os.path.join(RUNS, name)
        if os.path.isfile(os.path.join(out, "run.json")):
            return None
        want = first_removal(criterion, steps, kinds)
        for r in done:
            src = os.path.join(RUNS, r["method"], "step-1")
            if r["steps"] != steps or not os.path.isfile(os.path.join(src, "step.json")):
                continue
            with open(os.path.join(src, "step.json")) as f:
                got = sorted(u for row in json.load(f)["removed"] for u in row["units"])
            if got == want:
                os.makedirs(os.path.join(out, "step-1"), exist_ok=True)
                for file in ("checkpoint.pt", "model.safetensors", "config.json", "log.jsonl"):
                    shutil.copy2(os.path.join(src, file), os.path.join(out, "step-1", file))
                return r["method"]
        return None

    def run(name: str, criterion: str, steps: int, kinds: tuple[str, ...]) -> dict:
        out = os.path.join(RUNS, name)
        wait_for_other_process(name)
        reused = reuse_first_step(name, criterion, steps, kinds)
        if reused:  # remembered across interruptions of this script
            previous_reuse[name] = reused
            with open(reuse_path, "w") as f:
                json.dump(previous_reuse, f)
        reused = reused or (previous_reuse.get(name) if os.path.isfile(os.path.join(out, "run.json")) else None)
        resume = os.path.isfile(os.path.join(out, "run.json"))
        print(f"== {name} ({'resuming' if resume else 'starting'}"
              f"{f', step 1 fine-tuning shared with {reused}' if reused else ''})", flush=True)
        t0 = time.time()
        final = upvit.prune_depth(upvit.load(TEACHER), shared, train, proxy, remove=2, steps=steps, train_config=cfg,
                                  out_dir=out, criterion=criterion, kinds=kinds, val_data=val, resume=resume,
                                  bench_batch=bench_batch, bench_runs=bench_runs, device="cpu",
                                  meta={"benchmark": name})
        with open(os.path.join(out, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        removed = [u for r in log[1:] for row in r["removed"] for u in row["origin"]]
        if reused:  # the seeded step must be the one the driver chose
            src = next(r for r in done if r["method"] == reused)["log"][1]["removed"]
            assert sorted(u for row in log[1]["removed"] for u in row["units"]) == sorted(
                u for row in src for u in row["units"]), f"{name}: step 1 differs from {reused}'s"
        zero_shot = evaluate(remove_units(upvit.load(TEACHER), removed), val, device="cpu")["top1"]
        result = {"method": name, "criterion": criterion, "steps": steps, "kinds": list(kinds), "log": log,
                  "step1_finetuning_shared_with": reused,
                  "removed_original_units": removed, "zero_shot_top1": zero_shot,
                  "picked": [describe_removed(r["removed"]) for r in log[1:]],
                  "hybrids_picked": sum(row["kind"] == "hybrid" for r in log[1:] for row in r["removed"]),
                  "top1": log[-1]["top1"], "params": count_params(final), "macs": count_macs(final),
                  "wall_seconds_this_call": round(time.time() - t0, 1), "final": final}
        done.append(result)
        return result

    def run_fixed(name: str, removed: list[str], label: str) -> dict:
        """A removal chosen outside the driver (the least joint KL), fine-tuned with the same budget."""
        from upvit.distill import finetune

        out = os.path.join(RUNS, name)
        wait_for_other_process(name)
        print(f"== {name}", flush=True)
        t0 = time.time()
        student = remove_units(upvit.load(TEACHER), removed)
        before = evaluate(student, val, device="cpu")["top1"]
        if not os.path.isfile(os.path.join(out, "model.safetensors")):
            finetune(student, shared, train, cfg, out, resume=os.path.isfile(os.path.join(out, "checkpoint.pt")),
                     device="cpu")
        final = upvit.load(out)
        top1 = evaluate(final, val, device="cpu")["top1"]
        step = {"step": 1, "removed": [{"kind": "joint", "origin": removed}], "depth": len(final.blocks),
                "top1_before_ft": before, "top1": top1, "step_seconds": round(time.time() - t0, 1)}
        return {"method": name, "criterion": "kl (joint)", "steps": 1, "kinds": ["block", "hybrid"],
                "log": [{}, step], "removed_original_units": removed, "zero_shot_top1": before, "picked": [label],
                "hybrids_picked": label.count("hybrid"), "top1": top1, "params": count_params(final),
                "macs": count_macs(final), "wall_seconds_this_call": round(time.time() - t0, 1), "final": final}

    if args.only:  # a second process: one method, no report
        lock = os.path.join(RUNS, args.only + ".lock")
        os.makedirs(RUNS, exist_ok=True)
        with open(lock, "w") as f:
            f.write(str(os.getpid()))
        try:
            if args.only == ABLATION[0]:
                run("kl-progressive", *METHODS["kl-progressive"])  # (finished) so that step 1 can be shared
                run(ABLATION[0], *ABLATION[1])
            elif args.only == "kl-oneshot-joint":
                run_fixed("kl-oneshot-joint", joint_rows[0]["units"], joint_rows[0]["removed"])
            else:
                run(args.only, *METHODS[args.only])
        finally:
            os.unlink(lock)
        return

    results = [run(name, *spec) for name, spec in METHODS.items()]
    if any(r["hybrids_picked"] for r in results if r["criterion"] == "kl"):
        results.append(run(ABLATION[0], *ABLATION[1]))
    greedy = next(r for r in results if r["method"] == "kl-oneshot")["removed_original_units"]
    if sorted(joint_rows[0]["units"]) != sorted(greedy):
        results.append(run_fixed("kl-oneshot-joint", joint_rows[0]["units"], joint_rows[0]["removed"]))

    # one throughput pass over the final models, interleaved so they share the machine's state
    models = {"teacher": teacher, **{r["method"]: r.pop("final") for r in results}}
    speeds: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(bench_rounds):
        for k, m in models.items():
            speeds[k].append(throughput(m, batch_size=bench_batch, runs=bench_runs)["images_per_second"])
    speed = {k: statistics.median(v) for k, v in speeds.items()}
    teacher_row = {"top1": evaluate(teacher, val, device="cpu")["top1"], "params": count_params(teacher),
                   "macs": count_macs(teacher), "images_per_second": speed["teacher"]}
    for r in results:
        r["images_per_second"] = speed[r["method"]]

    previous = {}
    if os.path.exists(RESULT + ".json"):
        with open(RESULT + ".json") as f:
            previous = json.load(f)
    reading = previous.get("reading")
    if args.reading:
        with open(args.reading) as f:
            reading = f.read().strip()
    report = {"machine": machine_description(), "proxy": proxy_record, "train_config": cfg.__dict__,
              "teacher": teacher_row, "candidates": table, "kl_seconds": round(kl_seconds, 2),
              "block_influence_seconds": round(bi_seconds, 2), "joint_pairs": joint_rows,
              "joint_seconds": round(joint_seconds, 2),
              "spearman_kl_vs_block_influence": {"all": spearman([r["kl"] for r in table],
                                                                 [r["block_influence"] for r in table]),
                                                 "blocks": spearman([r["kl"] for r in blocks],
                                                                    [r["block_influence"] for r in blocks])},
              "results": results, "reading": reading,
              "seconds_this_call": round(time.time() - t_start, 1)}
    with open(RESULT + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(RESULT + ".md", "w") as f:
        f.write(markdown(report) + "\n")
    print(markdown(report))


def markdown(rep: dict) -> str:
    t = rep["teacher"]
    cfg = rep["train_config"]
    lines = ["# Depth pruning on the shipped ViT teacher (6 blocks, 192 wide)", "",
             f"Remove 2 blocks-worth (4 of 12 units); fine-tuning {cfg['epochs']} epochs in all per method with "
             f"distillation from the teacher (batch {cfg['batch_size']}, lr {cfg['lr']}, weight decay "
             f"{cfg['weight_decay']}, warm-up {cfg['warmup_epochs']} epoch per fine-tuning run, alpha 1, seed 0); "
             f"scores on {rep['proxy']['num_images']} training images (seed {rep['proxy']['seed']}); top-1 on the "
             "2,000 validation images; throughput at batch 128, median of 3 interleaved passes of 5 timed runs; "
             f"{rep['machine']}, "
             "shared with other jobs.", "",
             "| method | removed (original units, in order) | hybrids | params (M) | MMACs | images/s | "
             "top-1 zero-shot | top-1 after FT |", "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| teacher | - | - | {t['params'] / 1e6:.3f} | {t['macs'] / 1e6:.1f} | {t['images_per_second']:.0f} | "
             f"{t['top1']:.2f} | {t['top1']:.2f} |"]
    for r in rep["results"]:
        lines.append(f"| {r['method']} | {'; '.join(r['picked'])} | {r['hybrids_picked']} | {r['params'] / 1e6:.3f} | "
                     f"{r['macs'] / 1e6:.1f} | {r['images_per_second']:.0f} | {r['zero_shot_top1']:.2f} | "
                     f"{r['top1']:.2f} |")
    shared = [f"{r['method']} (with {r['step1_finetuning_shared_with']})" for r in rep["results"]
              if r.get("step1_finetuning_shared_with")]
    if shared:
        lines += ["", "Identical fine-tuning runs were computed once: the first step of " + ", ".join(shared) +
                  " removed the same units from the teacher, so its student and fine-tuning run (same data order, "
                  "seed and settings) are the same; each method still scored and selected by itself."]
    lines += ["", "Zero-shot: the method's final removal applied to the teacher, no fine-tuning. Per step "
              "(top-1 right after the removal, then after that step's fine-tuning):", "",
              "| method | step | removed | depth | top-1 after removal | top-1 after FT | seconds |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for r in rep["results"]:
        for s in r["log"][1:]:
            lines.append(f"| {r['method']} | {s['step']} | {describe_removed(s['removed'])} | {s['depth']} | "
                         f"{s['top1_before_ft']:.2f} | {s['top1']:.2f} | {s['step_seconds']:.0f} |")
    sp = rep["spearman_kl_vs_block_influence"]
    lines += ["", f"The teacher's candidates (KL: summed over the proxy images, {rep['kl_seconds']} s for all 11; "
              f"Block Influence: {rep['block_influence_seconds']} s). Spearman KL vs Block Influence: "
              f"{sp['all']:.3f} over "
              f"all candidates, {sp['blocks']:.3f} over whole blocks.", "",
              "| candidate | kind | KL | rank | Block Influence | rank |", "|---|---|---:|---:|---:|---:|"]
    kl_rank = {i: n + 1 for n, i in enumerate(sorted(range(len(rep["candidates"])),
                                                     key=lambda i: rep["candidates"][i]["kl"]))}
    bi_rank = {i: n + 1 for n, i in enumerate(sorted(range(len(rep["candidates"])),
                                                     key=lambda i: rep["candidates"][i]["block_influence"]))}
    for i, c in enumerate(rep["candidates"]):
        lines.append(f"| {'+'.join(c['units'])} | {c['kind']} | {c['kl']:.3f} | {kl_rank[i]} | "
                     f"{c['block_influence']:.4f} | {bi_rank[i]} |")
    jp = rep["joint_pairs"]
    lines += ["", f"Joint KL of every removable pair of candidates ({len(jp)} pairs, {rep['joint_seconds']} s): the "
              "lowest five, against the sum of their single scores (what the greedy one-shot choice assumes):", "",
              "| removed together | joint KL | sum of single KL |", "|---|---:|---:|"]
    lines += [f"| {r['removed']} | {r['kl']:.3f} | {r['sum_of_single_kl']:.3f} |" for r in jp[:5]]
    if rep.get("reading"):
        lines += ["", "## Reading", "", rep["reading"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
