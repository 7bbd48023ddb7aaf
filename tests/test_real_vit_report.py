"""``benchmarks/real_vit.py report`` shows every measured cell, whichever results file the last run wrote.

Runs started with ``REAL_VIT_RESULTS=benchmarks/results/real_vit_x.json`` keep their cells in their own file;
the report must fold them into ``real_vit.json``'s cells even when that variable still points elsewhere (a
report once dropped the main file's scoring rows and images/s table that way).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location("real_vit_bench", os.path.join(REPO, "benchmarks", "real_vit.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _write(path, cells, **extra):
    with open(path, "w") as f:
        json.dump({"machine": "test box", "cells": cells, **extra}, f)


def test_report_merges_the_main_file_and_every_side_file(tmp_path, monkeypatch):
    rv = _module()
    main_cells = {"score/fisher": {"command": "upvit score T --proxy-size 32 --method fisher", "seconds": 460.0,
                                   "cpu_seconds": 320.0},
                  "finetune/fisher/ti/s0": {"command": "upvit finetune", "val_top1": 65.34, "epochs": 2}}
    _write(tmp_path / "real_vit.json", main_cells, settings={"proxy": 32})
    _write(tmp_path / "real_vit_ft6.json",
           {"finetune/fisher/ti/s0": {"command": "upvit finetune", "val_top1": 74.81, "epochs": 6},
            "score/random": {"command": "upvit score T --proxy-size 8 --method random", "seconds": 9.0,
                             "cpu_seconds": 4.0}})
    (tmp_path / "unrelated.json").write_text("{}")
    monkeypatch.setenv("REAL_VIT_RESULTS", str(tmp_path / "real_vit_ft6.json"))

    merged = rv.merged_results(str(tmp_path))

    assert merged["settings"] == {"proxy": 32}  # the main file is the base
    assert set(merged["cells"]) == {"score/fisher", "score/random", "finetune/fisher/ti/s0",
                                    "finetune/fisher/ti/s0#real_vit_ft6.json"}
    # the colliding key keeps both cells: the main file's under its own key, the side file's suffixed
    assert merged["cells"]["finetune/fisher/ti/s0"]["val_top1"] == 65.34
    assert merged["cells"]["finetune/fisher/ti/s0#real_vit_ft6.json"]["val_top1"] == 74.81


def test_report_without_a_main_file_uses_the_side_files(tmp_path):
    rv = _module()
    _write(tmp_path / "real_vit_a.json", {"score/taylor": {"command": "c", "seconds": 1.0}})
    merged = rv.merged_results(str(tmp_path))
    assert list(merged["cells"]) == ["score/taylor"]


def test_the_written_report_shows_cells_of_both_files(tmp_path, monkeypatch):
    rv = _module()
    _write(tmp_path / "real_vit.json",
           {"score/fisher": {"command": "upvit score T --proxy-size 32 --method fisher", "seconds": 460.0,
                             "cpu_seconds": 320.0},
            "eval/fisher/ti": {"command": "upvit eval", "result": {"top1": 5.49}}})
    _write(tmp_path / "real_vit_ft6.json",
           {"finetune/fisher/ti/ep6/s0": {"command": "upvit finetune M --epochs 6 --out X", "val_top1": 74.81}})
    monkeypatch.setenv("REAL_VIT_RESULTS", str(tmp_path / "real_vit_ft6.json"))
    monkeypatch.setattr(rv, "REPORT", str(tmp_path / "real_vit.md"))
    rv.report(None)
    text = (tmp_path / "real_vit.md").read_text()
    # 320 CPU s over 32 images = 10 s each; 2,000 images = 20,000 s = 5.6 h
    assert "| fisher | 32 | 460 | 320.0 | 10.0 | 5.6 |" in text
    assert "| fisher | ti (192, 3, 768) | 5.49 | 74.81 |" in text


def test_a_timing_run_is_named_and_projected_like_its_method(tmp_path, monkeypatch):
    rv = _module()
    _write(tmp_path / "real_vit.json",
           {"score/fisher": {"command": "upvit score T --proxy-size 32 --method fisher", "seconds": 460.0},
            "score/fisher_cost": {"command": "upvit score T --proxy-size 16 --method fisher --out F",
                                  "seconds": 90.0, "cpu_seconds": 72.0}})
    monkeypatch.setattr(rv, "REPORT", str(tmp_path / "real_vit.md"))
    rv.report(None)
    text = (tmp_path / "real_vit.md").read_text()
    assert "| fisher | 32 | 460 | - | - | - |" in text  # the main run's cell has no CPU time
    # 72 CPU s over 16 images = 4.5 s each; 2,000 images = 9,000 s = 2.5 h
    assert "| fisher (timing run) | 16 | 90 | 72.0 | 4.5 | 2.5 |" in text


def test_cost_runs_are_parsed_and_a_missing_count_is_refused():
    import argparse

    import pytest

    rv = _module()
    assert rv._cost_runs("kl:1,fisher:32") == [("kl", 1), ("fisher", 32)]
    for bad in ("fisher", "fisher:0", "fisher:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="METHOD:N"):
            rv._cost_runs(bad)


def test_a_second_task_gets_its_own_table_and_leaves_the_emoji_table_alone(tmp_path, monkeypatch):
    rv = _module()
    _write(tmp_path / "real_vit.json",
           {"eval/fisher/ti": {"command": "upvit eval", "result": {"top1": 5.49}}})
    _write(tmp_path / "real_vit_animal.json",
           {"animal-mnist/eval/fisher/ti": {"command": "upvit eval", "result": {"top1": 41.25}},
            "animal-mnist/finetune/scratch/ti/ep2/s0": {"command": "upvit finetune M --epochs 2 --out X",
                                                        "val_top1": 80.5}})
    monkeypatch.setattr(rv, "REPORT", str(tmp_path / "real_vit.md"))
    rv.report(None)
    text = (tmp_path / "real_vit.md").read_text()
    emoji, animal = text.split("## Second task: animal-mnist")
    assert "| fisher | ti (192, 3, 768) | 5.49 |" in emoji and "41.25" not in emoji and "80.5" not in emoji
    assert "| fisher | ti (192, 3, 768) | 41.25 | - |" in animal
    assert "| method | shape | before fine-tuning | after 2 epochs |\n|---|---|---:|---:|\n" in animal
    assert "| scratch | ti (192, 3, 768) | random init | 80.50 |" in animal


def test_a_table_without_fine_tuning_has_no_empty_column(tmp_path, monkeypatch):
    rv = _module()
    _write(tmp_path / "real_vit.json", {"eval/taylor/ti": {"command": "upvit eval", "result": {"top1": 10.0}}})
    monkeypatch.setattr(rv, "REPORT", str(tmp_path / "real_vit.md"))
    rv.report(None)
    text = (tmp_path / "real_vit.md").read_text()
    assert "| method | shape | before fine-tuning |\n|---|---|---:|\n| taylor | ti (192, 3, 768) | 10.00 |\n" in text


def test_task_setup_points_runs_keys_and_scratch_at_the_second_task(monkeypatch):
    rv = _module()
    rv.task_setup("emoji")
    assert (rv.KEY_PREFIX, rv.DATA_TRAIN) == ("", "emoji:train") and "num_classes=9" in rv.SCRATCH
    rv.task_setup("animal-mnist")
    assert rv.KEY_PREFIX == "animal-mnist/" and rv.DATA_TRAIN == "animal-mnist-rgb:train"
    assert rv.RUNS == os.path.join("runs", "real_vit", "animal-mnist") and "num_classes=10" in rv.SCRATCH
    recorded = {"cells": {"animal-mnist/eval/fisher/ti": {"command": "done before"}}}
    # a recorded cell of the second task is found under its prefixed key (no command is run)
    assert rv.step(recorded, "eval/fisher/ti", ["eval"]) == {"command": "done before"}


def test_the_confidence_record_of_a_side_file_is_reported(tmp_path, monkeypatch):
    rv = _module()
    _write(tmp_path / "real_vit.json", {})
    _write(tmp_path / "real_vit_conf.json", {}, confidence={"images": 4, "rows": {
        "teacher": {"top_prob": 0.98, "kl": 0.0}, "fisher/mild": {"top_prob": 0.997, "kl": 11.88}}})
    monkeypatch.setattr(rv, "REPORT", str(tmp_path / "real_vit.md"))
    rv.report(None)
    text = (tmp_path / "real_vit.md").read_text()
    assert "how the students answer (4 emoji training images)" in text
    assert "| teacher | 0.980 | 0.00 |\n| fisher/mild | 0.997 | 11.88 |\n" in text
