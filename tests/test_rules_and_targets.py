"""One statement of a family's rules (Rules.check) and one door for targets (Targets.parse)."""
from __future__ import annotations

import pytest

import upvit
from helpers import tiny_swin, tiny_vit
from plan_helpers import random_scores
from upvit.adapters import get_adapter
from upvit.errors import UpvitError
from upvit.plan import Plan, make_plan
from upvit.targets import StageTarget, Targets, parse_target_text
from upvit.topology import Rules, StageShape


def _messages(fn):
    with pytest.raises(UpvitError) as info:
        fn()
    return str(info.value)


def test_rules_check_is_the_one_statement_for_targets_and_plans():
    """The same violation gives the same line whether it arrives as targets or as a plan."""
    model = tiny_vit()
    adapter = get_adapter(model)
    topo = adapter.topology()  # 24 wide, 4 heads, attention tied to the residual width
    plan = make_plan(model, random_scores(model), embed_dim=12, num_heads=2, mlp_hidden=24)
    untied = Plan(keep={**plan.keep, "res.0": plan.keep["res.0"][:8]}, heads=plan.heads, source=plan.source)
    from_plan = _messages(lambda: adapter.check_plan(untied))
    from_targets = _messages(lambda: Targets((StageTarget(8, 2, 12, 24),)).check(topo))
    direct = _messages(lambda: topo.rules.check([StageShape(8, (2, 2), (12, 12), (24, 24))]))
    assert from_plan == from_targets == direct
    assert "attn_dim (12) must equal embed_dim (8)" in direct


def test_rules_check_refuses_uneven_blocks_and_stage_widths():
    rules = Rules("demo", uniform_across_stages=frozenset({"heads"}), residual_ratios=(1, 2))
    rules.check([StageShape(4, (1, 1), (4, 4), (8, 8)), StageShape(8, (1,), (8,), (16,))])  # fine
    with pytest.raises(UpvitError, match=r"same FFN width in every block of a stage.*\[8, 6\]"):
        rules.check([StageShape(4, (1, 1), (4, 4), (8, 6)), StageShape(8, (1,), (8,), (16,))])
    with pytest.raises(UpvitError, match=r"same num_heads in every stage, got \[1, 2\]"):
        rules.check([StageShape(4, (1,), (4,), (8,)), StageShape(8, (2,), (8,), (16,))])
    with pytest.raises(UpvitError, match=r"ratio 1:2 .* use e.g. \[4, 8\]"):
        rules.check([StageShape(4, (1,), (4,), (8,)), StageShape(6, (1,), (6,), (16,))])


def test_surgery_checks_a_plan_against_the_rules_once(monkeypatch):
    model = tiny_swin()
    plan = make_plan(model, random_scores(model), ratio=0.5)
    calls = []
    original = Rules.check
    monkeypatch.setattr(Rules, "check", lambda self, stages: calls.append(1) or original(self, stages))
    upvit.prune(model, plan)
    assert len(calls) == 1


def test_every_spelling_of_targets_parses_to_the_same_targets():
    topo = get_adapter(tiny_swin()).topology()  # widths 8/16/32, heads 2/4/8, FFN 16/32/64
    want = Targets.from_values(topo, embed_dim=[4, 8, 16], num_heads=[1, 2, 4], mlp_hidden=[8, 16, 32])
    spellings = [want, {"embed_dim": [4, 8, 16], "num_heads": [1, 2, 4], "mlp_hidden": [8, 16, 32]},
                 "4/8/16,1/2/4,8/16/32"]
    assert all(Targets.parse(topo, s) == want for s in spellings)
    assert Targets.parse(topo, ratio=0.5) == want == Targets.from_ratio(topo, 0.5)
    assert Targets.parse_many(topo, spellings) == [want] * 3
    assert Targets.parse_many(topo, ratios=0.5) == [want]
    assert parse_target_text("96,6,384") == {"embed_dim": 96, "num_heads": 6, "mlp_hidden": 384}


@pytest.mark.parametrize("call, match", [
    (lambda t: Targets.parse(t, {"embed_dim": 4, "heads": 1}), "unknown target key"),
    (lambda t: Targets.parse(t, "4,1"), "must be a dict .* or the text 'EMBED,HEADS,MLP'"),
    (lambda t: Targets.parse(t, {"embed_dim": 4}, ratio=0.5), "either ratio or explicit"),
    (lambda t: Targets.parse(t, {"embed_dim": [4, 12, 16]}), "ratio 1:2:4"),  # checked on the way in
    (lambda t: Targets.parse_many(t), "needs exactly one of targets"),
    (lambda t: Targets.parse_many(t, ratios=[]), "non-empty"),
])
def test_targets_parse_refuses_in_one_line(call, match):
    topo = get_adapter(tiny_swin()).topology()
    with pytest.raises(UpvitError, match=match):
        call(topo)

