"""Issue 21, items 5-7 and 9: messages that say why and what to do, help text, defaults, --version.

CLI behaviour is checked from outside (a subprocess, ``tests/helpers.py``); a fault that cannot be
produced from outside (a full disk) is injected in-process at write time."""
from __future__ import annotations

from helpers import assert_one_line_error, run_cli

TINY_SPEC = "timm:vit_base_patch16_224,img_size=16,patch_size=4,in_chans=3,num_classes=2,embed_dim=24,depth=1,num_heads=4"


# ------------------------------------------------------------------------------- item 7: --data FILE
def test_data_file_is_named_a_file_and_every_spelling_is_listed(tmp_path):
    data = tmp_path / "images.zip"
    data.write_bytes(b"not a folder")
    result = run_cli("eval", TINY_SPEC, "--data", data)
    assert_one_line_error(result, f"data '{data}' is a file, not a directory")
    line = result.stderr.strip()
    assert "does not exist" not in line
    for spelling in ("ImageFolder directory", "animal-mnist:", "shakespeare:", "text:FILE_OR_DIR"):
        assert spelling in line, (spelling, line)


def test_missing_data_directory_lists_every_spelling(tmp_path):
    result = run_cli("eval", TINY_SPEC, "--data", tmp_path / "nowhere")
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
