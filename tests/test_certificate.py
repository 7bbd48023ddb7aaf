"""The certificate of a pruned model: reload through the stock class in a fresh process (an error when it
fails), report.json + report.md with shapes, parameters, MACs, throughput, proxy divergence and ONNX parity."""
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import upvit
from helpers import run_cli, tiny_vit
from hf_helpers import tiny_gpt2
from plan_helpers import random_scores
from upvit.bench import count_macs, count_params
from upvit.certificate import certify, proxy_divergence
from upvit.errors import UpvitError


def pruned_dir(tmp_path, model=None):
    model = model or tiny_vit()
    pruned = upvit.prune(model, upvit.make_plan(model, random_scores(model), ratio=0.5))
    out = str(tmp_path / "pruned")
    upvit.save(pruned, out)
    return model, pruned, out


def test_report_holds_the_measured_facts(tmp_path):
    model, pruned, out = pruned_dir(tmp_path)
    x = torch.randn(7, 3, 16, 16)
    report = certify(out, pruned, source=model, proxy=x, onnx=True)
    on_disk = json.load(open(os.path.join(out, "report.json")))
    assert on_disk["reload"]["ok"] and on_disk["reload"]["max_abs_diff"] <= 1e-6
    assert on_disk["target"]["params"] == count_params(pruned) and on_disk["source"]["macs"] == count_macs(model)
    assert on_disk["target"]["shape"]["residual"] == [12] and on_disk["source"]["shape"]["residual"] == [24]
    assert on_disk["ratios"]["macs"] == pytest.approx(count_macs(pruned) / count_macs(model))
    assert on_disk["target"]["throughput"]["per_second"] > 0
    assert on_disk["onnx"]["max_abs_diff"] < 1e-4 and os.path.isfile(os.path.join(out, "model.onnx"))
    # divergence: sum over samples of KL(softmax(source) || softmax(pruned)), computed here by hand
    with torch.no_grad():
        p, q = torch.softmax(model(x).double(), -1), torch.softmax(pruned(x).double(), -1)
    want = float((p * (p.log() - q.log())).sum())
    assert report["proxy_divergence"]["sum"] == pytest.approx(want, rel=1e-6) and want > 1e-3
    md = open(os.path.join(out, "report.md")).read()
    assert "Reload: **passed**" in md and f"{count_params(pruned):,}" in md


def test_corrupted_weights_fail_the_reload(tmp_path):
    _, pruned, out = pruned_dir(tmp_path)
    path = os.path.join(out, "model.safetensors")
    state = load_file(path)
    state["head.weight"] = state["head.weight"] + 0.5  # the file no longer holds the model in memory
    save_file(state, path)
    with pytest.raises(UpvitError, match="reload check failed: .* differs from the saved model"):
        certify(out, pruned)
    assert not os.path.exists(os.path.join(out, "report.json"))


def test_a_config_the_stock_class_cannot_load_fails_the_reload(tmp_path):
    _, pruned, out = pruned_dir(tmp_path)
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    config["timm_kwargs"]["mlp_ratio"] = 4.0  # timm builds FFNs of another width: strict load refuses
    json.dump(config, open(path, "w"))
    with pytest.raises(UpvitError, match="stock class cannot load .*strict load_state_dict"):
        certify(out, pruned)


def test_hf_model_reloads_with_from_pretrained_and_corruption_fails(tmp_path):
    model, pruned, out = pruned_dir(tmp_path, tiny_gpt2())
    report = certify(out, pruned, bench_batch=2, bench_runs=1)
    assert report["reload"]["loader"] == "transformers.GPT2LMHeadModel.from_pretrained"
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    config["n_inner"] = 2 * config["n_inner"]  # from_pretrained would leave the FFN weights mismatched
    json.dump(config, open(path, "w"))
    with pytest.raises(UpvitError, match="reload check failed"):
        certify(out, pruned, bench_batch=2, bench_runs=1)


def test_proxy_divergence_of_the_model_itself_is_zero():
    model = tiny_vit()
    assert proxy_divergence(model, model, torch.randn(4, 3, 16, 16))["sum"] == pytest.approx(0, abs=1e-9)


def test_cli_prune_writes_the_certificate_and_we_measure_what_it_adds(tmp_path):
    model = tiny_vit()
    upvit.save(model, str(tmp_path / "model"))
    random_scores(model).save(str(tmp_path / "s.safetensors"))
    t0 = time.perf_counter()
    r = run_cli("prune", tmp_path / "model", "--scores", tmp_path / "s.safetensors", "--ratio", "0.5",
                "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert "reload through timm.create_model('vit_base_patch16_224', ...) + strict load_state_dict" in r.stdout
    report = json.load(open(tmp_path / "p" / "report.json"))
    print(f"prune took {time.perf_counter() - t0:.1f}s, of which the certificate {report['seconds']:.1f}s "
          f"(reload process {report['reload']['seconds']:.1f}s, overlapping the rest)")
    assert report["command"].startswith("upvit prune") and report["proxy_divergence"] is None
    assert os.path.isfile(tmp_path / "p" / "report.md") and not os.path.exists(tmp_path / "p" / "model.onnx")


def test_cli_prune_with_a_failed_reload_is_a_one_line_error(tmp_path, monkeypatch):
    import contextlib
    import io

    from upvit import certificate
    from upvit.cli import main

    model = tiny_vit()
    upvit.save(model, str(tmp_path / "model"))
    random_scores(model).save(str(tmp_path / "s.safetensors"))
    # the fresh process reloads something else than what was pruned (as if the files were damaged)
    monkeypatch.setattr(certificate, "_CHILD", certificate._CHILD.replace('{"output": out.contiguous()}',
                                                                          '{"output": out.contiguous() + 1}'))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["prune", str(tmp_path / "model"), "--scores", str(tmp_path / "s.safetensors"), "--ratio", "0.5",
                     "--out", str(tmp_path / "p")])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "reload check failed" in lines[0], err.getvalue()
    assert not os.path.exists(tmp_path / "p" / "report.json")
