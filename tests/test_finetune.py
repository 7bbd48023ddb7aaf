"""Fine-tuning with distillation: bit-exact resume, the CLI end to end, bad input, 2-process torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import upvit
import upvit.distill
from helpers import run_main, tiny_vit
from upvit.cli import main
from upvit.data import ImageTensorDataset
from upvit.io import load_tensors
from upvit.train import TrainConfig, lr_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(epochs=2, batch_size=8, lr=2e-3, min_lr=1e-5, weight_decay=1e-3, warmup_epochs=1, ema_decay=0.9,
           max_steps_per_epoch=2, amp="off")
MNIST_TINY = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=2, mlp_ratio=2.0)


def _dataset(n: int = 32) -> ImageTensorDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8)
    return ImageTensorDataset(images, rng.integers(0, 5, size=n), [0.5] * 3, [0.5] * 3, augment=True, seed=0)


def _student():
    return tiny_vit(seed=3, std=0.05, embed_dim=16, num_heads=2).train()


def _weights(directory: str) -> dict[str, torch.Tensor]:
    return load_tensors(os.path.join(directory, "model.safetensors"))[0]


def _log(directory: str) -> list[dict]:
    with open(os.path.join(directory, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5)
    assert lr_at(0, 100, 10, cfg) == pytest.approx(1e-4) and lr_at(9, 100, 10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, 100, 10, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half way down the cosine
    assert lr_at(100, 100, 10, cfg) == pytest.approx(1e-5)


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    teacher = tiny_vit(seed=1)
    straight = _student()
    upvit.finetune(straight, teacher, _dataset(), TrainConfig(**CFG), str(tmp_path / "a"), alpha=0.7)

    # the same run, killed in the middle of epoch 2, then resumed by a fresh process-like start
    calls = {"n": 0}
    real = upvit.distill.distillation_loss

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # step 2 of epoch 2 (2 steps per epoch)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(upvit.distill, "distillation_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        upvit.finetune(_student(), tiny_vit(seed=1), _dataset(), TrainConfig(**CFG), str(tmp_path / "b"), alpha=0.7)
    monkeypatch.setattr(upvit.distill, "distillation_loss", real)
    assert [r["epoch"] for r in _log(str(tmp_path / "b"))] == [1]
    upvit.finetune(_student(), tiny_vit(seed=1), _dataset(), TrainConfig(**CFG), str(tmp_path / "b"), alpha=0.7,
                   resume=True)

    a, b = _weights(str(tmp_path / "a")), _weights(str(tmp_path / "b"))  # the EMA weights
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    la, lb = _log(str(tmp_path / "a")), _log(str(tmp_path / "b"))
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]
    assert [r["step"] for r in la] == [2, 4]
    # the EMA really differs from the raw weights and training really moved them
    assert any(not torch.equal(a[k], ca["model"][k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in _student().state_dict().items())


def test_ema_follows_its_definition(tmp_path):
    """One step, EMA decay d: ema = d * initial + (1 - d) * trained, for every float tensor."""
    student = _student()
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = TrainConfig(**{**CFG, "epochs": 1, "max_steps_per_epoch": 1, "ema_decay": 0.75})
    upvit.finetune(student, tiny_vit(seed=1), _dataset(), cfg, str(tmp_path / "e"))
    ema = _weights(str(tmp_path / "e"))
    for k, v in student.state_dict().items():
        torch.testing.assert_close(ema[k], 0.75 * initial[k] + 0.25 * v, rtol=1e-6, atol=1e-7)


def test_resume_refuses_other_distillation_settings(tmp_path):
    cfg = TrainConfig(**{**CFG, "epochs": 1})
    upvit.finetune(_student(), tiny_vit(seed=1), _dataset(), cfg, str(tmp_path / "r"), alpha=0.7)
    with pytest.raises(upvit.UpvitError, match="other settings"):
        upvit.finetune(_student(), tiny_vit(seed=1), _dataset(), cfg, str(tmp_path / "r"), alpha=0.5, resume=True)
    with pytest.raises(upvit.UpvitError, match="other settings"):  # same alpha, another teacher
        upvit.finetune(_student(), tiny_vit(seed=2), _dataset(), cfg, str(tmp_path / "r"), alpha=0.7, resume=True)


@pytest.fixture(scope="module")
def mnist_models(tmp_path_factory):
    """A tiny 'teacher' and a smaller 'pruned-shape' student for 1x28x28 animal-mnist, saved as directories."""
    root = tmp_path_factory.mktemp("models")
    teacher = tiny_vit(seed=1, std=0.05, embed_dim=24, num_heads=4, **MNIST_TINY)
    student = tiny_vit(seed=2, std=0.05, embed_dim=16, num_heads=2, **MNIST_TINY)
    odd = tiny_vit(seed=2, std=0.05, embed_dim=16, num_heads=2, **{**MNIST_TINY, "num_classes": 7})
    for name, m in (("teacher", teacher), ("student", student), ("odd", odd)):
        upvit.save(m, str(root / name))
    return root


def _ft_args(models, out, *extra):
    return ["finetune", str(models / "student"), "--teacher", str(models / "teacher"), "--data", "animal-mnist:train",
            "--epochs", "2", "--alpha", "0.5", "--batch-size", "16", "--max-steps-per-epoch", "3", "--lr", "2e-3",
            "--out", str(out), *extra]


def test_finetune_cli_end_to_end(mnist_models, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(_ft_args(mnist_models, out, "--val-data", "animal-mnist:val", "--ema-decay", "0.9")) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model = upvit.load(str(out))
    cfg = model.upvit_config
    assert cfg.extra["distillation"]["teacher"] == str(mnist_models / "teacher")
    assert cfg.extra["distillation"]["alpha"] == 0.5 and cfg.extra["distillation"]["reduction"] == "batchmean"
    training = cfg.extra["training"]
    assert training["lr"] == 2e-3 and training["weight_decay"] == 1e-3 and training["ema_decay"] == 0.9
    assert training["warmup_epochs"] == pytest.approx(0.2)  # min(2, epochs / 10)
    assert cfg.timm_kwargs["embed_dim"] == 16
    log = _log(str(out))
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:  # the logged loss is CE + alpha * KL of the same batches
        assert r["train_loss"] == pytest.approx(r["train_ce"] + 0.5 * r["train_kl"], rel=1e-5)
        assert 0 <= r["val_top1"] <= 100
    # the validation accuracy in the log is that of the saved (EMA) model
    from upvit.data import load_data

    val, _ = load_data("animal-mnist:val", data_config=cfg.data_config)
    from upvit.evaluation import evaluate

    assert evaluate(model, val, device="cpu")["top1"] == pytest.approx(log[-1]["val_top1"])


@pytest.mark.parametrize("case,match", [
    ("missing_teacher", "not found"),
    ("classes", "teacher has 10 classes but the student has 7"),
    ("resume", "no checkpoint.pt"),
    ("existing", "already holds a training checkpoint"),
])
def test_finetune_cli_bad_input_one_line(mnist_models, tmp_path, capsys, case, match):
    args = _ft_args(mnist_models, tmp_path / "o")
    if case == "missing_teacher":
        args[args.index("--teacher") + 1] = str(tmp_path / "nope")
    elif case == "classes":
        args[1] = str(mnist_models / "odd")
    elif case == "resume":
        args.append("--resume")
    elif case == "existing":
        os.makedirs(tmp_path / "o")
        (tmp_path / "o" / "checkpoint.pt").write_bytes(b"x")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("upvit: error:") and match in err, err


@pytest.mark.usefixtures("one_thread")
def test_torchrun_two_processes_match_one(mnist_models, tmp_path):
    """The same global batch on 2 gloo ranks gives the 1-process loss curve and weights (float rounding only)."""
    common = _ft_args(mnist_models, tmp_path / "x")[:-2]
    common[common.index("--epochs") + 1] = "3"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "UPVIT_NO_PROGRESS": "1",
           "PYTHONFAULTHANDLER": "1"}  # a rank aborting at exit would show its threads' stacks
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even on a GPU machine
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "upvit.cli", *common, "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    one = run_main(*common, "--out", tmp_path / "one")  # in-process, one thread as each rank
    assert one.returncode == 0, one.stderr[-3000:]
    l1, l2 = _log(str(tmp_path / "one")), _log(str(tmp_path / "two"))
    print("1 process:", [r["train_loss"] for r in l1], "\n2 processes:", [r["train_loss"] for r in l2])
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [3, 6, 9]
    for a, b in zip(l1, l2):
        for key in ("train_loss", "train_ce", "train_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert upvit.load(str(tmp_path / "two")).upvit_config.extra["training"]["world_size"] == 2
    w1, w2 = _weights(str(tmp_path / "one")), _weights(str(tmp_path / "two"))
    print("max |w2 - w1|:", max((w2[k] - w1[k]).abs().max().item() for k in w1))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    # and training changed the weights much more than the 1- vs 2-process difference
    start = _weights(str(mnist_models / "student"))
    moved = max((w1[k] - start[k]).abs().max().item() for k in w1)
    assert moved > 1e-3


def test_worker_processes_give_the_same_run(tmp_path):
    """Seeded per-epoch augmentation reaches DataLoader workers: 1 worker == in-process loading, bit for bit."""
    results = []
    for workers in (0, 1):
        student = _student()
        cfg = TrainConfig(**{**CFG, "num_workers": workers, "ema_decay": None})
        upvit.finetune(student, tiny_vit(seed=1), _dataset(), cfg, str(tmp_path / f"w{workers}"))
        results.append(_weights(str(tmp_path / f"w{workers}")))
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k
