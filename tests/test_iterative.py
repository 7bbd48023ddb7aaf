"""Iterative pruning: the schedule's rules, k=1 = one-shot, every step a genuine model, the composed
plan, fine-tuning between steps, a multi-stage family."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import upvit
from helpers import tiny_images, tiny_swin, tiny_vit
from upvit.adapters import get_adapter
from upvit.iterative import compose_plans, prune_iteratively, schedule
from upvit.plan import vit_rules
from upvit.targets import Targets
from upvit.topology import Topology

SHAPE = dict(embed_dim=48, num_heads=4, mlp_ratio=4.0)  # 48 / 4 heads x 12 / FFN 192
TARGET = dict(embed_dim=12, num_heads=1, mlp_hidden=48)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)



def _demo_topology():
    return Topology.single_stage("vit", 192, [12] * 6, [192] * 6, [768] * 6, vit_rules())


def _widths(t: Targets):
    st = t.stages[0]
    return st.residual, st.heads, st.attn, st.ffn


def test_schedule_passes_through_the_s_shape_on_the_way_to_t():
    topo = _demo_topology()
    t = Targets.from_values(topo, 48, 3, 192)
    assert [_widths(s) for s in schedule(topo, t, 2)] == [(96, 6, 96, 384), (48, 3, 48, 192)]
    assert schedule(topo, t, 1) == [t]


@pytest.mark.parametrize("target", [(96, 6, 384), (48, 3, 192), (24, 1, 100), (60, 12, 700)])
@pytest.mark.parametrize("steps", [2, 3, 4, 6])
def test_schedule_rules_hold_at_every_step(target, steps):
    topo = _demo_topology()
    t = Targets.from_values(topo, *target)
    shapes = schedule(topo, t, steps)
    assert len(shapes) == steps and shapes[-1] == t
    prev = (192, 12, 192, 768)
    for i, s in enumerate(shapes, start=1):
        res, heads, attn, ffn = _widths(s)
        assert prev[1] % heads == 0 and heads % t.stages[0].heads == 0  # merge only, towards the target
        assert attn == res and attn % heads == 0  # timm ViT: attention width tied to embed_dim
        assert all(a <= b for a, b in zip((res, heads, attn, ffn), prev)), (i, s)  # never grows
        # a valid target for the model of the previous step
        Targets(s.stages).check(Topology.single_stage("vit", prev[0], [prev[1]] * 6, [prev[2]] * 6, [prev[3]] * 6,
                                                      vit_rules()))
        if i < steps:  # close to the geometric interpolation (within one rounding step)
            geo = 192 * (target[0] / 192) ** (i / steps)
            assert abs(res - geo) <= heads, (i, res, geo)
            geo_ffn = 768 * (target[2] / 768) ** (i / steps)
            assert abs(ffn - geo_ffn) <= 0.5 + 1e-9
        prev = (res, heads, attn, ffn)


def test_schedule_refuses_bad_steps():
    topo = _demo_topology()
    t = Targets.from_values(topo, 48, 3, 192)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(upvit.UpvitError, match="steps must be a positive integer"):
            schedule(topo, t, bad)


@pytest.fixture(scope="module")
def setup():
    return tiny_vit(std=0.25, **SHAPE), tiny_images(8)


def _same_model(a, b, images):
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(images), b.eval()(images), rtol=1e-5, atol=1e-5)


def test_one_step_is_one_shot_pruning(setup):
    model, images = setup
    one_shot = upvit.prune(model, upvit.make_plan(model, upvit.score(model, images, method="kl"), **TARGET))
    result = prune_iteratively(model, images, TARGET, steps=1, method="kl")
    assert result.plan.keep == one_shot.upvit_config.extra["plan"]["keep"]
    a, b = result.model.state_dict(), one_shot.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_step_is_a_genuine_model_and_the_composed_plan_reproduces_the_result(setup, tmp_path):
    model, images = setup
    seen = []

    def callback(step, m, record):
        upvit.save(m, str(tmp_path / f"step{step}"))
        reloaded = upvit.load(str(tmp_path / f"step{step}"))  # strict load through the family's constructor
        _same_model(m, reloaded, images)
        shape = get_adapter(m).topology().shape()
        seen.append((shape["residual"][0], shape["heads"][0], shape["attn"][0], shape["ffn"][0]))
        assert seen[-1] == _widths(record.targets)

    result = prune_iteratively(model, images, TARGET, steps=3, method="kl", callback=callback)
    assert len(seen) == 3 and seen[-1] == (12, 1, 12, 48)
    prev = (48, 4, 48, 192)
    for s in seen:
        assert all(a <= b for a, b in zip(s, prev)) and prev[1] % s[1] == 0
        prev = s
    # no fine-tuning in between: the steps compose into one plan of the original model
    _same_model(result.model, upvit.prune(model, result.plan), images)
    assert result.model.upvit_config.extra["plan"]["keep"] == result.plan.keep
    assert len(result.model.upvit_config.extra["iterative"]["steps"]) == 3
    # a re-scored step is not the one-shot choice in general (the test would prove nothing otherwise)
    one_shot = upvit.make_plan(model, upvit.score(model, images, method="kl"), **TARGET)
    assert one_shot.keep != result.plan.keep


def test_compose_plans_by_hand():
    topo = Topology.single_stage("vit", 8, [4], [8], [6], vit_rules())
    # 4 heads of 2 dims -> 2 heads of 2 dims (heads 0+1, 2+3) -> 1 head of 1 dim
    first = upvit.Plan(keep={"res.0": [0, 2, 3, 5], "attn.0": [1, 2, 4, 7], "ffn.0": [1, 2, 4, 5]},
                       heads={"attn.0": [[0, 1], [2, 3]]}, source=topo.to_dict())
    second = upvit.Plan(keep={"res.0": [1, 3], "attn.0": [3], "ffn.0": [0, 3]}, heads={"attn.0": [[0, 1]]})
    c = compose_plans(first, second)
    assert c.keep == {"res.0": [2, 5], "attn.0": [7], "ffn.0": [1, 5]}
    assert c.heads == {"attn.0": [[0, 1, 2, 3]]} and c.source == first.source


def test_finetune_between_steps_feeds_the_next_step(setup):
    model, images = setup
    calls = []

    def finetune(m, step):
        calls.append((step, get_adapter(m).topology().shape()["residual"][0]))
        changed = copy.deepcopy(m)
        with torch.no_grad():
            for blk in changed.blocks:
                blk.mlp.fc1.bias.add_(0.5)
        return changed

    shapes = schedule(get_adapter(model).topology(), Targets.from_values(get_adapter(model).topology(), 12, 1, 48), 2)
    result = prune_iteratively(model, images, TARGET, steps=2, method="kl", finetune=finetune)
    assert calls == [(1, shapes[0].stages[0].residual)]  # after step 1 only, on the step-1 model
    # the same procedure spelled out: prune, fine-tune, re-score the fine-tuned model, prune
    m1 = upvit.prune(model, upvit.make_plan(model, upvit.score(model, images), targets=shapes[0]))
    m1 = finetune(m1, 1)
    m2 = upvit.prune(m1, upvit.make_plan(m1, upvit.score(m1, images), targets=shapes[1]))
    a, b = result.model.state_dict(), m2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert result.steps[0].finetune_seconds > 0 and result.steps[1].finetune_seconds == 0


def test_first_scores_and_hybrid_steps(setup):
    """Step 1 may reuse the intact model's scores (the same result as scoring it again); a hybrid
    step is told that step's target."""
    model, images = setup
    exact = upvit.score(model, images, method="kl")
    a = prune_iteratively(model, images, TARGET, steps=2, method="kl", first_scores=exact)
    c = prune_iteratively(model, images, TARGET, steps=2, method="kl")
    assert a.plan.keep == c.plan.keep and a.steps[0].scores_meta is not c.steps[0].scores_meta
    b = prune_iteratively(model, images, TARGET, steps=2, method="hybrid", first_scores=exact)
    assert b.steps[0].plan.keep == a.steps[0].plan.keep
    assert b.steps[1].scores_meta["method"] == "hybrid"
    assert b.steps[1].scores_meta["targets"] == [b.steps[1].targets.to_dict()]


