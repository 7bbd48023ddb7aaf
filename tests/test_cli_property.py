"""Property: any bad argument to any subcommand is a non-zero exit, exactly one line on stderr, no
traceback, and no file written.

Every example starts from arguments that would run (a tiny model, a tiny ImageFolder, outputs in a
scratch directory) and breaks exactly one thing, so the failure is the bad argument's. The CLI runs
in-process (``upvit.cli.main``) so hundreds of examples take seconds; every check it makes on
arguments happens before data is read or anything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import snapshot, tiny_vit, write_image_folder
from plan_helpers import random_scores
from upvit.cli import main
from upvit.cli_support import fraction, nonneg_float, nonneg_int, open_unit, positive_float, positive_int, rate
from upvit.io import save

SPEC = "timm:vit_base_patch16_224,img_size=16,patch_size=4,num_classes=2,embed_dim=16,depth=1,num_heads=2"

# numeric options of every command and the validator that defines their valid values
NUMERIC = {
    "train": {"--epochs": positive_int, "--batch-size": positive_int, "--lr": positive_float, "--min-lr": nonneg_float,
              "--weight-decay": nonneg_float, "--warmup-epochs": nonneg_float, "--label-smoothing": rate,
              "--drop-path": rate, "--ema-decay": open_unit, "--workers": nonneg_int, "--seed": nonneg_int,
              "--max-steps-per-epoch": positive_int},
    "finetune": {"--epochs": positive_int, "--alpha": nonneg_float, "--temperature": positive_float,
                 "--batch-size": positive_int, "--lr": positive_float, "--min-lr": nonneg_float,
                 "--weight-decay": nonneg_float, "--warmup-epochs": nonneg_float, "--ema-decay": open_unit,
                 "--workers": nonneg_int, "--seed": nonneg_int, "--max-steps-per-epoch": positive_int},
    "eval": {"--batch-size": positive_int, "--knn-k": positive_int},
    "bench": {"--batch-size": positive_int, "--runs": positive_int},
    "score": {"--proxy-size": positive_int, "--per-class": positive_int, "--seed": nonneg_int,
              "--batch-size": positive_int, "--ratios": fraction},
    "prune": {"--embed-dim": positive_int, "--num-heads": positive_int, "--mlp-hidden": positive_int,
              "--attn-dim": positive_int, "--ratio": fraction, "--proxy-size": positive_int, "--proxy-seed": nonneg_int,
              "--budget-grid": positive_int, "--budget-batch": positive_int},
    "demo": {"--epochs": positive_int, "--proxy-size": positive_int},
    "export": {"--opset": positive_int, "--rtol": positive_float},
    "depth": {"--remove": positive_int, "--steps": positive_int, "--candidate-blocks": positive_int,
              "--proxy-size": positive_int, "--per-class": positive_int, "--proxy-seed": nonneg_int,
              "--epochs": nonneg_int, "--alpha": nonneg_float, "--temperature": positive_float,
              "--batch-size": positive_int, "--lr": positive_float, "--min-lr": nonneg_float,
              "--weight-decay": nonneg_float, "--warmup-epochs": nonneg_float, "--score-batch-size": positive_int,
              "--bench-batch": positive_int, "--bench-runs": positive_int, "--ema-decay": open_unit,
              "--workers": nonneg_int, "--seed": nonneg_int, "--max-steps-per-epoch": positive_int},
}
HANDPICKED = ["0", "-1", "-0.5", "1.5", "nan", "inf", "-inf", "", "x", "1e400", "0x10", "1,5", "2 3", "\x00", "--"]


class World:
    """Inputs every command can run on, in a scratch directory that examples must leave untouched."""

    def __init__(self, root) -> None:
        self.root = str(root)
        model = tiny_vit(num_classes=2, embed_dim=16, num_heads=2, depth=1)
        save(model, os.path.join(self.root, "model"))
        random_scores(model).save(os.path.join(self.root, "scores.safetensors"))
        write_image_folder(os.path.join(self.root, "data"), per_class=2, size=16)
        os.makedirs(os.path.join(self.root, "full"))
        with open(os.path.join(self.root, "full", "keep.txt"), "w") as f:
            f.write("mine")
        with open(os.path.join(self.root, "old.safetensors"), "wb") as f:
            f.write(b"hours of scoring")

    def base(self, command: str) -> list[str]:
        """Arguments that would run (relative paths: the example runs inside the scratch directory)."""
        return {
            "train": ["train", SPEC, "--data", "data", "--out", "runs/t", "--epochs", "1", "--batch-size", "2"],
            "finetune": ["finetune", "model", "--teacher", "model", "--data", "data", "--out", "runs/f",
                         "--epochs", "1", "--batch-size", "2"],
            "eval": ["eval", "model", "--data", "data", "--json", "runs/e.json"],
            "bench": ["bench", "model", "--runs", "1", "--batch-size", "1", "--json", "runs/b.json"],
            "score": ["score", "model", "--data", "data", "--proxy-size", "2", "--method", "magnitude", "--out",
                      "runs/s.safetensors"],
            "prune": ["prune", "model", "--scores", "scores.safetensors", "--ratio", "0.5", "--out", "runs/p"],
            "demo": ["demo", "--quick", "--teacher", "model", "--out", "runs/d"],
            "export": ["export", "model", "--out", "runs/m.onnx"],
            "depth": ["depth", "model", "--data", "data", "--remove", "1", "--epochs", "0", "--proxy-size", "2",
                      "--out", "runs/dp"],
        }[command]


def _invalid(validator, text: str) -> bool:
    try:
        validator(text)
    except argparse.ArgumentTypeError:
        return True
    return False


def _set(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option`` set to ``value`` (replaced if present, appended if not)."""
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
        return argv
    return argv + [option, value]


