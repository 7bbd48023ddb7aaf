"""`upvit score`: proxy sampling and metadata, torchrun with 2 processes, one-line errors. The CLI runs in-process
(``helpers.run_main``, one thread: the summation order of a one-thread subprocess) except where a fresh process is
the point (torchrun, an argument error through the real entry point)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import upvit
from helpers import run_main, tiny_vit
from naive_vit import naive_score
from upvit.adapters import get_adapter
from upvit.data import load_data, sample_proxy
from upvit.importance.api import proxy_tensor
from upvit.importance.kl import kl_scores
from upvit.io import save

ENV = {"HF_HUB_OFFLINE": "1", "UPVIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def run(args: list[str], timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})})


def assert_one_line_error(result, fragment):
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and fragment in lines[0], result.stderr


def mnist_model(tmp_path, name="m", seed=0):
    model = tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10, seed=seed)
    model.upvit_config.data_config.update({"mean": [0.2725], "std": [0.4056]})
    save(model, str(tmp_path / name))
    return model, str(tmp_path / name)


@pytest.mark.usefixtures("one_thread")
def test_cli_score_samples_proxy_and_records_metadata(tmp_path):
    model, mdir = mnist_model(tmp_path)
    out = str(tmp_path / "s.safetensors")
    r = run_main("score", mdir, "--data", "animal-mnist:train", "--proxy-size", "6", "--seed", "3", "--batch-size", "4",
                 "--out", out)
    assert r.returncode == 0, r.stderr
    scores = upvit.Scores.load(out)
    meta = scores.meta
    assert meta["criterion"] == "kl" and meta["seed"] == 3 and meta["num_images"] == 6
    assert (meta["proxy"]["sampling"] == "random" and meta["proxy"]["seed"] == 3
            and meta["proxy"]["data"] == "animal-mnist:train")
    assert meta["model"]["depths"] == [2] and meta["wall_time_s"] > 0 and meta["model_spec"] == mdir

    # the same proxy images, drawn independently, scored in-process and by the naive reference
    dataset, _ = load_data("animal-mnist:train")
    subset, _ = sample_proxy(dataset, size=6, seed=3)
    images = proxy_tensor(subset)
    local = kl_scores(get_adapter(model), images, batch_size=4, progress=False)  # one thread, as the CLI run
    for key, t in local.items():
        torch.testing.assert_close(scores[key], t, rtol=1e-6, atol=0.0)
    for key, c in (("res.0", 5), ("attn.1", 2), ("ffn.0", 7)):
        assert math.isclose(float(scores[key][c]), naive_score(model, images, key, c), rel_tol=1e-4)


def test_cli_per_class_proxy(tmp_path):
    _, mdir = mnist_model(tmp_path)
    out = str(tmp_path / "s.safetensors")
    r = run_main("score", mdir, "--data", "animal-mnist:train", "--per-class", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    meta = upvit.Scores.load(out).meta
    assert meta["proxy"]["sampling"] == "per_class" and meta["proxy"]["num_images"] == 10 and meta["num_images"] == 10


@pytest.mark.usefixtures("one_thread")  # the one-process run in-process, with the ranks' one thread each
def test_torchrun_two_processes_identical_to_one(tmp_path):
    _, mdir = mnist_model(tmp_path, seed=4)
    common = [mdir, "--data", "animal-mnist:train", "--proxy-size", "5", "--seed", "1", "--batch-size", "2"]
    one = str(tmp_path / "one.safetensors")
    two = str(tmp_path / "two.safetensors")
    r1 = run_main("score", *common, "--out", one)
    assert r1.returncode == 0, r1.stderr
    # PYTHONFAULTHANDLER: should a rank ever abort at exit again (issue 21's "terminate called without an
    # active exception", not reproduced since main() leaves the group with a barrier), its stderr then
    # shows where each of its threads was, instead of one bare C++ line
    r2 = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "upvit", "score", *common,
              "--out", two], timeout=600, env={"PYTHONFAULTHANDLER": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = upvit.Scores.load(one), upvit.Scores.load(two)
    assert b.meta["world_size"] == 2 and a.meta["world_size"] == 1
    for key, t in a.items():
        assert torch.isfinite(t).all()
        assert torch.equal(b[key], t), key
    assert not os.path.exists(two + ".partial")


def test_cli_bad_input_one_line(tmp_path):
    _, mdir = mnist_model(tmp_path)
    out = str(tmp_path / "s.safetensors")
    assert_one_line_error(run(["-m", "upvit", "score", mdir, "--data", "animal-mnist:train", "--proxy-size", "0",
                               "--out", out]), "--proxy-size: must be an integer of at least 1")
    assert_one_line_error(run_main("score", "timm:resnet10t,num_classes=10,in_chans=1", "--data",
                                   "animal-mnist:train", "--out", out), "no adapter")
    small = str(tmp_path / "rgb")
    save(tiny_vit(), small)  # 3x16x16 input
    assert_one_line_error(run_main("score", small, "--data", "animal-mnist:train", "--out", out), "expects input")
    broken = tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10)
    with torch.no_grad():
        broken.blocks[0].mlp.fc2.bias.fill_(float("nan"))
    save(broken, str(tmp_path / "nan"))
    assert_one_line_error(run_main("score", str(tmp_path / "nan"), "--data", "animal-mnist:train",
                                   "--proxy-size", "3", "--out", out), "NaN or inf")
    assert not os.path.exists(out)


def test_cli_resume_refuses_other_model(tmp_path):
    _, mdir = mnist_model(tmp_path)
    _, other = mnist_model(tmp_path, "other", seed=8)
    out = str(tmp_path / "s.safetensors")
    args = ["--data", "animal-mnist:train", "--proxy-size", "3", "--out", out]
    r = run_main("score", mdir, *args)
    assert r.returncode == 0, r.stderr
    before = upvit.Scores.load(out)
    r = run_main("score", mdir, *args, "--resume")  # finished: resume returns the same scores
    assert r.returncode == 0, r.stderr
    assert all(torch.equal(upvit.Scores.load(out)[k], t) for k, t in before.items())
    assert_one_line_error(run_main("score", other, *args, "--resume"), "the model's weights differ")


def test_cli_hybrid_needs_targets_and_parses_them():
    from upvit.cli import _parse_targets
    from upvit.errors import UpvitError

    assert _parse_targets(["96,6,384", "48,3,192"]) == [{"embed_dim": 96, "num_heads": 6, "mlp_hidden": 384},
                                                        {"embed_dim": 48, "num_heads": 3, "mlp_hidden": 192}]
    assert _parse_targets(None) is None
    assert _parse_targets(["16/32/64/128,1/2/4/8,64"]) == [{"embed_dim": [16, 32, 64, 128], "num_heads": [1, 2, 4, 8],
                                                             "mlp_hidden": 64}]

    with pytest.raises(UpvitError, match="EMBED,HEADS,MLP"):
        _parse_targets(["96x6"])
