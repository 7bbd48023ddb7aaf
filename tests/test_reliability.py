"""Issue 10, "nothing lost, nothing silently wrong": every defect a new user hit, through the CLI.

Each test drives the CLI for the reported case (exit status and the one line on stderr) and checks files that
must survive byte for byte: a few end to end in a subprocess (``run_cli``), the rest through the same ``main``
in-process (``run_main``, no interpreter start-up per call).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

import upvit
from helpers import REPO, assert_one_line_error, run_cli, run_main, snapshot, tiny_vit, write_image_folder
from plan_helpers import random_scores
from upvit.cli import main
from upvit.data import ANIMAL_MNIST_CLASSES
from upvit.demo import ASSET_TEACHER
from upvit.io import save, save_tensors

MNIST_SPEC = ("timm:vit_base_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,embed_dim=24,depth=2,"
              "num_heads=4,mlp_ratio=2.0")
FOLDER_SPEC = "timm:vit_base_patch16_224,img_size=16,patch_size=4,num_classes=2,embed_dim=16,depth=1,num_heads=2"


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


def folder_model(path, seed: int = 0, **overrides):
    """A tiny 3x16x16 two-class model directory for ImageFolder tests."""
    model = tiny_vit(num_classes=2, embed_dim=16, num_heads=2, depth=1, seed=seed, **overrides)
    save(model, str(path))
    return str(path)


def truncate(path: str) -> bytes:
    """Cut an image file in half (a truncated download); returns the original bytes."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return data


# ------------------------------------------------------------------ 1. nothing silently overwritten
def test_prune_never_writes_into_its_input_model(tmp_path, capsys):
    teacher = tmp_path / "teacher"  # a copy of the shipped teacher: `--out upvit/assets/teacher` destroyed it
    shutil.copytree(ASSET_TEACHER, teacher)
    scores = tmp_path / "scores.safetensors"
    random_scores(upvit.load(str(teacher))).save(str(scores))
    before = snapshot(teacher)
    r = run_cli("prune", teacher, "--scores", scores, "--ratio", "0.5", "--out", teacher)
    assert_one_line_error(r, f"--out {teacher} is the input {teacher}")
    assert snapshot(teacher) == before
    # --force does not change that, nor do other spellings of the same place, nor a folder inside it
    (tmp_path / "link").symlink_to(teacher)
    for out in (str(teacher) + "/", str(tmp_path / "link"), str(teacher / "pruned"), str(tmp_path / "teacher" / ".")):
        assert main(["prune", str(teacher), "--scores", str(scores), "--ratio", "0.5", "--out", out, "--force"]) == 2
        err = capsys.readouterr().err
        assert len(stderr_lines(err)) == 1 and "choose another --out" in err, err
    assert snapshot(teacher) == before
    # a non-empty output directory needs --force
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    args = ["prune", str(teacher), "--scores", str(scores), "--ratio", "0.5", "--out", str(tmp_path / "full")]
    assert main(args) == 2 and "is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert main(args + ["--force"]) == 0 and upvit.load(str(tmp_path / "full")).embed_dim == 96


def test_score_never_overwrites_an_existing_scores_file(tmp_path, capsys):
    model_dir = tmp_path / "m"
    save(tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10), str(model_dir))
    out = tmp_path / "scores.safetensors"
    out.write_bytes(b"hours of exact KL scoring")
    args = ["score", str(model_dir), "--data", "animal-mnist:train", "--proxy-size", "2", "--method", "magnitude",
            "--out", str(out)]
    assert_one_line_error(run_main(*args), "already exists")
    assert out.read_bytes() == b"hours of exact KL scoring"
    # an interrupted run's state needs --resume (or --force), the model's own directory is never a target
    (tmp_path / "new.safetensors.partial").write_bytes(b"state")
    assert main(args[:-1] + [str(tmp_path / "new.safetensors")]) == 2
    assert "--resume to continue it" in capsys.readouterr().err
    assert main(args[:-1] + [str(model_dir / "scores.safetensors"), "--force"]) == 2
    assert ("lies inside the input" in capsys.readouterr().err
            and sorted(os.listdir(model_dir)) == ["config.json", "model.safetensors"])
    assert main(args + ["--resume"]) == 2 and "cannot resume" in capsys.readouterr().err  # magnitude keeps no state
    assert out.read_bytes() == b"hours of exact KL scoring"
    assert main(args + ["--force"]) == 0
    assert upvit.Scores.load(str(out)).meta["criterion"] == "magnitude"


