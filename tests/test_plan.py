"""make_plan / Plan: top-k selection, head merging by hand, validation messages, JSON."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_vit
from plan_helpers import random_scores, vit_scores
from upvit.errors import UpvitError
from upvit.plan import PLAN_VERSION, Plan, make_plan


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_hand_computed_head_merging_4_to_2():
    # 4 heads x 2 dims (embed 8) -> 2 heads, attn_dim 4: merged head 0 = source heads 0-1 (dims 0-3),
    # merged head 1 = source heads 2-3 (dims 4-7); keep the 2 best dims of each, in original order.
    model = tiny_vit(embed_dim=8, num_heads=4, depth=2, mlp_ratio=1.0)
    scores = vit_scores(
        embed=t([0.5, 0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0]),
        attn=[t([0.1, 0.9, 0.5, 0.2, 0.3, 0.8, 0.7, 0.05]),
              t([0.9, 0.8, 0.1, 0.2, 0.0, 0.1, 0.2, 0.3])],
        ffn=[t([1, 2, 3, 4, 5, 6, 7, 8]), t([8, 7, 6, 5, 4, 3, 2, 1])])
    plan = make_plan(model, scores, embed_dim=4, num_heads=2, mlp_hidden=3)
    assert plan.num_heads == 2
    assert plan.keep_embed == [0, 2, 4, 6]
    assert plan.keep_attn == [[1, 2, 5, 6], [0, 1, 6, 7]]
    assert plan.keep_ffn == [[5, 6, 7], [0, 1, 2]]
    assert plan.head_dim() == 2 and plan.target_shape()["attn_dim"] == [4, 4]


def test_hand_computed_merge_all_heads_into_one():
    model = tiny_vit(embed_dim=8, num_heads=4, depth=1, mlp_ratio=1.0)
    s = t([0.1, 0.9, 0.5, 0.2, 0.3, 0.8, 0.7, 0.05])
    scores = vit_scores(embed=s, attn=[s], ffn=[s])
    plan = make_plan(model, scores, embed_dim=3, num_heads=1, mlp_hidden=2)
    assert plan.keep_attn == [[1, 5, 6]] and plan.keep_embed == [1, 5, 6] and plan.keep_ffn == [[1, 5]]


def test_ties_keep_lower_indices():
    model = tiny_vit(depth=1)
    scores = vit_scores(torch.zeros(24, dtype=torch.float64), [torch.zeros(24, dtype=torch.float64)],
                        [torch.zeros(48, dtype=torch.float64)])
    plan = make_plan(model, scores, embed_dim=8, num_heads=4, mlp_hidden=5)
    assert plan.keep_embed == list(range(8))
    assert plan.keep_attn == [[0, 1, 6, 7, 12, 13, 18, 19]]  # 2 of each 6-dim head
    assert plan.keep_ffn == [list(range(5))]


def test_defaults_keep_everything():
    model = tiny_vit()
    plan = make_plan(model, random_scores(model))
    assert plan.keep_embed == list(range(24)) and plan.num_heads == 4
    assert plan.keep_attn == [list(range(24))] * 2 and plan.keep_ffn == [list(range(48))] * 2


def test_topk_matches_sorting_reference():
    model = tiny_vit()
    scores = random_scores(model, seed=3)
    plan = make_plan(model, scores, embed_dim=12, num_heads=2, mlp_hidden=20)
    ref_embed = sorted(sorted(range(24), key=lambda i: -scores.embed[i].item())[:12])
    assert plan.keep_embed == ref_embed
    for b in range(2):
        assert plan.keep_ffn[b] == sorted(sorted(range(48), key=lambda i: -scores.ffn[b][i].item())[:20])
        for j in range(2):  # merged head j covers source dims [12j, 12j + 12)
            group = range(12 * j, 12 * j + 12)
            assert plan.keep_attn[b][6 * j:6 * j + 6] == sorted(sorted(group,
                                                                       key=lambda i: -scores.attn[b][i].item())[:6])


def test_ratio_shorthand():
    model = tiny_vit()
    plan = make_plan(model, random_scores(model), ratio=0.5)
    assert (plan.embed_dim, plan.num_heads, plan.ffn_dim(), plan.attn_dim()) == (12, 2, 24, 12)
    with pytest.raises(UpvitError, match="either ratio or explicit"):
        make_plan(model, random_scores(model), ratio=0.5, embed_dim=12)
    with pytest.raises(UpvitError, match=r"heads.*\(0.25, 0.5, 1\)"):
        make_plan(model, random_scores(model), ratio=0.75)
    with pytest.raises(UpvitError, match=r"ratio must be in \(0, 1\]"):
        make_plan(model, random_scores(model), ratio=1.5)


@pytest.mark.parametrize("targets, message", [
    (dict(num_heads=3), r"num_heads=3 does not divide the model's 4 heads.*choose one of 1, 2, 4"),
    (dict(num_heads=8), r"num_heads=8 is impossible: the model has 4, choose 1..4"),
    (dict(num_heads=0), r"num_heads=0 is impossible"),
    (dict(embed_dim=30), r"embed_dim=30 is impossible: the model has 24, choose 1..24"),
    (dict(embed_dim=0), r"embed_dim=0 is impossible"),
    (dict(mlp_hidden=49), r"mlp_hidden=49 is impossible: the model has 48"),
    (dict(embed_dim=10, num_heads=4),
     r"embed_dim=10 .* not divisible by num_heads=4: choose a multiple of 4 \(e.g. 8\)"),
    (dict(embed_dim=12, num_heads=2, attn_dim=9), r"attn_dim=9 is not divisible by num_heads=2"),
    (dict(embed_dim=12, num_heads=2, attn_dim=8),
     r"ties the attention width to embed_dim.*attn_dim \(8\) must equal embed_dim \(12\)"),
    (dict(embed_dim=12.5), r"embed_dim must be an integer"),
])
def test_invalid_targets_are_refused_clearly(targets, message):
    model = tiny_vit()
    with pytest.raises(UpvitError, match=message) as info:
        make_plan(model, random_scores(model), **targets)
    assert "\n" not in str(info.value)


def test_scores_for_another_model_are_refused():
    model = tiny_vit()
    other = random_scores(tiny_vit(embed_dim=12, num_heads=2))
    with pytest.raises(UpvitError, match="computed for another model"):
        make_plan(model, other)


def test_nan_scores_are_refused_naming_the_site():
    model = tiny_vit()
    scores = random_scores(model)
    scores.ffn[1][3] = float("nan")
    with pytest.raises(UpvitError, match=r"scores for ffn\.1 contain NaN"):
        make_plan(model, scores, ratio=0.5)


def test_json_round_trip_and_versioning():
    model = tiny_vit()
    plan = make_plan(model, random_scores(model), embed_dim=12, num_heads=2, mlp_hidden=20)
    text = plan.to_json()
    data = json.loads(text)
    assert data["format"] == "upvit-plan" and data["version"] == PLAN_VERSION
    assert data["keep"]["attn.1"] == plan.keep_attn[1] and data["source"]["sites"][0] == {
        "key": "res.0", "kind": "residual", "size": 24, "stage": 0}
    assert data["heads"]["attn.0"] == [[0, 1], [2, 3]]  # 4 source heads merged pairwise into 2
    again = Plan.from_json(text)
    assert again == plan
    with pytest.raises(UpvitError, match="newer than this upvit"):
        Plan.from_dict({**data, "version": PLAN_VERSION + 1})
    with pytest.raises(UpvitError, match="not an upvit plan"):
        Plan.from_dict({**data, "format": "something-else"})
    with pytest.raises(UpvitError, match="missing heads"):
        Plan.from_dict({k: v for k, v in data.items() if k != "heads"})
    with pytest.raises(UpvitError, match="not valid JSON"):
        Plan.from_json("{")


def test_hand_written_plan_needs_no_source():
    plan = Plan.from_json(json.dumps({"keep_embed": [0, 1], "keep_attn": [[3, 1]], "keep_ffn": [[0]], "num_heads": 2}))
    assert plan.source is None and plan.head_dim() == 1 and plan.target_shape()["ffn_dim"] == [1]


@pytest.mark.parametrize("fields, message", [
    (dict(keep_embed=[0, 0, 1]), r"keep_embed lists index 0 twice"),
    (dict(keep_embed=[0, -1]), r"keep_embed has index -1 out of range"),
    (dict(keep_embed=[]), r"keep_embed keeps no channel"),
    (dict(keep_attn=[[0, 1, 2]], keep_ffn=[[0]]), r"keep_attn\[0\] has 3 dims, not divisible by num_heads=2"),
    (dict(keep_attn=[[0, 1]], keep_ffn=[[0], [1]]), r"1 keep_attn blocks but 2 keep_ffn blocks"),
    (dict(num_heads=0), r"num_heads must be an integer >= 1"),
    (dict(keep_ffn=[[0, 1.5]]), r"keep_ffn\[0\] must be a list of integer"),
])
def test_invalid_plans_are_refused_clearly(fields, message):
    base = dict(keep_embed=[0, 1], keep_attn=[[0, 1]], keep_ffn=[[0]], num_heads=2)
    with pytest.raises(UpvitError, match=message):
        Plan.from_v1({**base, **fields})


def test_plan_out_of_range_for_its_source():
    source = {"embed_dim": 4, "depth": 1, "num_heads": [2], "attn_dim": [4], "ffn_dim": [8]}
    with pytest.raises(UpvitError, match=r"keep_ffn\[0\] has index 8 out of range: indices must be in 0..7"):
        Plan.from_v1(dict(keep_embed=[0, 1], keep_attn=[[0, 1]], keep_ffn=[[8]], num_heads=2, source=source))
    with pytest.raises(UpvitError, match="plan has 1 blocks but the model has 2"):
        Plan.from_v1(dict(keep_embed=[0, 1], keep_attn=[[0, 1]], keep_ffn=[[7]], num_heads=2,
                          source={**source, "depth": 2}))
