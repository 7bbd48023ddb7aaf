"""Scoring messages say what was done: a data-free method reads no data and says so, the exact score
of a sentence encoder is named 1 - cos, text is counted in sequences, and a warning is printed once."""
from __future__ import annotations

import pytest

import upvit
import upvit.data
import upvit.progress as progress_module
from hf_helpers import tiny_bert, token_inputs
from upvit.cli import main
from upvit.cli_support import (
    flush_warnings,
    random_weights_warning,
    start_command,
    warn,
)

SPEC = "timm:vit_base_patch16_224,img_size=16,patch_size=4,num_classes=2,embed_dim=16,depth=1,num_heads=2"


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_data_free_methods_read_no_data(method, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a data-free method loaded data")

    monkeypatch.setattr(upvit.data, "load_data", refuse)
    out = tmp_path / "s.safetensors"
    assert main(["score", SPEC, "--data", "animal-mnist:train", "--method", method, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"{method} scores of " in stdout and "(no data used)" in stdout and "proxy" not in stdout, stdout
    scores = upvit.Scores.load(str(out))
    assert scores.meta["proxy"].get("data") is None and "num_images" not in scores.meta["proxy"]


def test_sentence_encoder_scores_are_named_1_minus_cos_and_counted_in_sequences(capsys, monkeypatch):
    monkeypatch.delenv("UPVIT_NO_PROGRESS", raising=False)
    monkeypatch.setattr(progress_module, "WARMUP_SECONDS", 0.0)
    scores = upvit.score(tiny_bert(), token_inputs(n=3), method="kl")
    assert scores.meta["criterion"] == "1 - cos" and scores.meta["divergence"] == "cosine"
    err = capsys.readouterr().err
    assert "upvit: exact 1 - cos scores: " in err and " x 3 proxy sequences = " in err, err[:400]
    assert "img" not in err and "kl" not in err.lower().replace("kl_", ""), err[:2000]


def test_a_warning_is_printed_once_per_command(capsys):
    start_command()
    warn("the same thing")
    flush_warnings()
    warn("the same thing")  # said again later in the command (e.g. by a second model load)
    flush_warnings()
    # a student and its teacher from the same timm spec without checkpoints: one random-weights line
    random_weights_warning("timm:vit_tiny_patch16_224", None)
    random_weights_warning("timm:vit_tiny_patch16_224", None, "--teacher-checkpoint")
    flush_warnings()
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines == ["upvit: warning: the same thing",
                     ("upvit: warning: timm:vit_tiny_patch16_224 has random weights (no --checkpoint given): pass "
                      "--checkpoint FILE for trained weights")], lines
    start_command()  # the next command in this process warns again
    warn("the same thing")
    flush_warnings()
    assert capsys.readouterr().err == "upvit: warning: the same thing\n"