def test_train_finetune_and_demo_refuse_a_non_empty_out(tmp_path, capsys):
    folder = tmp_path / "data"
    write_image_folder(folder, per_class=2, size=16)
    full = tmp_path / "full"
    full.mkdir()
    (full / "results.json").write_text("{}")
    model = folder_model(tmp_path / "m")
    cases = [
        (["train", FOLDER_SPEC, "--data", str(folder), "--epochs", "1", "--batch-size", "2", "--out", str(full)],
         "is not empty"),
        (["finetune", model, "--teacher", model, "--data", str(folder), "--epochs", "1", "--batch-size", "2",
          "--out", str(full)], "is not empty"),
        (["demo", "--quick", "--teacher", model, "--out", str(full)], "is not empty"),
        (["demo", "--quick", "--teacher", model, "--out", model, "--force"], "is the input"),
        (["train", FOLDER_SPEC, "--data", str(folder), "--out", str(folder / "a")], "lies inside the input"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(stderr_lines(err)) == 1 and message in err, err
    assert sorted(os.listdir(full)) == ["results.json"] and (full / "results.json").read_text() == "{}"
    # a training checkpoint there: --resume continues it, --force starts over
    (full / "checkpoint.pt").write_bytes(b"x")
    assert main(cases[0][0]) == 2 and "--resume to continue it, --force to start over" in capsys.readouterr().err
    assert main(cases[0][0] + ["--force", "--max-steps-per-epoch", "1"]) == 0
    assert upvit.load(str(full)).embed_dim == 16


# ------------------------------------------------------------------ 2. the model's input decides the transform
def test_train_on_an_image_folder_follows_the_model_input_size_and_channels(tmp_path, capsys):
    folder = tmp_path / "data"
    write_image_folder(folder, per_class=4, size=40)  # RGB 40x40 files, a 32x32 model
    spec = "timm:vit_base_patch16_224,img_size=32,patch_size=8,num_classes=2,embed_dim=16,depth=1,num_heads=2"
    common = ["--data", folder, "--val-data", folder, "--epochs", "1", "--batch-size", "4",
              "--max-steps-per-epoch", "1"]
    r = run_main("train", spec, *common, "--out", tmp_path / "rgb")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "rgb" / "config.json").read_text())
    assert config["data_config"]["input_size"] == [3, 32, 32] and config["class_names"] == ["a", "b"]
    # a grayscale model reads the same RGB files as one channel, in training, evaluation and scoring
    gray = spec.replace("img_size=32", "img_size=24,in_chans=1")
    assert main(["train", gray, *map(str, common), "--out", str(tmp_path / "gray")]) == 0
    assert upvit.load(str(tmp_path / "gray")).upvit_config.data_config["input_size"] == [1, 24, 24]
    assert main(["eval", str(tmp_path / "gray"), "--data", str(folder)]) == 0
    assert "(8 images)" in capsys.readouterr().out
    assert main(["score", str(tmp_path / "gray"), "--data", str(folder), "--proxy-size", "3", "--method", "magnitude",
                 "--out", str(tmp_path / "s.safetensors")]) == 0


# ------------------------------------------------------------------ 3. classes must match
def test_eval_refuses_data_with_other_classes_unless_mapped(tmp_path, capsys):
    model = tiny_vit(num_classes=10, embed_dim=16, num_heads=2, depth=1)
    model.upvit_config.class_names = list(ANIMAL_MNIST_CLASSES)
    save(model, str(tmp_path / "m"))
    folder = tmp_path / "data"
    write_image_folder(folder, classes=("cat", "dog"), per_class=3, size=16)
    r = run_main("eval", tmp_path / "m", "--data", folder)
    assert_one_line_error(r, "the model's classes (10: bear, bird, cat, cow, ...) differ from those of")
    assert "--class-map" in r.stderr

    # mapped by name or explicitly: labels become the model's indices of cat (2) and dog (4)
    from upvit.data import load_data

    dataset, _ = load_data(str(folder), data_config=model.upvit_config.data_config)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    expected = 100.0 * (predicted == torch.tensor([2, 2, 2, 4, 4, 4])).float().mean().item()
    for class_map in ("by-name", "cat=2,dog=dog"):
        assert main(["eval", str(tmp_path / "m"), "--data", str(folder), "--class-map", class_map,
                     "--json", str(tmp_path / "e.json")]) == 0
        metrics = json.loads((tmp_path / "e.json").read_text())
        assert metrics["n"] == 6 and metrics["top1"] == pytest.approx(expected)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--data", str(folder), "--class-map", "cat=2"]) == 2
    assert "does not say which model class the data's 'dog' is" in capsys.readouterr().err
    # a model without class names: the number of outputs must match
    save(tiny_vit(num_classes=10, embed_dim=16, num_heads=2, depth=1), str(tmp_path / "anon"))
    assert main(["eval", str(tmp_path / "anon"), "--data", str(folder)]) == 2
    assert "the model has 10 outputs but" in capsys.readouterr().err


