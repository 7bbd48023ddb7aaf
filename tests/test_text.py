"""Text data, per-token training/evaluation/distillation, sentence-similarity measures, and the CLI on
hf: models with text data."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import upvit
from hf_helpers import tiny_gpt2, token_inputs
from upvit.distill import distillation_loss, similarity_mse
from upvit.errors import UpvitError
from upvit.evaluation import evaluate
from upvit.hf import load_tokenizer
from upvit.text import (
    ASSET_TOKENIZER,
    TokenBlocks,
    shakespeare,
    shakespeare_works,
    similarity_agreement,
    split_text,
    text_dataset,
)

SAMPLE = """ROMEO.
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she:
Be not her maid, since she is envious;
Her vestal livery is but sick and green,
And none but fools do wear it; cast it off.
"""


def test_shakespeare_split_is_fixed_complete_and_disjoint():
    works = shakespeare_works()
    assert len(works) == 42 and works[0][0] == "alls_well_that_ends_well"
    train, val = shakespeare("train"), shakespeare("val")
    for (name, text), (n1, a), (n2, b) in zip(works, train, val):
        assert name == n1 == n2 and a + b == text and a.endswith("\n")
        assert 0.85 < len(a) / len(text) < 0.95
    total = sum(len(t) for _, t in works)
    assert 4.9e6 < total < 5.2e6  # ~5 MB of plain text
    assert split_text("ab\ncd\nef\n", 0.5) == ("ab\ncd\n", "ef\n")


def test_token_blocks_are_next_token_windows():
    ids = torch.arange(23)
    ds = TokenBlocks(ids, 5)
    assert len(ds) == 4  # (23 - 1) // 5 windows of 6 tokens with stride 5
    for i in range(len(ds)):
        inputs, labels = ds[i]
        assert torch.equal(inputs["input_ids"], torch.arange(5 * i, 5 * i + 5))
        assert torch.equal(labels, torch.arange(5 * i + 1, 5 * i + 6))
        assert inputs["attention_mask"].sum() == 5


def test_shipped_tokenizer_round_trips_text():
    tok = load_tokenizer(ASSET_TOKENIZER)
    assert len(tok) == 2048 and tok.eos_token_id == tok.pad_token_id == 0
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == SAMPLE and len(ids) < len(SAMPLE) / 2


def test_text_spec_needs_a_text_model_and_a_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text(SAMPLE * 3)
    tok = load_tokenizer(ASSET_TOKENIZER)
    ds, info = text_dataset(f"text:{tmp_path}", tok, {"task": "causal-lm", "block_size": 16})
    assert len(ds) == info.samples > 3 and info.data_config() == {"task": "causal-lm", "block_size": 16}
    sentences, info = text_dataset(f"text:{tmp_path / 'a.txt'}", tok, {"task": "sentence-embedding", "max_length": 12})
    inputs, labels = sentences[0]
    assert inputs["input_ids"].shape == (12,) and (labels == -100).all()
    with pytest.raises(UpvitError, match="needs a text model"):
        text_dataset("shakespeare:val", tok, {"input_size": [1, 28, 28]})
    with pytest.raises(UpvitError, match="needs the model's tokenizer"):
        text_dataset("shakespeare:val", None, {"task": "causal-lm"})
    with pytest.raises(UpvitError, match="does not exist"):
        text_dataset(f"text:{tmp_path / 'missing'}", tok, {"task": "causal-lm"})


def test_perplexity_is_the_exponential_of_the_mean_token_cross_entropy():
    model = tiny_gpt2(seed=1)
    ids = torch.randint(0, 40, (60,), generator=torch.Generator().manual_seed(0))
    ds = TokenBlocks(ids, 8)
    metrics = evaluate(model, ds, batch_size=3, device="cpu")
    with torch.no_grad():
        x = torch.stack([ds[i][0]["input_ids"] for i in range(len(ds))])
        y = torch.stack([ds[i][1] for i in range(len(ds))])
        logits = model(input_ids=x).logits.double()
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert metrics["n"] == y.numel()
    assert metrics["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_token_level_distillation_averages_over_positions_with_a_target():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[1, 2, -100], [0, 4, 3]])
    loss, ce, kl = distillation_loss(s, t, labels, alpha=0.5)
    rows = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    ce_ref = sum(-torch.log_softmax(s[i, j], -1)[labels[i, j]] for i, j in rows) / 5
    kl_ref = sum((torch.softmax(t[i, j], -1) * (torch.log_softmax(t[i, j], -1) - torch.log_softmax(s[i, j], -1))).sum()
                 for i, j in rows) / 5
    assert float(ce) == pytest.approx(float(ce_ref), rel=1e-6)
    assert float(kl) == pytest.approx(float(kl_ref), rel=1e-6)
    assert float(loss) == pytest.approx(float(ce_ref + 0.5 * kl_ref), rel=1e-6)


def test_similarity_measures_on_hand_made_embeddings():
    # unit vectors at 0, 36.87, 90 and 126.87 degrees: pair cosines .8, 0, -.6, .6, 0, .8
    e = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]], dtype=torch.float64)
    same = similarity_agreement(e, e)
    assert same == {"spearman": pytest.approx(1.0), "nn_agreement": 1.0, "pairs": 6}
    # rotating every embedding keeps all cosines: still perfect agreement, whatever the width
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert similarity_agreement(e, e @ rot)["spearman"] == pytest.approx(1.0)
    # swapping the first two sentences: cosines .8, .6, 0, 0, -.6, .8; with average ranks for ties
    # (5.5, 2.5, 1, 4, 2.5, 5.5) vs (5.5, 4, 2.5, 2.5, 1, 5.5) the Spearman correlation is 12 / 16.5
    swapped = similarity_agreement(e, e[[1, 0, 2, 3]])
    assert swapped["spearman"] == pytest.approx(12 / 16.5) and swapped["nn_agreement"] == 1.0
    # in-batch similarity distillation: zero for equal similarity structure, the mean squared gap otherwise
    assert float(similarity_mse(e, e @ rot)) == pytest.approx(0.0, abs=1e-12)
    other = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=-1)
    gap = (e @ e.T - other @ other.T)[~torch.eye(4, dtype=torch.bool)]
    assert float(similarity_mse(other, e)) == pytest.approx(float((gap ** 2).mean()))


def test_fine_tuning_a_tied_lm_with_ema_keeps_the_tie_and_averages_once(tmp_path):
    from upvit.train import TrainConfig, fit

    model = tiny_gpt2(seed=2)
    ds = TokenBlocks(torch.randint(0, 40, (200,), generator=torch.Generator().manual_seed(1)), 8)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2, warmup_epochs=0, ema_decay=0.5, max_steps_per_epoch=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, ds, cfg, str(tmp_path / "run"))
    ema = upvit.load(str(tmp_path / "run"))
    assert ema.lm_head.weight is ema.transformer.wte.weight
    expected = 0.5 * before["transformer.wte.weight"] + 0.5 * model.transformer.wte.weight.detach()
    torch.testing.assert_close(ema.transformer.wte.weight.detach(), expected)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args, timeout=600):
    """The CLI in a fresh process (the entry point as users run it)."""
    return subprocess.run([sys.executable, "-m", "upvit", *args], capture_output=True, text=True, timeout=timeout,
                          env={"HF_HUB_OFFLINE": "1", "UPVIT_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1"})


@pytest.fixture
def cli(capsys):
    """The CLI's main() in this process (parsing, commands, one-line errors), much faster than a subprocess."""
    from upvit.cli import main

    def call(*args):
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return call


