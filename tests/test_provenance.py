"""Each output records its own command, inputs (with fingerprints) and results; the record of the model
it was made from is kept under ``source`` (issue 21, item 4; upvit/provenance.py).

The chain train -> score -> prune -> finetune (and depth) runs through the CLI's ``main`` in-process,
with tiny settings; every recorded fingerprint is checked against one computed here from the file or
model it names."""
from __future__ import annotations

import hashlib
import json

import pytest

import upvit
from upvit.bench import count_params
from upvit.cli import main
from upvit.fingerprint import model_fingerprint
from upvit.provenance import derive

SPEC = ("timm:vit_base_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,embed_dim=24,depth=2,"
        "num_heads=4,mlp_ratio=2.0")
TINY_RUN = ["--epochs", "1", "--batch-size", "16", "--max-steps-per-epoch", "2"]


def _extra(directory) -> dict:
    with open(directory / "config.json") as f:
        return json.load(f)["extra"]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_derive_moves_the_parents_record_under_source():
    parent = {"command": "upvit train x", "training": {"epochs": 3}, "results": {"val_top1": 96.55},
              "timm_equivalent_kwargs": {"a": 1}, "plan": {"keep": {}}}
    assert derive(parent) == {"plan": {"keep": {}}, "timm_equivalent_kwargs": {"a": 1},
                              "source": {"command": "upvit train x", "training": {"epochs": 3},
                                         "results": {"val_top1": 96.55}}}
    assert derive({}) == {}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    argv = {
        "train": ["train", SPEC, "--data", "animal-mnist:train", "--val-data", "animal-mnist:val", *TINY_RUN,
                  "--out", str(root / "teacher")],
        "score": ["score", str(root / "teacher"), "--data", "animal-mnist:train", "--proxy-size", "4",
                  "--method", "magnitude", "--out", str(root / "s.safetensors")],
        "prune": ["prune", str(root / "teacher"), "--scores", str(root / "s.safetensors"), "--ratio", "0.5",
                  "--out", str(root / "pruned")],
        "finetune": ["finetune", str(root / "pruned"), "--teacher", str(root / "teacher"), "--data",
                     "animal-mnist:train", *TINY_RUN, "--out", str(root / "ft")],
    }
    for name, args in argv.items():
        assert main(args) == 0, name
    return root, argv


def test_train_records_its_run_and_nothing_else(chain):
    root, argv = chain
    extra = _extra(root / "teacher")
    assert extra["command"] == "upvit " + " ".join(argv["train"])
    assert "source" not in extra  # a timm: spec has no earlier record
    assert extra["inputs"]["model"]["spec"] == SPEC
    assert extra["inputs"]["model"]["fingerprint"] == model_fingerprint(upvit.load_model(SPEC))  # before training
    assert extra["inputs"]["data"] == {"spec": "animal-mnist:train", "samples": 8000}
    assert extra["inputs"]["val_data"] == {"spec": "animal-mnist:val", "samples": 2000}
    with open(root / "teacher" / "log.jsonl") as f:
        last = json.loads(f.read().splitlines()[-1])
    assert extra["results"] == last and "val_top1" in extra["results"]
    assert extra["training"]["epochs"] == 1 and "final" not in extra["training"]


def test_pruned_model_records_the_prune_and_keeps_the_teachers_record_as_source(chain):
    root, argv = chain
    teacher, pruned = _extra(root / "teacher"), _extra(root / "pruned")
    assert pruned["command"] == "upvit " + " ".join(argv["prune"])
    for key in ("training", "results"):
        assert pruned.get(key) != teacher[key]
    assert "training" not in pruned  # the teacher's training is not the pruned model's
    assert pruned["source"] == teacher  # the teacher's whole record, under a named key
    inputs = pruned["inputs"]
    assert inputs["model"]["fingerprint"] == model_fingerprint(upvit.load(str(root / "teacher")))
    assert inputs["scores"]["sha256"] == _sha256(root / "s.safetensors")
    assert inputs["scores"]["path"] == str(root / "s.safetensors") and inputs["scores"]["criterion"] == "magnitude"
    small, big = upvit.load(str(root / "pruned")), upvit.load(str(root / "teacher"))
    assert pruned["results"]["params"] == count_params(small) < pruned["results"]["params_before"] == count_params(big)
    assert "plan" in pruned


def test_finetuned_model_records_its_run_and_the_chain(chain):
    root, argv = chain
    ft, pruned = _extra(root / "ft"), _extra(root / "pruned")
    assert ft["command"] == "upvit " + " ".join(argv["finetune"])
    assert ft["inputs"]["model"]["fingerprint"] == model_fingerprint(upvit.load(str(root / "pruned")))
    assert ft["inputs"]["teacher"]["fingerprint"] == model_fingerprint(upvit.load(str(root / "teacher")))
    assert ft["results"]["epoch"] == 1 and "distillation" in ft
    assert ft["plan"] == pruned["plan"]  # the shape relation to the teacher still holds
    assert {k: v for k, v in ft["source"].items()} == {k: v for k, v in pruned.items() if k != "plan"
                                                       and k != "timm_equivalent_kwargs"}
    assert ft["source"]["source"]["command"].startswith("upvit train")


def test_score_metadata_records_its_inputs(chain):
    root, argv = chain
    meta = upvit.Scores.load(str(root / "s.safetensors")).meta
    assert meta["command"] == "upvit " + " ".join(argv["score"])
    assert meta["inputs"] == {"model": str(root / "teacher"), "checkpoint": None, "data": "animal-mnist:train"}
    assert meta["model_fingerprint"] == model_fingerprint(upvit.load(str(root / "teacher")))


def test_depth_records_its_run_with_the_input_model_as_source(chain):
    root, _ = chain
    out = root / "depth"
    args = ["depth", str(root / "teacher"), "--data", "animal-mnist:train", "--remove", "1", "--epochs", "0",
            "--proxy-size", "4", "--bench-batch", "2", "--bench-runs", "1", "--out", str(out)]
    assert main(args) == 0
    extra = _extra(out)
    assert extra["command"] == "upvit " + " ".join(args)
    assert extra["source"] == _extra(root / "teacher")
    assert extra["inputs"]["model"]["fingerprint"] == model_fingerprint(upvit.load(str(root / "teacher")))
    assert extra["depth"]["remove"] == 1 and extra["results"]["depth"] == 1
    assert "plan" not in extra and "training" not in extra