# ------------------------------------------------------------------ 4. scores carry their model's fingerprint
def test_prune_refuses_scores_of_another_model(tmp_path, capsys):
    trained = upvit.load_model(MNIST_SPEC)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_(0, 0.2)
    weights = tmp_path / "w.safetensors"
    save_tensors(str(weights), trained.state_dict())
    scores = tmp_path / "s.safetensors"
    r = run_main("score", MNIST_SPEC, "--checkpoint", weights, "--data", "animal-mnist:train", "--proxy-size", "2",
                "--method", "magnitude", "--out", scores)
    assert r.returncode == 0 and not stderr_lines(r.stderr), r.stderr
    fingerprint = upvit.Scores.load(str(scores)).meta["model_fingerprint"]
    assert set(fingerprint) == {"architecture", "weights"}
    # `score --checkpoint X` then `prune` without it: the student would come from random weights
    r = run_main("prune", MNIST_SPEC, "--scores", scores, "--ratio", "0.5", "--out", tmp_path / "p")
    assert_one_line_error(r, "scores were computed for other weights of this architecture (scored: ")
    assert "pass the same --checkpoint as to `upvit score` (or the same model directory), or re-score" in r.stderr
    assert not (tmp_path / "p").exists()
    assert main(["prune", MNIST_SPEC, "--checkpoint", str(weights), "--scores", str(scores), "--ratio", "0.5",
                 "--out", str(tmp_path / "p")]) == 0
    assert not capsys.readouterr().err
    # scores of a deeper model (12-block DeiT-Tiny scores on the 6-block teacher, in small)
    deeper = upvit.load_model(MNIST_SPEC.replace("depth=2", "depth=4"))
    upvit.score(deeper, torch.zeros(1, 1, 28, 28), method="magnitude").save(str(tmp_path / "deep.safetensors"))
    assert main(["prune", MNIST_SPEC, "--checkpoint", str(weights), "--scores", str(tmp_path / "deep.safetensors"),
                 "--ratio", "0.5", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "was computed for another architecture (4 blocks, width 24; this model: 2 blocks, width 24)" in err, err
    # scores written before fingerprints existed: accepted, with one warning line
    random_scores(trained).save(str(tmp_path / "old.safetensors"))
    assert main(["prune", MNIST_SPEC, "--checkpoint", str(weights), "--scores", str(tmp_path / "old.safetensors"),
                 "--ratio", "0.5", "--out", str(tmp_path / "r")]) == 0
    err = stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("upvit: warning:") and "no model fingerprint" in err[0]


def test_timm_model_without_checkpoint_warns_of_random_weights(tmp_path):
    folder = tmp_path / "data"
    write_image_folder(folder, per_class=2, size=16)
    r = run_main("eval", FOLDER_SPEC, "--data", folder)
    assert r.returncode == 0, r.stderr
    lines = stderr_lines(r.stderr)
    assert len(lines) == 1 and "random weights (no --checkpoint given)" in lines[0], r.stderr

def test_an_error_case_prints_only_the_error(tmp_path, capsys):
    assert main(["eval", FOLDER_SPEC, "--data", str(tmp_path / "missing")]) == 2
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("upvit: error:") and "does not exist" in lines[0], lines


def test_fingerprint_helpers_keep_the_resume_hashes():
    """The shared digest keeps the KL, distillation and training fingerprints bit-identical (resume)."""
    import hashlib

    from upvit.adapters import get_adapter
    from upvit.distill import model_fingerprint as teacher_id
    from upvit.fingerprint import model_fingerprint
    from upvit.importance.kl import fingerprint as kl_fingerprint

    model = tiny_vit()
    images = torch.randn(2, 3, 16, 16)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{list(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    h.update(b"images|[2, 3, 16, 16]" + images.numpy().tobytes() + json.dumps({"a": 1}).encode())
    assert kl_fingerprint(get_adapter(model), images, {"a": 1}) == h.hexdigest()
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode() + json.dumps(list(t.shape)).encode() + t.float().numpy().tobytes())
    assert teacher_id(model) == h.hexdigest()[:16]
    # the model fingerprint: weights change only the weights hash, heads change the architecture hash
    fp = model_fingerprint(model)
    other = tiny_vit(seed=1)
    assert (model_fingerprint(other)["architecture"] == fp["architecture"]
            and model_fingerprint(other)["weights"] != fp["weights"])
    assert model_fingerprint(tiny_vit(num_heads=2))["architecture"] != fp["architecture"]


# ------------------------------------------------------------------ 5. damaged images
def test_a_damaged_image_is_one_line_naming_it_or_is_skipped(tmp_path, capsys):
    folder = tmp_path / "data"
    paths = write_image_folder(folder, per_class=4, size=16)
    truncate(paths[5])
    model = folder_model(tmp_path / "m")
    assert_one_line_error(run_main("eval", model, "--data", folder), f"cannot read image {paths[5]}")
    r = run_main("eval", model, "--data", folder, "--skip-bad-images")
    assert r.returncode == 0 and "(7 images)" in r.stdout, r.stderr
    lines = stderr_lines(r.stderr)
    assert lines == [f"upvit: warning: skipped 1 unreadable image file (first: {paths[5]})"], r.stderr

    train = ["train", FOLDER_SPEC, "--data", folder, "--epochs", "1", "--batch-size", "8", "--out", tmp_path / "t"]
    r = run_main(*train)
    assert_one_line_error(r, f"cannot read image {paths[5]}")
    assert "add --skip-bad-images, then rerun the command (no epoch had finished" in r.stderr

    # the same in-process for scoring, training with --skip-bad-images, and --check-images
    capsys.readouterr()
    score = ["score", model, "--data", str(folder), "--proxy-size", "8", "--method", "fisher",  # reads the images
             "--out", str(tmp_path / "s.safetensors")]
    assert main(score) == 2 and f"cannot read image {paths[5]}" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()
    assert main(score + ["--skip-bad-images"]) == 0
    proxy = upvit.Scores.load(str(tmp_path / "s.safetensors")).meta["proxy"]
    assert proxy["num_images"] == 7 and proxy["unreadable_skipped"] == 1
    capsys.readouterr()
    # from a DataLoader worker process too: the file's line, not the worker's traceback
    assert main(list(map(str, train)) + ["--workers", "1", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"upvit: error: cannot read image {paths[5]}") and len(stderr_lines(err)) == 1, err
    assert main(list(map(str, train)) + ["--skip-bad-images", "--workers", "1", "--force"]) == 0
    assert "skipped 1 unreadable image file" in capsys.readouterr().err  # counted inside the worker
    truncate(paths[0])  # --check-images finds every damaged file before the first step
    assert main(list(map(str, train[:-1])) + [str(tmp_path / "t2"), "--check-images"]) == 2
    err = capsys.readouterr().err
    assert f"2 unreadable image files under {folder} (first: {paths[0]}, {paths[5]})" in err, err
    assert not os.path.exists(tmp_path / "t2" / "checkpoint.pt")


def test_finetune_stopped_by_a_damaged_image_keeps_its_progress(tmp_path, capsys):
    folder = tmp_path / "data"
    paths = write_image_folder(folder, per_class=8, size=16)
    student, teacher = folder_model(tmp_path / "student", seed=1), folder_model(tmp_path / "teacher", seed=2)
    # with one step of 4 images per epoch, find a file that epoch 2 reads and epoch 1 does not
    batches = [torch.randperm(16, generator=torch.Generator().manual_seed(e)).tolist()[:4] for e in (0, 1)]
    victim = paths[next(i for i in batches[1] if i not in batches[0])]
    original = truncate(victim)
    out = tmp_path / "ft"
    args = ["finetune", student, "--teacher", teacher, "--data", folder, "--epochs", "2", "--batch-size", "4",
            "--max-steps-per-epoch", "1", "--out", out]
    r = run_main(*args)
    assert_one_line_error(r, f"cannot read image {victim}")
    assert (f"rerun the same command with --resume: it continues after epoch 1 from the checkpoint in {out}"
            in r.stderr), r.stderr
    kept = snapshot(out)
    assert {"checkpoint.pt", "log.jsonl"} <= set(kept)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    # fix the file, continue: the finished epoch is not redone
    with open(victim, "wb") as f:
        f.write(original)
    assert main(list(map(str, args)) + ["--resume"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[0] == json.loads(kept["log.jsonl"].decode().splitlines()[0])


# ------------------------------------------------------------------ 6. `import timm` alone
def test_timm_imports_alone_in_the_project_interpreter():
    r = subprocess.run([sys.executable, "-c", "import timm, torchvision; print(timm.__version__)"],
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-800:]


def test_startup_shim_installs_idempotently_and_suffices(tmp_path):
    target = tmp_path / "site"
    for _ in range(2):
        r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "install_shim.py"), str(target)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(target)) == ["_upvit_torchvision_shim.py", "upvit-torchvision-shim.pth"]
    # -S: no site-packages processing, so only this copy of the shim can make the import work
    purelib = sysconfig.get_paths()["purelib"]
    # the shim needs no upvit; upvit's own declaration coexists with the shim's, in either order
    for code, printed in (
            ("import timm; print('upvit' in sys.modules); "
             "from upvit._compat import import_timm; import_timm()", "False"),
            ("from upvit._compat import import_timm; import_timm(); import torchvision; print('ok')", "ok")):
        r = subprocess.run([sys.executable, "-S", "-c", f"import sys, site; sys.path.append({purelib!r}); "
                            f"site.addsitedir({str(target)!r}); {code}"], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
        assert r.returncode == 0, r.stderr[-800:]
        assert r.stdout.strip() == printed


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_installs_the_shim_with_the_environment():
    r = subprocess.run(["make", "-n", "-B", ".venv/.upvit-installed"], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 0 and "tools/install_shim.py" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["make", "-p", "-n", "-q", "shim"], capture_output=True, text=True, cwd=REPO, timeout=60)
    rule = next(line for line in r.stdout.splitlines() if line.startswith(".venv/.upvit-installed:"))
    assert ("tools/_upvit_torchvision_shim.py" in rule and "tools/upvit-torchvision-shim.pth" in rule
            and "pyproject.toml" in rule)


# ------------------------------------------------------------------ 7. one line, not a traceback
@pytest.mark.parametrize("args,message", [
    (["eval", ASSET_TEACHER, "--data", "animal-mnist:val", "--batch-size", "0"],
     "argument --batch-size: must be an integer of at least 1"),
    (["bench", ASSET_TEACHER, "--runs", "0"], "argument --runs: must be an integer of at least 1"),
    (["eval", ASSET_TEACHER, "--data", "animal-mnist:val", "--device", "cuda:99"], "--device cuda:99"),
])
def test_bad_numbers_and_devices_are_one_line(args, message):
    r = run_cli(*args)
    assert_one_line_error(r, message)
    assert r.returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_cuda_is_one_line():
    assert_one_line_error(run_main("bench", ASSET_TEACHER, "--device", "cuda"),
                          "no usable CUDA device: use --device cpu")


def test_eval_json_into_a_missing_folder(tmp_path, capsys):
    folder = tmp_path / "data"
    write_image_folder(folder, per_class=2, size=16)
    model = folder_model(tmp_path / "m")
    r = run_main("eval", model, "--data", folder, "--json", tmp_path / "reports" / "today" / "eval.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "reports" / "today" / "eval.json").read_text())["n"] == 4
    assert main(["eval", model, "--data", str(folder), "--json", str(tmp_path / "reports")]) == 2
    assert "is a directory" in capsys.readouterr().err


# ------------------------------------------------------------------ 8. docs and help
def test_readme_links_stay_inside_the_repository():
    text = open(os.path.join(REPO, "README.md")).read()
    targets = re.findall(r"\]\(([^)#]+)\)", text) + re.findall(r"`((?:\.\./|docs/|benchmarks/)[^`\s]+)`", text)
    local = [t for t in targets if "://" not in t]
    assert "docs/method.md" in local
    for target in local:
        path = os.path.normpath(os.path.join(REPO, target))
        assert path.startswith(REPO + os.sep) and os.path.exists(path), target
    method = open(os.path.join(REPO, "docs", "method.md")).read()
    for section in ("## 1.", "## 2.", "## 3.", "## 4."):  # the code's docstrings cite these sections
        assert section in method


def test_help_shows_defaults_and_documents_max_steps_per_epoch():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "training epochs (default: 30)" in text and "(default: 128)" in text and "(default: 0.001)" in text
    assert "--max-steps-per-epoch MAX_STEPS_PER_EPOCH end every epoch after this many optimizer steps" in text
    assert "(default: None)" not in text


def test_quick_demo_evaluates_on_every_class():
    from upvit.data import animal_mnist, dataset_labels, stratified_subset
    from upvit.demo import DemoConfig

    val, _ = animal_mnist("val")
    limit = DemoConfig.quick().val_limit
    subset = stratified_subset(val, limit, seed=0)
    assert np.bincount(dataset_labels(subset), minlength=10).tolist() == [limit // 10] * 10
    assert stratified_subset(val, limit, seed=0).indices == subset.indices  # seeded
    assert np.bincount(dataset_labels(stratified_subset(val, 13, seed=0)), minlength=10).tolist() == [2, 2, 2] + [1] * 7