def test_cli_train_eval_score_prune_finetune_bench_on_a_text_lm(tmp_path, cli):
    (tmp_path / "corpus.txt").write_text(SAMPLE * 6)
    spec = f"hf:gpt2,n_layer=2,n_embd=24,n_head=4,n_inner=32,n_positions=16,tokenizer={ASSET_TOKENIZER}"
    data = f"text:{tmp_path / 'corpus.txt'}"
    teacher, scores, pruned, tuned = (str(tmp_path / n) for n in ("teacher", "s.safetensors", "pruned", "tuned"))
    r = cli("train", spec, "--data", data, "--val-data", data, "--epochs", "1", "--batch-size", "4",
                "--max-steps-per-epoch", "2", "--label-smoothing", "0", "--out", teacher)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.split("wrote ", 1)[1].split(": ", 1)[1])["val_perplexity"] > 1
    with open(os.path.join(teacher, "log.jsonl")) as f:  # a text model counts sequences, not images
        record = json.loads(f.readline())
    assert record["sequences_per_second"] > 0 and "images_per_second" not in record
    r = run_cli("eval", teacher, "--data", data)  # once through the real entry point
    assert r.returncode == 0 and r.stdout.startswith("perplexity "), r.stderr
    r = cli("score", teacher, "--data", data, "--proxy-size", "3", "--out", scores)
    assert r.returncode == 0, r.stderr
    assert "exact kl scores of" in r.stdout and "on 3 proxy sequences" in r.stdout
    r = cli("prune", teacher, "--scores", scores, "--embed-dim", "12", "--num-heads", "2", "--mlp-hidden", "16",
                "--out", pruned)
    assert r.returncode == 0, r.stderr
    r = cli("prune", teacher, "--scores", scores, "--embed-dim", "12", "--attn-dim", "24", "--out", pruned + "2")
    assert r.returncode == 2 and "no pruned_heads" in r.stderr and r.stderr.count("\n") == 1
    r = cli("finetune", pruned, "--teacher", teacher, "--data", data, "--val-data", data, "--epochs", "1",
                "--batch-size", "4", "--max-steps-per-epoch", "2", "--out", tuned)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(tuned)
    assert plain.config.n_embd == 12 and plain.lm_head.weight is plain.transformer.wte.weight
    assert len(AutoTokenizer.from_pretrained(tuned)) == 2048
    r = cli("bench", teacher, tuned, "--batch-size", "2", "--runs", "1", "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "b.json").read_text())
    assert rows[0]["input_size"] == [16] and rows[1]["macs"] < rows[0]["macs"] and rows[1]["tokens_per_second"] > 0
    r = cli("eval", teacher, "--data", "animal-mnist:val")
    assert r.returncode == 2 and "this is a text model" in r.stderr


def test_cli_sentence_encoder_score_prune_finetune_and_similarity_eval(tmp_path, cli):
    (tmp_path / "corpus.txt").write_text(SAMPLE * 2)
    data = f"text:{tmp_path / 'corpus.txt'}"
    spec = (f"hf:BertModel,num_hidden_layers=2,hidden_size=24,num_attention_heads=4,intermediate_size=32,"
            f"max_position_embeddings=32,tokenizer={ASSET_TOKENIZER}")
    model = upvit.load_model(spec)
    model.upvit_config.data_config["max_length"] = 16
    enc = str(tmp_path / "enc")
    upvit.save(model, enc)
    scores, pruned, tuned = (str(tmp_path / n) for n in ("s.safetensors", "pruned", "tuned"))
    r = cli("score", enc, "--data", data, "--proxy-size", "4", "--out", scores)
    assert r.returncode == 0, r.stderr
    s = upvit.Scores.load(scores)
    # the criterion is named for what it is, in the message and the metadata
    assert "exact 1 - cos scores of" in r.stdout and "kl scores" not in r.stdout, r.stdout
    assert s.meta["criterion"] == "1 - cos" and all((t >= -1e-9).all() for _, t in s.items())
    r = cli("prune", enc, "--scores", scores, "--ratio", "0.5", "--out", pruned)
    assert r.returncode == 0, r.stderr
    r = cli("finetune", pruned, "--teacher", enc, "--data", data, "--epochs", "1", "--batch-size", "4",
                "--max-steps-per-epoch", "2", "--out", tuned)
    assert r.returncode == 0, r.stderr
    r = cli("eval", tuned, "--data", data, "--teacher", enc)
    assert r.returncode == 0 and r.stdout.startswith("similarity Spearman "), r.stderr
    r = cli("eval", tuned, "--data", data)
    assert r.returncode == 2 and "--teacher" in r.stderr


def test_score_of_a_text_proxy_is_the_sum_over_tokens():
    model, x = tiny_gpt2(seed=3), token_inputs(n=4, pad_last=0)
    whole = upvit.score(model, x, method="kl", candidates={"attn.1": [2, 9]}, progress=False)["attn.1"]
    parts = [upvit.score(model, {k: v[i:i + 1] for k, v in x.items()}, method="kl", candidates={"attn.1": [2, 9]},
                         progress=False)["attn.1"] for i in range(4)]
    torch.testing.assert_close(whole[[2, 9]], sum(p[[2, 9]] for p in parts), rtol=1e-6, atol=0)


def test_trailing_padding_columns_are_trimmed_without_changing_a_score():
    from upvit.importance.api import trim_padding

    model, x = tiny_gpt2(seed=4), token_inputs(n=3, length=10, pad_last=0)
    x["attention_mask"][:, 7:] = 0  # every sample padded after position 7
    trimmed = trim_padding(x)
    assert trimmed["input_ids"].shape == (3, 7) and torch.equal(trimmed["input_ids"], x["input_ids"][:, :7])
    cands = {"res.0": [0, 3], "ffn.1": [1, 8]}
    full = upvit.score(model, x, method="kl", candidates=cands, progress=False)
    short = upvit.score(model, trimmed, method="kl", candidates=cands, progress=False)
    for key, idx in cands.items():
        torch.testing.assert_close(full[key][idx], short[key][idx], rtol=1e-5, atol=0)
