"""ONNX export: every family upvit prunes exports, and ONNX Runtime reproduces PyTorch's output, at a batch
size (and, for text, a sequence length) other than the traced one; a graph that is not the model is refused."""
import contextlib
import io
import os

import numpy as np
import onnx
import pytest
import torch

from helpers import assert_one_line_error, run_cli, run_main, tiny_swin, tiny_vit
from hf_helpers import tiny_bert, tiny_gpt2, tiny_hf_vit
from pvt_helpers import tiny_pvt
from upvit import export as ex
from upvit.cli import main
from upvit.errors import UpvitError
from upvit.io import save

FAMILIES = {
    "timm-vit": lambda: tiny_vit(),
    "timm-deit-distilled": lambda: tiny_vit(distilled=True),
    "timm-swin": lambda: tiny_swin(),
    "timm-pvtv2": lambda: tiny_pvt(),
    "hf-gpt2": lambda: tiny_gpt2(),
    "hf-bert-encoder": lambda: tiny_bert(),
    "hf-bert-mlm": lambda: tiny_bert(mlm=True),
    "hf-vit": lambda: tiny_hf_vit(),
    "hf-deit": lambda: tiny_hf_vit("DeiTForImageClassification"),
}


def reference(model, inputs):
    """PyTorch's output computed without the export module's wrapper (independent of upvit.export)."""
    from upvit.evaluation import logits_of

    with torch.no_grad():
        if "input_ids" in inputs:
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return logits_of(out, inputs).numpy()
        return logits_of(model(inputs["pixel_values"])).numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_with_onnxruntime_parity_at_another_batch(family, tmp_path):
    model = FAMILIES[family]()
    path = str(tmp_path / "m.onnx")
    result = ex.export_onnx(model, path)
    assert os.path.isfile(path) and result.opset == 17
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ex.input_names(model)
    first = graph.input[0].type.tensor_type.shape.dim
    assert first[0].dim_param == "batch"  # symbolic, not the traced 2
    if ex.is_text(model):
        assert first[1].dim_param == "sequence"
    assert all(p.ok for p in result.parity) and len(result.parity) == 2
    # an independent check at batch 5 (traced at 2), text also at a sequence length of 5
    inputs = ex.sample_inputs(model, 5, 5 if ex.is_text(model) else None, seed=7)
    want = reference(model, inputs)
    got = ex.run_session(ex.session(path), inputs)
    assert got.shape == want.shape and got.shape[0] == 5
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_dynamo_exporter_also_reaches_parity(tmp_path):
    model = tiny_gpt2()  # the family with a dynamic sequence axis (the harder case for torch.export)
    result = ex.export_onnx(model, str(tmp_path / "d.onnx"), exporter="dynamo")
    assert result.opset == 18 and all(p.ok for p in result.parity)


def test_a_graph_of_another_model_fails_parity_in_one_line(tmp_path):
    path = str(tmp_path / "other.onnx")
    ex.export_onnx(tiny_vit(seed=1), path)
    with pytest.raises(UpvitError) as e:
        ex.check_parity(tiny_vit(seed=0), path)  # same shape, other weights: a real mismatch
    assert "ONNX parity failed" in str(e.value) and "\n" not in str(e.value)


def test_sample_inputs_follow_the_data_config():
    model = tiny_vit()  # mean = std = 0.5: pixels in [0, 1] become [-1, 1]
    x = ex.sample_inputs(model, 64)["pixel_values"]
    assert x.shape == (64, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    text = ex.sample_inputs(tiny_gpt2(), 3, 8)
    assert text["input_ids"].shape == (3, 8) and text["input_ids"].max() < 40
    assert text["attention_mask"][:2].all() and text["attention_mask"][2].tolist() == [1] * 6 + [0] * 2


def test_cli_exports_and_prints_parity(tmp_path):
    save(tiny_vit(), str(tmp_path / "model"))
    out = tmp_path / "model.onnx"
    r = run_cli("export", tmp_path / "model", "--format", "onnx", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "opset 17" in r.stdout and "pixel_values[0:batch]" in r.stdout
    assert r.stdout.count("parity in onnxruntime") == 2 and out.is_file()
    assert_one_line_error(run_main("export", tmp_path / "model", "--out", out), "already exists")


def test_cli_refuses_a_mismatching_export_in_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    save(tiny_vit(), str(tmp_path / "model"))
    real = ex.run_session
    monkeypatch.setattr(ex, "run_session", lambda sess, inputs: real(sess, inputs) + 0.5)  # a wrong graph
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "m.onnx")])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err.getvalue()
    assert "ONNX parity failed: max |onnxruntime - torch| = 0.5" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["model"]  # neither the .onnx nor its temporary file


def test_cli_refuses_an_out_that_is_not_an_onnx_file(tmp_path):
    save(tiny_vit(), str(tmp_path / "model"))
    assert_one_line_error(run_main("export", tmp_path / "model", "--out", tmp_path / "m.bin"), "ending in .onnx")