def _without(argv: list[str], option: str) -> list[str]:
    i = argv.index(option)
    return argv[:i] + argv[i + 2:]


@st.composite
def bad_invocations(draw, world: World) -> list[str]:
    command = draw(st.sampled_from(sorted(NUMERIC)))
    argv = world.base(command)
    kinds = ["number", "unknown-option", "missing-input", "bad-model"]
    if "--out" in argv:
        kinds += ["out-taken", "out-is-input"]
    if command != "demo":
        kinds += ["missing-required"]
    if command in ("train", "finetune", "eval", "score", "depth"):
        kinds += ["bad-data"]
    if command in ("eval", "bench", "score"):
        kinds += ["bad-device"]
    if command in ("eval", "bench"):
        kinds += ["json-is-dir"]
    if command in ("score", "demo"):
        kinds += ["bad-method"]
    if command in ("train", "finetune", "eval", "depth"):
        kinds += ["bad-class-map"]
    kind = draw(st.sampled_from(kinds))
    if kind == "number":
        option, validator = draw(st.sampled_from(sorted(NUMERIC[command].items())))
        value = draw(st.sampled_from(HANDPICKED) | st.text(max_size=8) | st.integers(-10**6, 0).map(str)
                     | st.floats(allow_nan=True, allow_infinity=True).map(repr))
        if not _invalid(validator, value):
            value = "0" if validator not in (nonneg_int, nonneg_float, rate) else "-1"
        # OPTION=VALUE, so that values such as "-1" or "--" stay values
        return (_without(argv, option) if option in argv else argv) + [f"{option}={value}"]
    if kind == "unknown-option":
        return argv + [draw(st.sampled_from(["--no-such-option", "--lr-max=1", "--outt", "-z"]))]
    if kind == "missing-input":
        return _set(argv, "--teacher", "nowhere") if command in ("finetune", "demo") else \
            [argv[0], "nowhere/model", *argv[2:]]
    if kind == "bad-model":
        spec = draw(st.sampled_from(["timm:no_such_model_xyz", "timm:vit_base_patch16_224,img_size",
                                     "timm:vit_base_patch16_224,no_such_kwarg=3", "data", "scores.safetensors"]))
        return _set(argv, "--teacher", spec) if command == "demo" else [argv[0], spec, *argv[2:]]
    if kind == "out-taken":
        return _set(argv, "--out", "old.safetensors" if command == "score" else "full")
    if kind == "out-is-input":
        return _set(argv, "--out", "model/scores.safetensors" if command == "score" else "model")
    if kind == "missing-required":
        required = {"train": "--out", "finetune": "--teacher", "eval": "--data", "score": "--out", "prune": "--out",
                    "export": "--out", "depth": "--remove"}
        if command == "bench":
            return argv[:1] + argv[2:]  # no model at all
        return _without(argv, required[command])
    if kind == "bad-data":
        return _set(argv, "--data", draw(st.sampled_from(["nowhere", "animal-mnist:nosplit", "model/config.json"])))
    if kind == "bad-device":
        choices = ["cuda:99", "tpu", "gpu0", "cpu:x"] + ([] if torch.cuda.is_available() else ["cuda"])
        return _set(argv, "--device", draw(st.sampled_from(choices)))
    if kind == "json-is-dir":
        return _set(argv, "--json", "full")
    if kind == "bad-method":
        return _set(argv, "--method", draw(st.sampled_from(["klx", "", "magnitude2", "KL "])))
    if kind == "bad-class-map":
        return _set(argv, "--class-map",
                    draw(st.sampled_from(["zzz", "a=", "a=b,b=a", "a=0", "nowhere.json", "by-name"])))
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("cli-world"))


def test_every_bad_argument_is_one_line_and_writes_nothing(world):
    before = snapshot(world.root)
    tree_before = sorted(os.walk(world.root))

    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(bad_invocations(world))
    def check(argv):
        err, out = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(world.root)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main(argv)
        finally:
            os.chdir(cwd)
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert code != 0, (argv, out.getvalue())
        assert len(lines) == 1, (argv, err.getvalue())
        assert "Traceback" not in err.getvalue(), argv
        assert "error:" in lines[0] and "error: unexpected " not in lines[0], (argv, lines[0])  # no crash
        assert sorted(os.walk(world.root)) == tree_before, argv  # no new file or folder
        assert snapshot(world.root) == before, argv

    check()
