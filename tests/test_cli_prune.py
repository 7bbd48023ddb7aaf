"""`upvit prune`: writes the pruned model directory and plan.json, prints params and MACs."""
from __future__ import annotations

import json
import re

import torch

import upvit
from helpers import tiny_images, tiny_vit
from plan_helpers import random_scores
from upvit.bench import count_macs, count_params
from upvit.cli import main
from upvit.plan import Plan


def setup_model(tmp_path):
    model = tiny_vit()
    model_dir = str(tmp_path / "model")
    upvit.save(model, model_dir)
    scores_file = str(tmp_path / "scores.safetensors")
    random_scores(model, seed=7).save(scores_file)
    return model, model_dir, scores_file


def test_prune_from_scores_then_replay_plan(tmp_path, capsys):
    model, model_dir, scores_file = setup_model(tmp_path)
    out = str(tmp_path / "pruned")
    assert main(["prune", model_dir, "--scores", scores_file, "--embed-dim", "12", "--num-heads", "2",
                 "--mlp-hidden", "20", "--out", out]) == 0
    printed = capsys.readouterr().out
    pruned = upvit.load(out)
    assert (pruned.embed_dim == 12 and pruned.blocks[0].attn.num_heads == 2
            and pruned.blocks[0].mlp.fc1.out_features == 20)
    numbers = lambda line: [int(n.replace(",", "")) for n in re.findall(r"[\d,]{2,}", line)]  # noqa: E731
    params_line = next(line for line in printed.splitlines() if line.startswith("params"))
    macs_line = next(line for line in printed.splitlines() if line.startswith("MACs"))
    assert numbers(params_line)[:2] == [count_params(model), count_params(pruned)]
    assert numbers(macs_line)[:2] == [count_macs(model), count_macs(pruned)]
    plan = Plan.load(str(tmp_path / "pruned" / "plan.json"))
    expected = upvit.make_plan(model, upvit.Scores.load(scores_file), embed_dim=12, num_heads=2, mlp_hidden=20)
    assert plan == expected

    replay = str(tmp_path / "replay")
    assert main(["prune", model_dir, "--plan", str(tmp_path / "pruned" / "plan.json"), "--out", replay]) == 0
    again = upvit.load(replay)
    x = tiny_images()
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
    with open(tmp_path / "replay" / "config.json") as f:
        assert json.load(f)["extra"]["plan"]["keep"]["res.0"] == plan.keep_embed


def test_prune_ratio_and_clear_errors(tmp_path, capsys):
    _, model_dir, scores_file = setup_model(tmp_path)
    assert main(["prune", model_dir, "--scores", scores_file, "--ratio", "0.5", "--out", str(tmp_path / "r")]) == 0
    assert upvit.load(str(tmp_path / "r")).embed_dim == 12
    capsys.readouterr()
    cases = [
        (["--scores", scores_file, "--num-heads", "3"], "num_heads=3 does not divide"),
        (["--scores", scores_file], "no target given"),
        (["--scores", scores_file, "--ratio", "0.5", "--embed-dim", "12"], "either --ratio or explicit targets"),
        (["--plan", str(tmp_path / "r" / "plan.json"), "--embed-dim", "12"], "--plan already fixes the shape"),
        (["--plan", str(tmp_path / "missing.json")], "cannot read plan"),
    ]
    for extra, message in cases:
        assert main(["prune", model_dir, *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("upvit: error:") and message in err and "\n" not in err


def test_prune_with_whole_heads_and_compensation(tmp_path, capsys):
    """--heads whole with --data ranks heads by their exact removal KL; --compensate lsq refits on the same proxy
    samples: the written model equals upvit.prune(..., compensate="lsq") on those samples."""
    from helpers import write_image_folder
    from upvit.data import load_data, sample_proxy
    from upvit.importance.api import proxy_tensor
    from upvit.importance.heads import head_scores

    model, model_dir, scores_file = setup_model(tmp_path)
    folder = str(tmp_path / "images")
    write_image_folder(folder, classes=("a", "b", "c"), per_class=4, size=16)
    out = str(tmp_path / "pruned")
    assert main(["prune", model_dir, "--scores", scores_file, "--embed-dim", "12", "--num-heads", "2",
                 "--mlp-hidden", "20", "--heads", "whole", "--compensate", "lsq", "--data", folder,
                 "--proxy-size", "8", "--out", out]) == 0
    assert "compensation lsq:" in capsys.readouterr().out
    dataset, _ = load_data(folder, data_config=model.upvit_config.data_config)
    proxy = proxy_tensor(sample_proxy(dataset, size=8, seed=0)[0], (3, 16, 16))
    plan = upvit.make_plan(model, upvit.Scores.load(scores_file), embed_dim=12, num_heads=2, mlp_hidden=20,
                           heads="whole", head_scores=head_scores(model, proxy))
    assert Plan.load(str(tmp_path / "pruned" / "plan.json")).keep == plan.keep
    want = upvit.prune(model, plan, compensate="lsq", proxy=proxy)
    got = upvit.load(out)
    for key, value in want.state_dict().items():
        assert torch.allclose(got.state_dict()[key], value, atol=1e-6), key
    assert got.upvit_config.extra["compensation"]["mode"] == "lsq"
    for extra, message in [(["--compensate", "lsq"], "--compensate lsq refits layers on a proxy set: add --data"),
                           (["--plan", str(tmp_path / "pruned" / "plan.json"), "--heads", "whole"],
                            "--heads applies when the plan is made from --scores")]:
        args = extra if "--plan" in extra else ["--scores", scores_file, "--ratio", "0.5", *extra]
        assert main(["prune", model_dir, *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
