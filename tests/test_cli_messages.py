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