def test_multi_stage_family(tmp_path):
    model, images = tiny_swin(std=0.2), tiny_images(4, img_size=32)
    seen = []

    def callback(step, m, record):
        upvit.save(m, str(tmp_path / f"s{step}"))
        _same_model(m, upvit.load(str(tmp_path / f"s{step}")), images)
        seen.append(get_adapter(m).topology().shape())

    result = prune_iteratively(model, images, ratio=0.5, steps=2, method="kl", callback=callback)
    assert seen[-1]["residual"] == [4, 8, 16] and seen[-1]["heads"] == [1, 1, 2, 2, 4, 4]
    widths = [s["residual"] for s in seen]
    assert all(b[i] <= a[i] for a, b in zip([[8, 16, 32]] + widths, widths) for i in range(3))
    assert all(w[1] == 2 * w[0] and w[2] == 4 * w[0] for w in widths)  # timm Swin keeps the stage ratios
    _same_model(result.model, upvit.prune(model, result.plan), images)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of targets"),
    (dict(targets=TARGET, ratio=0.5), "exactly one of targets"),
    (dict(targets=dict(embed_dim=12, num_heads=3)), "does not divide"),
    (dict(targets=TARGET, finetune=3), "finetune must be a callable"),
    (dict(targets=TARGET, steps=0), "steps must be a positive integer"),
])
def test_bad_input_is_one_clear_error(setup, kwargs, match):
    model, images = setup
    with pytest.raises(upvit.UpvitError, match=match):
        prune_iteratively(model, images, **kwargs)


def test_geometric_rounding_never_leaves_the_bounds():
    topo = _demo_topology()
    for res in range(12, 193, 12):
        t = Targets.from_values(topo, res, 12, 768 * res // 192)
        for s in schedule(topo, t, 3):
            assert res <= s.stages[0].residual <= 192 and not math.isnan(s.stages[0].ffn)
