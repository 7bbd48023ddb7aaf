"""The adapter contract, once for every family (tests/contract/families.py): the staged forward equals the
model's own, exact KL equals a naive slice-and-rerun reference, the masked original equals the pruned model,
keep-everything is the identity, and the rules refuse what the family's constructor cannot express."""
from __future__ import annotations

import pytest
import torch
from families import FAMILIES, Family

import upvit
from plan_helpers import plan_masks, random_scores
from upvit.adapters import get_adapter
from upvit.errors import UpvitError
from upvit.evaluation import model_output
from upvit.plan import Plan

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)

by_family = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)


def own_output(model, x) -> torch.Tensor:
    """The model's own forward (timm's or transformers' code path): logits or the sentence embedding."""
    with torch.no_grad():
        return model_output(model, x)


def set_fused(model, fused: bool) -> bool:
    """Switch timm's fused attention kernel; False where the model has none."""
    found = False
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn, found = fused, True
    return found


@by_family
def test_staged_forward_equals_the_models_own(family: Family):
    model, x = family.build(), family.inputs()
    adapter = get_adapter(model)
    topo = adapter.topology()
    assert type(adapter) is family.adapter and adapter.divergence == family.divergence
    assert topo.shape() == family.shape
    with torch.no_grad():
        stream = adapter.begin(x)
        for unit in topo.units:  # every unit on every token (no head-token shortcut)
            stream = adapter.run(unit.key, stream)
        staged = adapter.output(adapter.end(stream))
        ref = own_output(model, x)
        for out in (staged, adapter.forward(x)):
            if family.staged_atol == 0:
                assert torch.equal(out, ref)
            else:
                torch.testing.assert_close(out, ref, rtol=0, atol=family.staged_atol)


@by_family
def test_exact_kl_equals_the_naive_reference(family: Family):
    """Every residual and attention channel and every k-th FFN channel: relative error < 1e-4 where the
    score matters (>= 1% of the largest), absolute < 1e-6 x the largest elsewhere."""
    n, batch, cand, ffn_step, at_least = family.kl
    model, x = family.build(seed=1), family.inputs(n)
    scores = upvit.score(model, x, method="kl", batch_size=batch, candidate_batch=cand, progress=False)
    sizes = {s.key: s.size for s in get_adapter(model).topology().sites}
    assert {k for k, _ in scores.items()} == set(sizes)
    for key, t in scores.items():
        assert t.shape == (sizes[key],) and t.dtype == torch.float64 and torch.isfinite(t).all(), key
    top = max(float(t.abs().max()) for _, t in scores.items())
    assert top > 1e-3, "the tiny model should react to removals"
    checked = 0
    for key, t in scores.items():
        for c in range(0, t.numel(), ffn_step if key.startswith("ffn") else 1):
            ref = family.naive(model, x, key, c)
            assert abs(float(t[c]) - ref) / max(abs(ref), 1e-2 * top) < 1e-4, (key, c, float(t[c]), ref)
            checked += 1
    assert checked >= at_least


@by_family
def test_masked_original_equals_the_pruned_model(family: Family):
    """For each of the family's named random plans (shrinking what the name says; "all": everything at once), the
    pruned model (fused and unfused attention where timm has both) equals the original with the plan's keep-masks."""
    model, x = family.build(seed=3), family.inputs()
    for case, targets in family.prune_cases.items():
        plan = upvit.make_plan(model, random_scores(model, seed=4), **targets)
        pruned = upvit.prune(model, plan)
        assert type(pruned) is type(model), case
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters()), case
        with torch.no_grad():
            ref = get_adapter(model).forward(x, plan_masks(model, plan))
        if family.kept_output is not None:
            ref = family.kept_output(ref, plan)
        for fused in (False, True):
            if not set_fused(pruned, fused) and fused:
                break
            out = own_output(pruned, x)
            assert out.abs().max() > 0.1, case  # not two near-zero tensors
            torch.testing.assert_close(out, ref, rtol=0, atol=family.masked_atol, msg=lambda m: f"{case}: {m}")


@by_family
def test_keep_everything_is_the_identity(family: Family):
    model, x = family.build(), family.inputs()
    pruned = upvit.prune(model, upvit.make_plan(model, random_scores(model)))
    assert pruned is not model and type(pruned) is type(model)
    assert torch.equal(own_output(pruned, x), own_output(model, x))
    a, b = model.state_dict(), pruned.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@by_family
def test_targets_the_family_cannot_express_are_one_line(family: Family):
    model = family.build()
    assert family.bad_targets
    for targets, message in family.bad_targets:
        with pytest.raises(UpvitError, match=message) as info:
            upvit.make_plan(model, random_scores(model), **targets)
        assert "\n" not in str(info.value)


@by_family
def test_plans_the_family_cannot_express_are_refused_before_surgery(family: Family):
    """Rules.check on a plan: FFN widths that differ inside a stage, and (where the family ties them) an
    attention width other than the residual width, are one line from upvit.prune."""
    model = family.build()
    topo = get_adapter(model).topology()
    plan = upvit.make_plan(model, random_scores(model))
    refusals = []
    ffns = [s for s in topo.sites if s.kind == "ffn"]
    shared = [s for s in ffns if sum(t.stage == s.stage for t in ffns) > 1]  # a stage with several blocks
    if shared:
        keep = {**plan.keep, shared[0].key: plan.keep[shared[0].key][:-1]}  # one channel fewer than its neighbours
        refusals.append((Plan(keep=keep, heads=plan.heads, source=plan.source), "every block"))
    if topo.rules.attn_tied_to_residual:
        half = upvit.make_plan(model, random_scores(model), **_halved_residual(topo))
        attn = next(s.key for s in topo.sites if s.kind == "attn")
        keep = {**half.keep, attn: plan.keep[attn]}  # every attention dim, half the residual channels
        refusals.append((Plan(keep=keep, heads=half.heads, source=half.source), "attention"))
    assert refusals
    for bad, message in refusals:
        with pytest.raises(UpvitError, match=message) as info:
            upvit.prune(model, bad)
        assert "\n" not in str(info.value)


def _halved_residual(topo) -> dict:
    widths = [s.size // 2 for s in topo.sites if s.kind == "residual"]
    heads = [s.heads for s in topo.sites if s.kind == "attn"]
    by_stage = [heads[sum(topo.shape()["depths"][:i])] for i in range(len(widths))]
    if len(widths) == 1:
        return dict(embed_dim=widths[0], num_heads=by_stage[0])
    return dict(embed_dim=widths, num_heads=by_stage)
