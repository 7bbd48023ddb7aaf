"""bench --runtime: the ONNX Runtime runner computes the same outputs as PyTorch and fills the same row."""
import json

import numpy as np
import torch

from helpers import run_cli, run_main, tiny_vit
from hf_helpers import tiny_gpt2
from upvit.bench import example_batch, make_runner, throughput
from upvit.io import save


def test_onnxruntime_runner_computes_what_torch_computes():
    for model in (tiny_vit(), tiny_gpt2()):
        x = example_batch(model, 3, None, "cpu", random=True)
        if isinstance(x, dict):  # text: random ids, so that the comparison is not of constant rows
            x["input_ids"] = torch.randint(0, 40, x["input_ids"].shape, generator=torch.Generator().manual_seed(0))
        want = make_runner(model, x, "torch")().numpy()
        got = make_runner(model, x, "onnxruntime")()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_throughput_row_has_the_same_fields_in_both_runtimes():
    rows = [throughput(tiny_vit(), batch_size=2, runs=2, warmup=1, runtime=r) for r in ("torch", "onnxruntime")]
    assert rows[0].keys() == rows[1].keys()
    assert [r["runtime"] for r in rows] == ["torch", "onnxruntime"] and all(r["images_per_second"] > 0 for r in rows)


def test_cli_bench_onnxruntime_writes_the_usual_table_and_json(tmp_path):
    save(tiny_vit(), str(tmp_path / "model"))
    r = run_cli("bench", tmp_path / "model", "--runtime", "onnxruntime", "--batch-size", "2", "--runs", "2",
                "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    torch_run = run_main("bench", tmp_path / "model", "--batch-size", "2", "--runs", "2", "--device", "cpu")
    header = [line for line in torch_run.stdout.splitlines() if line.startswith("| model")]
    assert header and header[0] in r.stdout  # the same table as the torch runtime's
    row = json.loads((tmp_path / "b.json").read_text())[0]
    assert row["runtime"] == "onnxruntime" and row["batch_size"] == 2 and row["macs"] == 202968
