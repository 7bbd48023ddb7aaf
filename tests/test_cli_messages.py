"""Issue 21, items 5-7 and 9: messages that say why and what to do, help text, defaults, --version.

CLI behaviour is checked through ``main`` (in-process, ``run_main``) or, where separate processes are the point
(--version, help, score then prune), from outside (a subprocess, ``run_cli``); a fault that cannot be produced
from outside (a full disk) is injected in-process at write time."""
from __future__ import annotations

from helpers import assert_one_line_error, run_cli, run_main

TINY_SPEC = ("timm:vit_base_patch16_224,img_size=16,patch_size=4,in_chans=3,num_classes=2,embed_dim=24,"
             "depth=1,num_heads=4")


# ------------------------------------------------------------------------------- item 7: --data FILE
def test_data_file_is_named_a_file_and_every_spelling_is_listed(tmp_path):
    data = tmp_path / "images.zip"
    data.write_bytes(b"not a folder")
    result = run_main("eval", TINY_SPEC, "--data", data)
    assert_one_line_error(result, f"data '{data}' is a file, not a directory")
    line = result.stderr.strip()
    assert "does not exist" not in line
    for spelling in ("ImageFolder directory", "animal-mnist:", "shakespeare:", "text:FILE_OR_DIR"):
        assert spelling in line, (spelling, line)


def test_missing_data_directory_lists_every_spelling(tmp_path):
    result = run_main("eval", TINY_SPEC, "--data", tmp_path / "nowhere")
    assert_one_line_error(result, "does not exist")
    for spelling in ("animal-mnist:", "shakespeare:", "text:FILE_OR_DIR"):
        assert spelling in result.stderr, result.stderr


# ------------------------------------------------------------------------------- item 9: help, defaults, --version
def _sub(name):
    from upvit.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def _option(name, flag):
    return next(a for a in _sub(name)._actions if flag in a.option_strings)


def test_version_prints_the_package_version():
    import upvit

    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"upvit {upvit.__version__}"


def test_help_names_every_family_and_data_kind():
    assert "timm model" not in _sub("train").description and "Hugging Face" in _sub("train").description
    for word in ("perplexity", "similarity", "top-1"):
        assert word in _sub("eval").description
    for name in ("train", "finetune", "score"):
        text = _option(name, "--data").help
        for spelling in ("animal-mnist:", "ImageFolder", "shakespeare:", "text:FILE_OR_DIR"):
            assert spelling in text, (name, spelling)
    assert "hf:" in _option("finetune", "--teacher").help and "timm:" in _option("finetune", "--teacher").help
    for flag in ("--batch-size", "--min-lr", "--weight-decay"):
        action = _option("depth", flag)
        assert action.help and action.default is not None, flag
    help_text = run_cli("depth", "--help").stdout
    assert "(default: 1e-05)" in help_text and "(default: 128)" in help_text


def test_one_weight_decay_default_and_one_device_default():
    from upvit.train import TrainConfig

    for name in ("train", "finetune", "depth"):
        assert _option(name, "--weight-decay").default == TrainConfig().weight_decay, name
    devices = {name: _option(name, "--device").default for name in ("bench", "eval", "score", "depth")}
    assert set(devices.values()) == {None}, devices  # None: cuda if available, else cpu, for every command
    assert "cuda if available" in _option("bench", "--device").help


# ------------------------------------------------------------------------------- item 5: timm:NAME without --checkpoint
MNIST_TINY = ("timm:vit_base_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,embed_dim=24,depth=1,"
              "num_heads=4,mlp_ratio=2.0")


def test_timm_spec_weights_are_seeded_and_leave_the_global_rng_alone():
    import pytest
    import torch

    import upvit
    from upvit.errors import UpvitError
    from upvit.fingerprint import weights_digest

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = upvit.load_model(MNIST_TINY)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    torch.manual_seed(999)  # whatever ran before: the same weights
    b = upvit.load_model(MNIST_TINY)
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(upvit.load_model(MNIST_TINY + ",init_seed=0")) == weights_digest(a)
    assert weights_digest(upvit.load_model(MNIST_TINY + ",init_seed=1")) != weights_digest(a)
    assert weights_digest(upvit.load_model(MNIST_TINY, init_seed=1)) != weights_digest(a)  # train --seed
    with pytest.raises(UpvitError, match="init_seed=-1"):
        upvit.load_model(MNIST_TINY + ",init_seed=-1")


def test_score_then_prune_a_timm_spec_without_checkpoint_works_across_processes(tmp_path):
    """The README's ImageNet flow without --checkpoint: two processes, one model (seeded weights)."""
    scores = tmp_path / "s.safetensors"
    r = run_cli("score", MNIST_TINY, "--data", "animal-mnist:train", "--proxy-size", "2", "--method", "magnitude",
                "--out", scores)
    assert r.returncode == 0, r.stderr
    r = run_cli("prune", MNIST_TINY, "--scores", scores, "--ratio", "0.5", "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "config.json").is_file()


def test_prune_with_scores_of_other_weights_says_where_each_came_from(tmp_path):
    import torch

    import upvit
    from upvit.io import save_tensors

    trained = upvit.load_model(MNIST_TINY)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1)
    weights = tmp_path / "w.safetensors"
    save_tensors(str(weights), trained.state_dict())
    scores = tmp_path / "s.safetensors"
    r = run_main("score", MNIST_TINY, "--checkpoint", weights, "--data", "animal-mnist:train", "--proxy-size", "2",
                "--method", "magnitude", "--out", scores)
    assert r.returncode == 0, r.stderr
    r = run_main("prune", MNIST_TINY, "--scores", scores, "--ratio", "0.5", "--out", tmp_path / "p")
    assert_one_line_error(r, f"(scored: {MNIST_TINY} with --checkpoint {weights}; this model: {MNIST_TINY} with "
                             "seeded random weights (no --checkpoint)): pass the same --checkpoint as to `upvit score` "
                             "(or the same model directory), or re-score")
    assert not (tmp_path / "p").exists()


