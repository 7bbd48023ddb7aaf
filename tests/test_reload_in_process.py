"""The in-process stand-in for the certificate's fresh-process reload (tests/conftest.py, used by every test but
test_certificate.py) passes what the fresh process passes and refuses what it refuses, so a broken stand-in
cannot let every CLI prune and finetune in the suite pass unchecked."""
from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file, save_file

import upvit
import upvit.certificate as certificate
from helpers import tiny_vit
from plan_helpers import random_scores
from upvit.errors import UpvitError


def test_the_stand_in_reloads_a_good_directory_and_refuses_bad_ones(tmp_path):
    assert certificate.subprocess.Popen.__name__ == "_ReloadHere"  # this test runs the stand-in
    model = tiny_vit()
    pruned = upvit.prune(model, upvit.make_plan(model, random_scores(model), ratio=0.5))
    out = str(tmp_path / "pruned")
    upvit.save(pruned, out)
    report = certificate.reload_check(out, pruned)
    assert report["ok"] and report["max_abs_diff"] <= 1e-6 and report["loader"].startswith("timm.create_model")
    weights = os.path.join(out, "model.safetensors")
    good = load_file(weights)
    save_file({**good, "head.weight": good["head.weight"] + 0.5}, weights)
    with pytest.raises(UpvitError, match="reload check failed: .* differs from the saved model"):
        certificate.reload_check(out, pruned)
    save_file(good, weights)
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    config["timm_kwargs"]["mlp_ratio"] = 4.0  # timm builds FFNs of another width: strict load refuses
    json.dump(config, open(path, "w"))
    with pytest.raises(UpvitError, match="stock class cannot load .*strict load_state_dict"):
        certificate.reload_check(out, pruned)
