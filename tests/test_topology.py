"""The topology contract: structure as data, targets per stage, version-1 files still load."""
from __future__ import annotations

import json

import pytest
import torch

import upvit
from helpers import tiny_images, tiny_swin, tiny_vit
from plan_helpers import random_scores
from upvit.adapters import get_adapter
from upvit.errors import UpvitError
from upvit.io import save_tensors
from upvit.plan import Plan
from upvit.selection import problems
from upvit.targets import StageTarget, Targets
from upvit.topology import Topology


def test_vit_is_a_one_stage_topology_that_round_trips_through_json():
    topo = get_adapter(tiny_vit(distilled=True)).topology()
    assert [s.key for s in topo.sites] == ["res.0", "attn.0", "ffn.0", "attn.1", "ffn.1"]
    assert [u.key for u in topo.units] == ["attn.0", "ffn.0", "attn.1", "ffn.1"]
    assert topo.head_tokens == 2 and topo.rules.attn_tied_to_residual
    again = Topology.from_dict(json.loads(json.dumps(topo.to_dict())))
    assert again == topo and again.site("attn.1").head_dim == 6


def test_selection_problems_follow_head_merging():
    topo = get_adapter(tiny_swin()).topology()
    targets = Targets.from_ratio(topo, 0.5)
    assert targets.stages == (StageTarget(4, 1, 4, 8), StageTarget(8, 2, 8, 16), StageTarget(16, 4, 16, 32))
    attn2 = [p for p in problems(topo, targets) if p.site == "attn.2"]
    # 4 heads of 4 dims -> 2 heads: source heads (0, 1) and (2, 3), keep 4 dims of each 8
    assert [(p.source_heads, p.channels, p.k) for p in attn2] == [((0, 1), tuple(range(8)), 4),
                                                                    ((2, 3), tuple(range(8, 16)), 4)]


def test_keep_heads_ratio_shrinks_the_head_dim():
    topo = get_adapter(tiny_swin()).topology()
    targets = Targets.from_ratio(topo, 0.5, keep_heads=True)
    assert [st.heads for st in targets.stages] == [2, 4, 8] and [st.attn for st in targets.stages] == [4, 8, 16]


def test_version_1_plan_files_still_load_and_prune_the_same(tmp_path):
    model = tiny_vit()
    plan = upvit.make_plan(model, random_scores(model), embed_dim=12, num_heads=2, mlp_hidden=20)
    v1 = {"format": "upvit-plan", "version": 1, "keep_embed": plan.keep_embed, "keep_attn": plan.keep_attn,
          "keep_ffn": plan.keep_ffn, "num_heads": 2,
          "source": {"embed_dim": 24, "depth": 2, "num_heads": [4, 4], "attn_dim": [24, 24], "ffn_dim": [48, 48]}}
    (tmp_path / "plan.json").write_text(json.dumps(v1))
    old = Plan.load(str(tmp_path / "plan.json"))
    assert old.keep == plan.keep and old.heads == plan.heads
    x = tiny_images()
    with torch.no_grad():
        assert torch.equal(upvit.prune(model, old)(x), upvit.prune(model, plan)(x))


def test_version_1_scores_files_still_load(tmp_path):
    model = tiny_vit()
    scores = random_scores(model, seed=2)
    v1 = {"embed": scores["res.0"], **{k: v for k, v in scores.items() if k != "res.0"}}
    save_tensors(str(tmp_path / "s.safetensors"), v1, metadata={"upvit": json.dumps({"criterion": "kl"})})
    loaded = upvit.Scores.load(str(tmp_path / "s.safetensors"))
    assert set(loaded.keys()) == set(scores.keys()) and torch.equal(loaded["res.0"], scores["res.0"])
    assert upvit.make_plan(model, loaded, ratio=0.5).keep == upvit.make_plan(model, scores, ratio=0.5).keep


def test_scores_of_another_family_are_refused():
    with pytest.raises(UpvitError, match="computed for another model"):
        upvit.make_plan(tiny_swin(), random_scores(tiny_vit()))


def test_targets_reject_wrong_stage_count_and_non_integers():
    topo = get_adapter(tiny_swin()).topology()
    with pytest.raises(UpvitError, match="targets give 1 stages but the model has 3"):
        Targets((StageTarget(4, 1, 4, 8),)).check(topo)
    with pytest.raises(UpvitError, match=r"num_heads\[1\] must be an integer"):
        Targets((StageTarget(4, 1, 4, 8), StageTarget(8, 2.5, 8, 16), StageTarget(16, 4, 16, 32)))


def test_no_module_outside_the_adapters_names_a_model_attribute():
    """Only ``upvit/adapters/`` knows a family's module names (issue 11): the rest works on topologies."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "upvit"
    pattern = re.compile(r"\.(patch_embed|qkv|fc1|fc2|norm1|norm2|downsample|relative_position_bias_table|cls_token|"
                         r"pos_embed|blocks)\b")
    offenders = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py") if "adapters" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line.split("#")[0])]
    assert offenders == []
    assert pattern.search("model.blocks[0].attn.qkv")  # the pattern does catch what it is for
