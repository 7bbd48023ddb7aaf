"""benchmarks/quality.py at smoke size: every method's cell, records, resume/skip, the report's statistics."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from upvit.io import save
from upvit.models import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"S": {"embed_dim": 24, "num_heads": 6, "mlp_hidden": 48},
          "T": {"embed_dim": 12, "num_heads": 3, "mlp_hidden": 24}}


def _module():
    spec = importlib.util.spec_from_file_location("quality_bench", os.path.join(REPO, "benchmarks", "quality.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_smoke(tmp_path_factory)
    finally:
        torch.set_num_threads(before)


def _run_smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    torch.manual_seed(0)
    teacher = load_model("timm:vit_base_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,"
                         "embed_dim=48,depth=2,num_heads=12,mlp_ratio=2.0")
    teacher.upvit_config.data_config.update({"mean": [0.2725], "std": [0.4056]})
    save(teacher, str(tmp / "teacher"))
    q = _module()
    args = ["run", "--smoke", "--teacher", str(tmp / "teacher"), "--shapes-json", json.dumps(SHAPES),
            "--proxy-size", "16", "--budget", "2", "--seed", "0", "--results", str(tmp / "results"),
            "--work", str(tmp / "work")]
    assert q.main(args) == 0
    return q, tmp, args


def test_every_method_writes_a_record(bench):
    q, tmp, _ = bench
    cells = q.load_cells(str(tmp / "results"))
    assert sorted(c["cell"] for c in cells) == sorted(f"{s}-{m}-ep2-seed0" for s in "ST" for m in q.METHODS)
    for c in cells:
        width = SHAPES[c["shape"]]["embed_dim"]
        assert 0 <= c["top1"] <= 100 and len(c["val_curve"]) == c["finetune_epochs"]
        assert c["finetune_epochs"] + c["pre_epochs"] == 2  # the same distillation budget for every method
        if c["method"] == "scratch":
            assert c["plan"] is None
        else:
            assert len(c["plan"]["keep"]["res.0"]) == width  # a plan of the teacher at the cell's shape
    iterative = [c for c in cells if c["method"] == "kl-iterative"]
    assert all(c["pre_epochs"] == 1 and len(c["selection"]["steps"]) == 2 for c in iterative)
    # the T path of two steps goes through the S shape
    t_steps = next(c for c in iterative if c["shape"] == "T")["selection"]["steps"]
    assert t_steps[0]["targets"]["stages"][0]["residual"] == 24
    # scores of the selections that cost something are kept with the results
    assert os.path.exists(tmp / "results" / "scores_taylor_p16_seed0.safetensors")
    assert os.path.exists(tmp / "results" / "scores_greedy_p16_seed0.safetensors")


def test_finished_cells_are_skipped_and_the_teacher_cache_is_reused(bench, capsys):
    q, tmp, args = bench
    before = {f: os.path.getmtime(tmp / "results" / "cells" / f) for f in os.listdir(tmp / "results" / "cells")}
    assert q.main(args) == 0
    assert "0 cells to run" in capsys.readouterr().out
    assert before == {f: os.path.getmtime(tmp / "results" / "cells" / f) for f in os.listdir(tmp / "results" / "cells")}
    assert len(os.listdir(next((tmp / "work" / "teacher_logits").iterdir()))) > 0


def test_report_statistics(bench):
    q, tmp, _ = bench
    # two more seeds of one cell, written by hand, to check mean and standard error
    folder = tmp / "results" / "cells"
    base = json.loads((folder / "T-kl-ep2-seed0.json").read_text())
    mag = json.loads((folder / "T-magnitude-ep2-seed0.json").read_text())
    for seed, top1, top1_mag in ((1, 50.0, 40.0), (2, 60.0, 44.0)):
        (folder / f"T-kl-ep2-seed{seed}.json").write_text(json.dumps({**base, "seed": seed,
                                                                      "cell": f"T-kl-ep2-seed{seed}", "top1": top1}))
        (folder / f"T-magnitude-ep2-seed{seed}.json").write_text(
            json.dumps({**mag, "seed": seed, "cell": f"T-magnitude-ep2-seed{seed}", "top1": top1_mag}))
    result = q.report(str(tmp / "results"), str(tmp / "quality"))
    values = [base["top1"], 50.0, 60.0]
    mean = sum(values) / 3
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / 2 / 3)
    cell = result["cells"]["T-kl-ep2"]
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(mean) and cell["se"] == pytest.approx(se)
    comp = result["comparisons"]["T-ep2: kl vs magnitude"]
    mags = [mag["top1"], 40.0, 44.0]
    m_mean = sum(mags) / 3
    m_se = math.sqrt(sum((v - m_mean) ** 2 for v in mags) / 2 / 3)
    assert comp["diff"] == pytest.approx(mean - m_mean) and comp["se"] == pytest.approx(math.hypot(se, m_se))
    diffs = [a - b for a, b in zip(values, mags)]
    assert comp["paired_diff"] == pytest.approx(sum(diffs) / 3)
    assert not result["complete"] and "S-kl-ep4-seed1" in result["missing"]  # the full grid is 84 cells
    text = (tmp / "quality.md").read_text()
    assert "INCOMPLETE" in text and "| T-ep2: kl vs magnitude |" in text and "## Budget 2 epochs" in text
    assert (q.verdict(1.1, 0.5) == "wins (>2 SE)" and q.verdict(0.9, 0.5) == "wins" and q.verdict(0.4, 0.5) == "ties"
            and q.verdict(-0.6, 0.5) == "loses")


def test_priority_order():
    q = _module()
    order = q.priority()
    assert len(order) == 144 and len(set(order)) == 144  # 12 methods x 2 shapes x 2 budgets x 3 seeds
    first_option = next(i for i, k in enumerate(order) if k[1] in q.OPTIONS)
    first_26 = next(i for i, k in enumerate(order) if k[1] in q.HEADS_AND_COMPENSATION)
    first_16 = next(i for i, k in enumerate(order) if k[2] == 16)
    # the paper's comparison at 4 epochs, then the two options, then whole heads / compensation, then 16
    assert (first_option, first_26, first_16) == (30, 42, 72)
    assert order[:5] == [("T", m, 4, 0) for m in q.PAPER]
