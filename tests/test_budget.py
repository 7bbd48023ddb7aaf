"""Pruning to a budget: every candidate and the chosen plan fit the budget (counted on the rebuilt model), the
chosen plan's joint divergence equals a direct masked computation, and it is the lowest of the candidates."""
import json

import pytest
import torch

import upvit
from helpers import assert_one_line_error, run_main, tiny_swin, tiny_vit, write_image_folder
from hf_helpers import tiny_gpt2, token_inputs
from plan_helpers import plan_masks, random_scores
from upvit.adapters import get_adapter
from upvit.bench import count_macs, count_params
from upvit.budget import Budget, choose, enumerate_shapes
from upvit.errors import UpvitError


def direct_kl(model, plan, x) -> float:
    """Sum over samples (and events) of KL(softmax(original) || softmax(original with the plan's masks)),
    written out with torch ops (masks from the test helpers, not from upvit.budget)."""
    adapter = get_adapter(model)
    with torch.no_grad():
        p = torch.log_softmax(adapter.events(x).double(), -1)
        q = torch.log_softmax(adapter.events(x, plan_masks(model, plan)).double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    w = adapter.event_weights(x)
    return float((kl * w).sum() if w is not None else kl.sum())


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_vit_budget_choice_fits_and_is_the_lowest_joint_kl(kind):
    model, x = tiny_vit(), torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    cands = choose(model, random_scores(model), x, Budget(kind, 0.5), grid=4)
    measure = count_macs if kind == "macs" else count_params
    assert len(cands) > 2
    for c in cands:
        pruned = upvit.prune(model, c.plan)
        assert measure(pruned) / measure(model) == pytest.approx(c.use) and c.use <= 0.5
    best = cands[0]
    assert best.divergence == pytest.approx(direct_kl(model, best.plan, x), rel=1e-9)
    assert best.divergence == min(c.divergence for c in cands) > 0


def test_enumerated_shapes_obey_the_rules_and_include_the_paper_halving():
    topo = get_adapter(tiny_vit()).topology()  # 24 wide, 4 heads, FFN 48
    shapes = enumerate_shapes(topo, grid=4)
    for heads, residual, attn, targets in shapes:
        assert residual == attn and residual[0] % heads[0] == 0  # timm ViT: attention width = residual width
        targets(4).check(topo)
    assert ([2], [12], [12]) in [(h, r, a) for h, r, a, _ in shapes]


def test_swin_budget_keeps_the_stage_ratios_and_fits():
    model = tiny_swin()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cands = choose(model, random_scores(model), x, Budget("macs", 0.4), grid=4)
    best = cands[0]
    widths = [s.residual for s in best.targets.stages]
    assert widths[1] == 2 * widths[0] and widths[2] == 4 * widths[0]  # timm Swin's 1:2:4 stage widths
    pruned = upvit.prune(model, best.plan)
    assert count_macs(pruned) / count_macs(model) <= 0.4
    assert best.divergence == pytest.approx(direct_kl(model, best.plan, x), rel=1e-9)


def test_text_model_budget_weights_padding_out():
    model, x = tiny_gpt2(), token_inputs(3, 10)
    cands = choose(model, random_scores(model), x, Budget("params", 0.5), grid=4)
    assert cands[0].divergence == pytest.approx(direct_kl(model, cands[0].plan, x), rel=1e-9)
    assert count_params(upvit.prune(model, cands[0].plan)) <= 0.5 * count_params(model)


def test_budget_parse_refuses_bad_values_in_one_line():
    assert Budget.parse("MACS=0.25") == Budget("macs", 0.25)
    for bad in ("flops=0.5", "macs", "macs=0", "macs=1.5", "params=x"):
        with pytest.raises(UpvitError) as e:
            Budget.parse(bad)
        assert "\n" not in str(e.value)


def test_cli_prune_to_a_budget_prints_candidates_and_records_the_choice(tmp_path):
    model = tiny_vit(num_classes=2)
    upvit.save(model, str(tmp_path / "model"))
    random_scores(model).save(str(tmp_path / "s.safetensors"))
    write_image_folder(tmp_path / "data", per_class=3, size=16)
    r = run_main("prune", tmp_path / "model", "--scores", tmp_path / "s.safetensors", "--budget", "macs=0.5",
                 "--budget-grid", "4", "--data", tmp_path / "data", "--proxy-size", "6", "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert "candidate shapes within macs=0.5" in r.stdout and "(chosen)" in r.stdout and "joint kl" in r.stdout
    plan = json.load(open(tmp_path / "p" / "plan.json"))
    budget = plan["meta"]["budget"]
    assert budget["use"] <= 0.5 and budget["joint_divergence"] == min(c["joint_divergence"]
                                                                      for c in budget["candidates"])
    report = json.load(open(tmp_path / "p" / "report.json"))
    assert report["ratios"]["macs"] == pytest.approx(budget["use"])
    assert_one_line_error(run_main("prune", tmp_path / "model", "--scores", tmp_path / "s.safetensors", "--budget",
                                  "macs=0.5", "--out", tmp_path / "q"), "add --data")
    assert_one_line_error(run_main("prune", tmp_path / "model", "--scores", tmp_path / "s.safetensors", "--budget",
                                  "flops=0.5", "--data", tmp_path / "data", "--out", tmp_path / "q"), "KIND=FRACTION")


def test_latency_budget_times_each_shape_in_the_chosen_runtime(monkeypatch):
    # a fake clock: a shape's batch time is proportional to its MACs, so latency=0.5 must choose what macs=0.5 does
    import upvit.bench as bench

    calls = []

    def fake_throughput(model, batch_size=64, runs=10, warmup=3, runtime="torch", **kw):
        calls.append((batch_size, runtime))
        return {"median_batch_seconds": count_macs(model) * 1e-9}

    monkeypatch.setattr(bench, "throughput", fake_throughput)
    model, x = tiny_vit(), torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    scores = random_scores(model)
    by_latency = choose(model, scores, x, Budget("latency", 0.5), grid=4, latency_batch=8, runtime="onnxruntime")
    by_macs = choose(model, scores, x, Budget("macs", 0.5), grid=4)
    assert [c.shape() for c in by_latency] == [c.shape() for c in by_macs]
    assert set(calls) == {(8, "onnxruntime")}
