"""UP-ViT pruning on text: the shipped GPT-2-shaped Shakespeare LM, and the pretrained MiniLM sentence encoder.

``lm``: the shipped LM teacher (upvit/assets/lm_teacher, 4 layers, 128 wide, 4 heads, FFN 512, context
128, BPE vocabulary 2,048) is scored by the paper's exact KL (next-token distributions at every position
of a seeded proxy of training blocks), pruned to 64 wide / 2 heads (head size 32 kept) / FFN 256 (about
a third of the parameters), and distilled (CE + KL per token, batchmean over tokens) with the same budget
as the same shape selected by L2 magnitude and the same shape trained from scratch (random init, same
distillation). Perplexity on shakespeare:val before and after.

``minilm``: the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 12 heads, FFN 1536) is scored by the
exact engine with the encoder's divergence (sum over proxy sentences of 1 - cos between the original and
the channel-removed sentence embeddings), pruned to 192 / 6 heads / 768 and distilled on Shakespeare lines
by matching in-batch cosine similarities; L2 magnitude with the same budget for comparison. Measure: the
Spearman correlation between the teacher's and the student's cosine similarities over all pairs of 1,000
held-out lines (shakespeare:val, seeded), and nearest-neighbour agreement.

Every stage is resumable (scores persist site by site; finished stages are skipped; a stopped fine-tuning
continues from its last checkpoint). Writes benchmarks/results/nlp.{json,md}.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/nlp.py lm
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/nlp.py minilm
    .venv/bin/python benchmarks/nlp.py report
    .venv/bin/python benchmarks/nlp.py lm --smoke   # seconds: tiny random models, a temporary folder (also minilm)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

import torch

import upvit
from upvit.bench import count_macs, count_params
from upvit.data import sample_proxy
from upvit.distill import check_teacher
from upvit.evaluation import evaluate
from upvit.importance.api import proxy_tensor
from upvit.importance.scores import Scores
from upvit.text import embed, similarity_agreement, text_dataset
from upvit.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "runs", "nlp")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
STATE = os.path.join(RESULTS, "nlp.json")
LM_TEACHER = os.path.join(ROOT, "upvit", "assets", "lm_teacher")
MINILM_TEACHER = "hf:all-MiniLM-L6-v2"
VAL_LIMIT: int | None = None  # smoke runs evaluate on the first few validation items only

LM = dict(shape=dict(embed_dim=64, num_heads=2, mlp_hidden=256), proxy_size=64, proxy_seed=0, epochs=1, batch_size=32,
          lr=1e-3, weight_decay=0.1, warmup_epochs=0.1, grad_clip=1.0, alpha=1.0, seed=0, max_steps=None)
MINILM = dict(shape=dict(embed_dim=192, num_heads=6, mlp_hidden=768), max_length=32, proxy_size=16, proxy_seed=0,
              steps=300, batch_size=64, lr=5e-4, weight_decay=0.01, warmup_epochs=0.05, alpha=1.0, seed=0,
              eval_sentences=1000, eval_seed=1)


def load_state() -> dict[str, Any]:
    if os.path.exists(STATE):
        with open(STATE) as f:
            return json.load(f)
    return {}


def save_state(state: dict[str, Any], part: str | None = None) -> None:
    """Write ``state``; with ``part``, only that part replaces the file's (the lm and minilm runs may
    run at the same time, each owning its part)."""
    from upvit.io import atomic_write_json

    current = load_state() if part else {}
    if part:
        current[part] = state[part]
    atomic_write_json(STATE, current if part else state)


def machine() -> str:
    from upvit.demo import machine_description

    return machine_description() + " (shared with other jobs; low priority)"


def stage(state: dict[str, Any], part: str, name: str, fn) -> Any:
    """Run ``fn`` unless ``state[part][name]`` exists; record its result and wall time."""
    done = state.setdefault(part, {})
    if name in done:
        print(f"[{part}] {name}: done before", flush=True)
        return done[name]
    t0 = time.time()
    result = fn()
    if isinstance(result, dict):
        result = {**result, "seconds": round(time.time() - t0, 1)}
    done[name] = result
    save_state(state, part)
    print(f"[{part}] {name}: {json.dumps(result)[:300]}", flush=True)
    return result


def finetune_resumable(student, teacher, data, cfg: TrainConfig, out: str, alpha: float, val=None):
    """Fine-tune, continuing from ``out``'s checkpoint if a previous run stopped."""
    resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
    if resume and os.path.exists(os.path.join(out, "upvit.json")):
        shutil.rmtree(out)  # a finished directory without the stage recorded: redo cleanly
        resume = False
    return upvit.finetune(student, teacher, data, cfg, out, alpha=alpha, val_data=val, resume=resume)


