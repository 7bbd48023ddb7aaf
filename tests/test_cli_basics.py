"""The CLI's bad-input contract: one clear line on stderr, non-zero exit, no traceback (in-process; `eval` once
through a fresh interpreter)."""
from helpers import assert_one_line_error, run_cli, run_main, tiny_vit
from upvit.io import save


def test_eval_with_missing_data_path(tmp_path):
    save(tiny_vit(), str(tmp_path / "m"))
    assert_one_line_error(run_main("eval", str(tmp_path / "m"), "--data", str(tmp_path / "nowhere")), "does not exist")


def test_bench_with_unknown_model_name():
    assert_one_line_error(run_main("bench", "timm:no_such_model_xyz"), "unknown timm model")


def test_eval_with_corrupt_weights(tmp_path):
    save(tiny_vit(), str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"this is not a safetensors file")
    assert_one_line_error(run_main("eval", str(tmp_path / "m"), "--data", "animal-mnist:val"),
                          "not a readable safetensors")


def test_eval_with_wrong_input_size(tmp_path):
    save(tiny_vit(), str(tmp_path / "m"))  # expects 3x16x16
    assert_one_line_error(run_main("eval", str(tmp_path / "m"), "--data", "animal-mnist:val"), "expects input")


def test_eval_and_bench_report_numbers(tmp_path):
    model = tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10)
    model.upvit_config.data_config.update({"mean": [0.2725], "std": [0.4056]})
    save(model, str(tmp_path / "m"))
    r = run_cli("eval", str(tmp_path / "m"), "--data", "animal-mnist:val", "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    import json

    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["n"] == 2000 and 0 <= metrics["top1"] <= 100 and metrics["loss"] > 0
    r = run_main("bench", str(tmp_path / "m"), "--batch-size", "4", "--runs", "2", "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "b.json").read_text())
    assert rows[0]["params"] == sum(p.numel() for p in model.parameters())