def test_kl_resume_refusal_names_what_differs(tmp_path):
    import pytest
    import torch

    import upvit
    from upvit.adapters import get_adapter
    from upvit.errors import UpvitError
    from upvit.importance.kl import kl_scores, partial_path

    model = upvit.load_model(MNIST_TINY)
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = str(tmp_path / "kl.safetensors")

    class Stop(Exception):
        pass

    def stop(key):
        raise Stop(key)

    with pytest.raises(Stop):  # interrupted after its first site: a partial state is left
        kl_scores(get_adapter(model), images, out=out, callback=stop, progress=False)
    assert (tmp_path / "kl.safetensors.partial").is_file()
    other = upvit.load_model(MNIST_TINY + ",init_seed=3")
    with pytest.raises(UpvitError, match="the model's weights differ.*same --checkpoint.*seeded random weights") as e:
        kl_scores(get_adapter(other), images, out=out, resume=True, progress=False)
    assert "proxy" not in str(e.value) and partial_path(out) in str(e.value)
    with pytest.raises(UpvitError, match="the proxy set differs") as e:
        kl_scores(get_adapter(model), images + 1, out=out, resume=True, progress=False)
    assert "weights differ" not in str(e.value)
    with pytest.raises(UpvitError, match=r"the scoring options differ .*--batch-size"):
        kl_scores(get_adapter(model), images, out=out, resume=True, batch_size=1, progress=False)
    finished = kl_scores(get_adapter(model), images, out=out, resume=True, progress=False)  # the same run continues
    assert set(finished.values) == {s.key for s in get_adapter(model).topology().sites}


# ------------------------------------------------------------------------------- item 6: a full disk
def _magnitude_scores(tmp_path):
    import torch

    import upvit

    path = tmp_path / "s.safetensors"
    upvit.score(upvit.load_model(MNIST_TINY), torch.zeros(1, 1, 28, 28), method="magnitude").save(str(path))
    return path


def _full_disk_at_write(monkeypatch):
    """Every file upvit writes through its atomic writer fails at write() with ENOSPC, as a full disk does
    (write() names no file); returns the list of files it tried."""
    import errno
    import os

    import upvit.io

    tried = []
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if "w" in mode:
            tried.append(fd)
            return FullDisk(f)
        return f

    monkeypatch.setattr(upvit.io.os, "fdopen", fdopen)
    return tried


def test_full_disk_names_the_file_and_removes_the_directory_it_created(tmp_path, monkeypatch, capsys):
    from upvit.cli import main

    scores = _magnitude_scores(tmp_path)
    tried = _full_disk_at_write(monkeypatch)
    out = tmp_path / "new" / "pruned"
    assert main(["prune", MNIST_TINY, "--scores", str(scores), "--ratio", "0.5", "--out", str(out)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert tried and len(lines) == 1, lines
    assert lines[0].startswith("upvit: error: No space left on device while writing ")
    assert str(out / "model.safetensors") in lines[0] and "unexpected" not in lines[0], lines[0]
    assert f"removed the unfinished {tmp_path / 'new'}" in lines[0]
    assert not (tmp_path / "new").exists()  # created by the command: nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_full_disk_leaves_a_directory_that_existed_before(tmp_path, monkeypatch, capsys):
    from upvit.cli import main

    scores = _magnitude_scores(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    _full_disk_at_write(monkeypatch)
    assert main(["prune", MNIST_TINY, "--scores", str(scores), "--ratio", "0.5", "--out", str(out)]) == 1
    line = capsys.readouterr().err.strip()
    assert "while writing" in line and "removed" not in line, line
    assert out.is_dir() and list(out.iterdir()) == []  # the user's directory: untouched, and empty as before


def test_a_write_error_without_a_file_name_names_the_output(tmp_path, monkeypatch, capsys):
    import errno
    import os

    import upvit.models
    from upvit.cli import main

    scores = _magnitude_scores(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # the upvit model directory writer (upvit.models.save_dir) calls save_tensors
    monkeypatch.setattr(upvit.models, "save_tensors", full)  # not through the atomic writer: no file name at all
    out = tmp_path / "p"
    assert main(["prune", MNIST_TINY, "--scores", str(scores), "--ratio", "0.5", "--out", str(out)]) == 1
    line = capsys.readouterr().err.strip()
    assert f"while writing {out}: free space on that disk or choose another --out" in line, line
    assert not out.exists()


def test_a_failed_run_keeps_what_resume_needs(tmp_path):
    from upvit.outputs import new_paths, remove_unfinished

    run = tmp_path / "a" / "run"
    created = new_paths([str(run), str(tmp_path / "b" / "s.safetensors"), str(tmp_path)])
    assert created == [str(tmp_path / "a"), str(tmp_path / "b")]  # the outermost new folders; tmp_path existed
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"state")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "log.txt").write_text("x")
    assert remove_unfinished(created) == [str(tmp_path / "b")]
    assert (run / "checkpoint.pt").is_file()  # a training checkpoint stays for --resume