# ------------------------------------------------------------------------------------------------- LM
def run_lm(state: dict[str, Any]) -> None:
    cfg = LM
    teacher = upvit.load(LM_TEACHER)
    tok = teacher.upvit_tokenizer
    dc = teacher.upvit_config.data_config
    train, info = text_dataset("shakespeare:train", tok, dc)
    val, val_info = text_dataset("shakespeare:val", tok, dc)
    if VAL_LIMIT:
        val = torch.utils.data.Subset(val, list(range(VAL_LIMIT)))
    os.makedirs(WORK, exist_ok=True)
    state.setdefault("lm", {})["settings"] = {**cfg, "train_blocks": len(train), "val_tokens": val_info.tokens,
                                              "block_size": dc["block_size"], "machine": machine()}
    save_state(state, "lm")

    def teacher_eval():
        m = evaluate(teacher, val, batch_size=64, device="cpu")
        return {"val_perplexity": m["perplexity"], "val_loss": m["loss"], "params": count_params(teacher),
                "macs": count_macs(teacher)}

    stage(state, "lm", "teacher", teacher_eval)

    scores_path = os.path.join(RESULTS, "lm_teacher_scores_p64_seed0.safetensors")

    def score():
        subset, record = sample_proxy(train, size=cfg["proxy_size"], seed=cfg["proxy_seed"])
        record["data"] = "shakespeare:train"
        proxy = proxy_tensor(subset)
        s = upvit.score(teacher, proxy, method="kl", out=scores_path, resume=os.path.exists(scores_path + ".partial"),
                        proxy_meta=record, batch_size=8, candidate_batch=16, progress=False)
        return {"file": os.path.relpath(scores_path, ROOT), "proxy_tokens": int(proxy["attention_mask"].sum()),
                "wall_time_total_s": s.meta.get("wall_time_total_s")}

    stage(state, "lm", "scores", score)
    kl = Scores.load(scores_path)
    mag = upvit.score(teacher, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, method="magnitude")
    students = {"upvit": lambda: upvit.prune(teacher, upvit.make_plan(teacher, kl, **cfg["shape"])),
                "magnitude": lambda: upvit.prune(teacher, upvit.make_plan(teacher, mag, **cfg["shape"])),
                "scratch": lambda: scratch_lm(teacher, cfg["shape"])}
    train_cfg = TrainConfig(epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                            weight_decay=cfg["weight_decay"], warmup_epochs=cfg["warmup_epochs"],
                            grad_clip=cfg["grad_clip"], seed=cfg["seed"], max_steps_per_epoch=cfg["max_steps"])
    for name, build in students.items():
        def run(name=name, build=build):
            student = build()
            before = evaluate(student, val, batch_size=64, device="cpu")
            out = os.path.join(WORK, f"lm-{name}")
            t0 = time.time()
            rec = finetune_resumable(student, teacher, train, train_cfg, out, cfg["alpha"], val)
            return {"val_perplexity_before": before["perplexity"], "val_perplexity": rec["val_perplexity"],
                    "val_loss": rec["val_loss"], "params": count_params(student), "macs": count_macs(student),
                    "finetune_seconds": round(time.time() - t0, 1), "dir": os.path.relpath(out, ROOT)}
        stage(state, "lm", name, run)


def scratch_lm(teacher, shape: dict[str, int]):
    """The pruned shape, randomly initialised (transformers' own init, seed 0), with the teacher's tokenizer."""
    from upvit.hf import build_hf_model

    cfg = teacher.config
    kwargs = {"n_layer": cfg.n_layer, "n_embd": shape["embed_dim"], "n_head": shape["num_heads"],
              "n_inner": shape["mlp_hidden"], "n_positions": cfg.n_positions, "vocab_size": cfg.vocab_size,
              "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    model = build_hf_model("GPT2LMHeadModel", kwargs)
    model.upvit_tokenizer = teacher.upvit_tokenizer
    model.upvit_config.data_config = dict(teacher.upvit_config.data_config)
    check_teacher(model, teacher)
    return model


# ------------------------------------------------------------------------------------------------- MiniLM
def run_minilm(state: dict[str, Any]) -> None:
    cfg = MINILM
    teacher = upvit.load_model(MINILM_TEACHER)
    teacher.upvit_config.data_config["max_length"] = cfg["max_length"]
    tok = teacher.upvit_tokenizer
    dc = teacher.upvit_config.data_config
    train, info = text_dataset("shakespeare:train", tok, dc)
    val, _ = text_dataset("shakespeare:val", tok, dc)
    g = torch.Generator().manual_seed(cfg["eval_seed"])
    eval_idx = sorted(torch.randperm(len(val), generator=g)[:cfg["eval_sentences"]].tolist())
    held_out = torch.utils.data.Subset(val, eval_idx)
    os.makedirs(WORK, exist_ok=True)
    state.setdefault("minilm", {})["settings"] = {**cfg, "train_sentences": len(train), "machine": machine(),
                                                  "eval": f"{len(eval_idx)} random shakespeare:val lines (seed "
                                                          f"{cfg['eval_seed']}), "
                                                          f"{len(eval_idx) * (len(eval_idx) - 1) // 2} pairs"}
    save_state(state, "minilm")
    ref = embed(teacher, held_out, batch_size=128)

    def agreement(model) -> dict[str, float]:
        return similarity_agreement(ref, embed(model, held_out, batch_size=128))

    stage(state, "minilm", "teacher", lambda: {"params": count_params(teacher), "macs": count_macs(teacher),
                                               **agreement(teacher)})
    scores_path = os.path.join(RESULTS, "minilm_scores_p16_seed0.safetensors")

    def score():
        subset, record = sample_proxy(train, size=cfg["proxy_size"], seed=cfg["proxy_seed"])
        record["data"] = "shakespeare:train"
        proxy = proxy_tensor(subset)
        length = int(proxy["attention_mask"].sum(1).max())  # trailing all-padding columns change nothing
        proxy = {k: v[:, :length] for k, v in proxy.items()}
        record["trimmed_length"] = length
        s = upvit.score(teacher, proxy, method="kl", out=scores_path, resume=os.path.exists(scores_path + ".partial"),
                        proxy_meta=record, batch_size=16, progress=False)
        return {"file": os.path.relpath(scores_path, ROOT), "divergence": s.meta.get("divergence"),
                "proxy_tokens": int(proxy["attention_mask"].sum()),
                "wall_time_total_s": s.meta.get("wall_time_total_s")}

    stage(state, "minilm", "scores", score)
    kl = Scores.load(scores_path)
    mag = upvit.score(teacher, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, method="magnitude")
    train_cfg = TrainConfig(epochs=1, max_steps_per_epoch=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                            weight_decay=cfg["weight_decay"], warmup_epochs=cfg["warmup_epochs"], seed=cfg["seed"])
    for name, scores in (("upvit", kl), ("magnitude", mag)):
        def run(name=name, scores=scores):
            student = upvit.prune(teacher, upvit.make_plan(teacher, scores, **cfg["shape"]))
            before = agreement(student)
            out = os.path.join(WORK, f"minilm-{name}")
            t0 = time.time()
            finetune_resumable(student, teacher, train, train_cfg, out, cfg["alpha"])
            after = agreement(upvit.load(out))
            return {"before": before, "after": after, "params": count_params(student), "macs": count_macs(student),
                    "finetune_seconds": round(time.time() - t0, 1), "dir": os.path.relpath(out, ROOT)}
        stage(state, "minilm", name, run)


# ------------------------------------------------------------------------------------------------- report
def report(state: dict[str, Any]) -> str:
    lines = ["# UP-ViT on text: a GPT-2-shaped LM and MiniLM", ""]
    lm = state.get("lm", {})
    if "teacher" in lm:
        s, t = lm["settings"], lm["teacher"]
        lines += ["## Shakespeare LM (GPT-2 shape)", "",
                  f"Teacher: upvit/assets/lm_teacher, {t['params']:,} parameters, validation perplexity "
                  f"{t['val_perplexity']:.2f} ({s['val_tokens']:,} shakespeare:val tokens). Students: "
                  f"{s['shape']['embed_dim']} wide / {s['shape']['num_heads']} heads / FFN {s['shape']['mlp_hidden']}; "
                  f"{s['epochs']} epoch of distillation each (batch {s['batch_size']} x {s['block_size']} tokens, "
                  f"lr {s['lr']}, alpha {s['alpha']}).", "",
                  "| model | params | share | MACs / block | val ppl before FT | val ppl after FT | FT time (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|",
                  f"| teacher | {t['params']:,} | 100% | {t['macs']:,} | {t['val_perplexity']:.2f} | - | - |"]
        for name in ("upvit", "magnitude", "scratch"):
            r = lm.get(name)
            if r:
                lines.append(f"| {name} | {r['params']:,} | {r['params'] / t['params']:.1%} | {r['macs']:,} | "
                             f"{r['val_perplexity_before']:.1f} | {r['val_perplexity']:.2f} | "
                             f"{r['finetune_seconds']:.0f} |")
        curve = teacher_curve()
        if curve:
            lines += ["", "Teacher training curve (`upvit/assets/lm_teacher/log.jsonl`):", "", curve]
        if "scores" in lm:
            lines += ["", f"Scores: exact KL on {s['proxy_size']} training blocks (seed {s['proxy_seed']}, "
                          f"{lm['scores']['proxy_tokens']:,} tokens), "
                          f"{lm['scores'].get('wall_time_total_s') or lm['scores']['seconds']:.0f} s of scoring "
                          f"in all; `{lm['scores']['file']}`."]
        lines.append("")
    mini = state.get("minilm", {})
    if "teacher" in mini:
        s, t = mini["settings"], mini["teacher"]
        lines += ["## MiniLM sentence encoder (all-MiniLM-L6-v2)", "",
                  f"Teacher: {t['params']:,} parameters. Students: {s['shape']['embed_dim']} / "
                  f"{s['shape']['num_heads']} heads / {s['shape']['mlp_hidden']}; {s['steps']} distillation steps of "
                  f"{s['batch_size']} lines "
                  f"(in-batch cosine-similarity matching). Measure on {s['eval']}.", "",
                  "| model | params | Spearman before FT | Spearman after FT | NN agreement before "
                  "| NN agreement after |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| teacher | {t['params']:,} | {t['spearman']:.4f} | - | {t['nn_agreement']:.3f} | - |"]
        for name in ("upvit", "magnitude"):
            r = mini.get(name)
            if r:
                lines.append(f"| {name} | {r['params']:,} | {r['before']['spearman']:.4f} | "
                             f"{r['after']['spearman']:.4f} | {r['before']['nn_agreement']:.3f} | "
                             f"{r['after']['nn_agreement']:.3f} |")
        if "scores" in mini:
            lines += ["", f"Scores: exact engine, 1 - cos divergence, {s['proxy_size']} training lines (seed "
                          f"{s['proxy_seed']}, {mini['scores']['proxy_tokens']} tokens), "
                          f"{mini['scores'].get('wall_time_total_s') or mini['scores']['seconds']:.0f} s of scoring "
                          f"in all (much of it under heavy load); `{mini['scores']['file']}`."]
        lines.append("")
    if state.get("reading"):
        lines += ["## Reading", "", state["reading"], ""]
    machine_line = (lm.get("settings") or mini.get("settings") or {}).get("machine")
    if machine_line:
        lines += [f"Machine: {machine_line}.", ""]
    return "\n".join(lines)


def teacher_curve() -> str:
    """The LM teacher's per-epoch log as a Markdown table ('' if it is not there)."""
    path = os.path.join(LM_TEACHER, "log.jsonl")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = ["| epoch | train CE | val CE | val perplexity | next-token top-1 | epoch time (s) |",
           "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['epoch']} | {r['train_ce']:.3f} | {r['val_loss']:.3f} | {r['val_perplexity']:.2f} | "
                   f"{r['val_top1']:.1f}% | {r['epoch_seconds']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["lm", "minilm", "report"])
    ap.add_argument("--reading", help="report: a Markdown file with the hand-written reading to attach")
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny random stand-ins of both teachers, a few "
                    "items, results to a temporary folder (checks that the script runs, its numbers mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        smoke()
    torch.manual_seed(0)
    state = load_state()
    if args.part == "lm":
        run_lm(state)
    elif args.part == "minilm":
        run_minilm(state)
    state = load_state() if args.part == "report" else state
    if args.reading:
        with open(args.reading) as f:
            state["reading"] = f.read().strip()
        save_state(state, "reading")
    with open(os.path.join(RESULTS, "nlp.md"), "w") as f:
        f.write(report(state))


def smoke() -> None:
    """Point every path at a scratch folder and shrink every setting (see ``--smoke``)."""
    global WORK, RESULTS, STATE, LM_TEACHER, MINILM_TEACHER, VAL_LIMIT
    from _smoke import smoke_dir, tiny_teacher

    RESULTS = smoke_dir("nlp")
    WORK, STATE = os.path.join(RESULTS, "work"), os.path.join(RESULTS, "nlp.json")
    LM_TEACHER, MINILM_TEACHER = tiny_teacher("gpt2", RESULTS), tiny_teacher("bert", RESULTS)
    VAL_LIMIT = 8
    import upvit.text

    read = upvit.text.read_text_spec
    upvit.text.read_text_spec = lambda spec: (lambda docs, record: (docs[:1], record))(*read(spec))  # one work each
    LM.update(shape=dict(embed_dim=8, num_heads=1, mlp_hidden=16), proxy_size=4, max_steps=1)
    MINILM.update(shape=dict(embed_dim=8, num_heads=2, mlp_hidden=16), proxy_size=4, steps=1, eval_sentences=16)


if __name__ == "__main__":
    main()
