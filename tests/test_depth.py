"""Depth pruning: candidates from the topology, block/hybrid KL against a naive skip-and-rerun reference,
Block Influence by hand, the rebuilt shallower model against the original with the units skipped (ViT and
Swin), width + depth in either order, the progressive driver and its resume after a kill at any point."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import upvit
import upvit.distill
from helpers import tiny_images, tiny_swin, tiny_vit
from importance.naive_vit import naive_skip_score  # noqa: E402  (tests/ is on sys.path)
from naive_swin import naive_swin_skip_score
from plan_helpers import plan_masks, random_scores
from upvit.adapters import get_adapter
from upvit.data import ImageTensorDataset
from upvit.depth import Candidate, candidates, removal_plan, remove_units, score_candidates, select
from upvit.errors import UpvitError
from upvit.io import load_tensors
from upvit.models import create_timm_model
from upvit.plan import Plan
from upvit.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)


VIT_KINDS = {"vit": {}, "deit_distilled": {"distilled": True}, "layer_scale": {"init_values": 0.5}}


def swin_images(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


# ------------------------------------------------------------------------------------------ candidates
def test_a_vit_has_every_block_and_hybrid_as_candidate():
    cands = candidates(tiny_vit(depth=4))
    assert [c.key for c in cands] == ["attn.0+ffn.0", "ffn.0+attn.1", "attn.1+ffn.1", "ffn.1+attn.2",
                                      "attn.2+ffn.2", "ffn.2+attn.3", "attn.3+ffn.3"]  # 2 * depth - 1
    assert [c.kind for c in cands] == ["block", "hybrid"] * 3 + ["block"]
    assert [c.key for c in candidates(tiny_vit(depth=4), kinds=("block",))] == [
        "attn.0+ffn.0", "attn.1+ffn.1", "attn.2+ffn.2", "attn.3+ffn.3"]
    assert len(candidates(tiny_vit(depth=4), candidate_blocks=2)) == 5  # runs of 4 units


def test_swin_candidates_keep_every_remaining_block_at_its_shift():
    # stages of 4, 2, 2 blocks on 16x16, 8x8, 4x4 maps with window 4: stages 0 and 1 shift every odd
    # block, stage 2 (map = window) shifts none
    model = tiny_swin(depths=[4, 2, 2])
    shifts = [b.shift_size for layer in model.layers for b in layer.blocks]
    assert shifts == [(0, 0), (2, 2), (0, 0), (2, 2), (0, 0), (2, 2), (0, 0), (0, 0)]
    # alone: the last block of a shifted stage, a hybrid ending at it, anything in the unshifted stage
    assert [c.key for c in candidates(model)] == ["ffn.2+attn.3", "attn.3+ffn.3", "ffn.4+attn.5", "attn.5+ffn.5",
                                                  "attn.6+ffn.6", "ffn.6+attn.7", "attn.7+ffn.7"]
    # in pairs, anywhere inside stage 0; never straddling a stage transition
    assert [c.key for c in candidates(model, candidate_blocks=2)] == [
        "attn.0+ffn.0+attn.1+ffn.1", "ffn.0+attn.1+ffn.1+attn.2", "attn.1+ffn.1+attn.2+ffn.2",
        "ffn.1+attn.2+ffn.2+attn.3", "attn.2+ffn.2+attn.3+ffn.3"]
    with pytest.raises(UpvitError, match=r"attn.2 \(block 2 of stage 0, shift \(0, 0\)\) would become block 1"):
        remove_units(model, ["attn.1", "ffn.1"])


def test_kept_units_must_pair_into_blocks():
    topo = get_adapter(tiny_vit(depth=3)).topology()
    pairs = topo.rebuilt_blocks(["attn.0", "ffn.1", "attn.2", "ffn.2"])  # hybrid ffn.0 + attn.1 removed
    assert [(p.attn, p.ffn) for p in pairs] == [("attn.0", "ffn.1"), ("attn.2", "ffn.2")]
    with pytest.raises(UpvitError, match=r"do not pair into blocks \(attn.1 follows attn.0\)"):
        topo.rebuilt_blocks(["attn.0", "attn.1", "ffn.1", "attn.2", "ffn.2"])
    with pytest.raises(UpvitError, match=r"do not pair into blocks \(attn.2 comes last\)"):
        topo.rebuilt_blocks(["attn.0", "ffn.0", "attn.1", "ffn.1", "attn.2"])
    with pytest.raises(UpvitError, match="every block would be removed"):
        topo.rebuilt_blocks([])
    with pytest.raises(UpvitError, match="forward order"):
        topo.rebuilt_blocks(["attn.1", "ffn.1", "attn.0", "ffn.0"])
    swin = get_adapter(tiny_swin()).topology()
    with pytest.raises(UpvitError, match=r"of stage 0 do not pair into blocks \(attn.1 comes last\)"):
        swin.rebuilt_blocks([u.key for u in swin.units if u.key not in ("ffn.1", "attn.2")])  # straddles stages


# ------------------------------------------------------------------------------------------ scores
@pytest.mark.parametrize("kind", list(VIT_KINDS))
def test_block_and_hybrid_kl_equal_a_naive_skip_and_rerun_reference(kind):
    model, x = tiny_vit(depth=3, **VIT_KINDS[kind]), tiny_images(6)
    cands = candidates(model)
    assert len(cands) == 5 and {c.kind for c in cands} == {"block", "hybrid"}
    scores = score_candidates(model, x, cands, "kl", batch_size=4)  # two proxy batches
    assert scores.dtype == torch.float64
    refs = [naive_skip_score(model, x, c.units) for c in cands]
    assert max(refs) > 1e-2  # removals matter on this model
    for c, s, ref in zip(cands, scores.tolist(), refs):
        assert abs(s - ref) <= 1e-4 * abs(ref) + 1e-9, (c.key, s, ref)
    assert len(set(np.argsort(refs).tolist())) == 5 and np.argsort(scores.numpy()).tolist() == np.argsort(refs).tolist()


def test_swin_unit_kl_equals_a_naive_skip_and_rerun_reference():
    model, x = tiny_swin(depths=[4, 2, 2], seed=1), swin_images(3)
    cands = candidates(model) + candidates(model, candidate_blocks=2)
    scores = score_candidates(model, x, cands, "kl", batch_size=2)
    for c, s in zip(cands, scores.tolist()):
        ref = naive_swin_skip_score(model, x, c.units)
        assert abs(s - ref) <= 1e-4 * abs(ref) + 1e-9, (c.key, s, ref)


def test_block_influence_is_one_minus_the_cosine_of_input_and_output():
    model, x = tiny_vit(depth=3, seed=4), tiny_images(5)
    cands = candidates(model)
    bi = score_candidates(model, x, cands, "block_influence", batch_size=3)
    entering = {}  # hand computation from timm's own blocks: the stream entering and leaving each block
    handles = [blk.register_forward_pre_hook(lambda mod, inp, b=b: entering.__setitem__(b, inp[0]))
               for b, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(x)
        for h in handles:
            h.remove()
        blocks = model.blocks
        outs = {b: blocks[b](entering[b]) for b in range(3)}

        def one_minus_cos(a, b):
            return 1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()

        for c, value in zip(cands, bi.tolist()):
            i = int(c.units[0].split(".")[1])
            if c.kind == "block":
                ref = one_minus_cos(entering[i], outs[i])
            else:  # after attention i, before attention i+1 ... after it
                blk, nxt = blocks[i], blocks[i + 1]
                mid = entering[i] + blk.ls1(blk.attn(blk.norm1(entering[i])))
                after = outs[i] + nxt.ls1(nxt.attn(nxt.norm1(outs[i])))
                ref = one_minus_cos(mid, after)
            assert value == pytest.approx(ref, rel=1e-5, abs=1e-8), c.key
    last = score_candidates(model, x, cands, "last")
    assert last.tolist() == [4.0, 3.0, 2.0, 1.0, 0.0]  # units after the candidate


def test_select_takes_the_lowest_that_can_leave_together():
    model = tiny_vit(depth=4)
    cands = candidates(model)  # b0 h01 b1 h12 b2 h23 b3
    scores = torch.tensor([9.0, 1.0, 2.0, 3.0, 8.0, 7.0, 6.0], dtype=torch.float64)
    # h01 first; b1 and h12 overlap it (ffn.1 / attn.1 ... ) -> b1 shares attn.1, h12 is disjoint
    picked = select(model, cands, scores, 2)
    assert [c.key for c in picked] == ["ffn.0+attn.1", "ffn.1+attn.2"]
    assert [c.key for c in select(model, cands, scores, 1)] == ["ffn.0+attn.1"]
    with pytest.raises(UpvitError, match="can be removed together"):
        select(model, cands, scores, 4)  # 4 blocks-worth of a 4-block model: one block must stay


# ------------------------------------------------------------------------------------------ rebuild
def _strict_timm(model):
    cfg = model.upvit_config
    fresh = create_timm_model(cfg.timm_name, cfg.timm_kwargs)
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh.eval()


@pytest.mark.parametrize("kind", list(VIT_KINDS))
def test_rebuilt_vit_equals_the_original_with_the_units_skipped(kind, tmp_path):
    model, x = tiny_vit(depth=4, std=0.5, **VIT_KINDS[kind]), tiny_images(4)
    adapter = get_adapter(model)
    removals = [c.units for c in candidates(model)] + [("ffn.0", "attn.1", "attn.3", "ffn.3"),
                                                      ("ffn.0", "attn.1", "ffn.1", "attn.2")]
    for units in removals:
        small = remove_units(model, units)
        assert len(small.blocks) == 4 - len(units) // 2 and small.upvit_config.timm_kwargs["depth"] == len(small.blocks)
        with torch.no_grad():
            ref, full = adapter.forward(x, skip=frozenset(units)), model(x)
            out, strict = small(x), _strict_timm(small)(x)
        assert (ref - full).abs().max() > 1e-2, units  # skipping really changes the logits
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert torch.equal(strict, out)
    # a hybrid keeps block i's attention half and block i+1's FFN half, untouched
    small = remove_units(model, ["ffn.1", "attn.2"])
    for name in ("norm1.weight", "attn.qkv.weight", "attn.proj.bias"):
        assert torch.equal(small.blocks[1].get_submodule(name.rsplit(".", 1)[0]).get_parameter(name.rsplit(".", 1)[1]),
                           model.blocks[1].get_submodule(name.rsplit(".", 1)[0]).get_parameter(name.rsplit(".", 1)[1]))
    assert torch.equal(small.blocks[1].mlp.fc1.weight, model.blocks[2].mlp.fc1.weight)
    assert torch.equal(small.blocks[1].norm2.bias, model.blocks[2].norm2.bias)
    assert torch.equal(small.blocks[2].attn.qkv.weight, model.blocks[3].attn.qkv.weight)
    upvit.save(small, str(tmp_path / "s"))
    with torch.no_grad():
        assert torch.equal(upvit.load(str(tmp_path / "s"))(x), small(x))


@pytest.mark.parametrize("units", [("attn.1", "ffn.1", "attn.2", "ffn.2"), ("ffn.0", "attn.1", "ffn.1", "attn.2"),
                                   ("attn.3", "ffn.3"), ("ffn.2", "attn.3"), ("ffn.4", "attn.5"), ("attn.6", "ffn.6"),
                                   ("attn.2", "ffn.2", "attn.3", "ffn.3", "attn.7", "ffn.7")])
def test_rebuilt_swin_equals_the_original_with_the_units_skipped(units):
    model, x = tiny_swin(depths=[4, 2, 2], seed=2, std=0.4), swin_images()
    small = remove_units(model, units)
    depths = [len(layer.blocks) for layer in small.layers]
    assert small.upvit_config.timm_kwargs["depths"] == depths and sum(depths) == 8 - len(units) // 2
    # timm rebuilt the shifts by position: every stage keeps the source's leading pattern
    for s, d in enumerate(depths):
        assert [b.shift_size for b in small.layers[s].blocks] == [b.shift_size for b in model.layers[s].blocks[:d]]
    with torch.no_grad():
        ref, full = get_adapter(model).forward(x, skip=frozenset(units)), model(x)
        out = small(x)
        strict = _strict_timm(small)(x)
    assert (ref - full).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(strict, out)


# ------------------------------------------------------------------------------------------ plans: width and depth
def test_one_plan_prunes_width_and_removes_units():
    model, x = tiny_vit(depth=4, std=0.5), tiny_images()
    units = ("ffn.1", "attn.2")
    plan = upvit.make_plan(model, random_scores(model, seed=3), embed_dim=16, num_heads=4, mlp_hidden=30,
                           drop_units=units)
    assert plan.units == ["attn.0", "ffn.0", "attn.1", "ffn.2", "attn.3", "ffn.3"]
    assert "ffn.1" not in plan.keep and "attn.2" not in plan.keep
    assert plan.target_shape()["depths"] == [3] and plan.meta["targets"]["drop_units"] == list(units)
    again = Plan.from_json(plan.to_json())
    small = upvit.prune(model, again)
    assert (len(small.blocks), small.embed_dim, small.blocks[0].mlp.fc1.out_features) == (3, 16, 30)
    with torch.no_grad():
        ref = get_adapter(model).forward(x, plan_masks(model, plan), skip=frozenset(units))
        out = small(x)
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    _strict_timm(small)


def test_width_then_depth_and_depth_then_width_compose():
    model, x = tiny_vit(depth=4, std=0.5), tiny_images()
    # width first: the shallower model equals the original with the width masks and the units skipped
    wplan = upvit.make_plan(model, random_scores(model, seed=5), embed_dim=12, num_heads=4, mlp_hidden=20)
    both = remove_units(upvit.prune(model, wplan), ["attn.1", "ffn.1"])
    # depth first: the thinner model equals the shallower one with the width masks
    shallow = remove_units(model, ["attn.1", "ffn.1"])
    dplan = upvit.make_plan(shallow, random_scores(shallow, seed=5), embed_dim=12, num_heads=4, mlp_hidden=20)
    other = upvit.prune(shallow, dplan)
    with torch.no_grad():
        torch.testing.assert_close(both(x), get_adapter(model).forward(x, plan_masks(model, wplan),
                                                                        skip=frozenset({"attn.1", "ffn.1"})),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(other(x), get_adapter(shallow).forward(x, plan_masks(shallow, dplan)),
                                   rtol=0, atol=1e-5)
    for m in (both, other):
        assert (len(m.blocks), m.embed_dim) == (3, 12)
        _strict_timm(m)


def test_plans_removing_units_are_checked():
    model = tiny_vit(depth=3)
    full = removal_plan(model, ["attn.1", "ffn.1"]).to_dict()
    with pytest.raises(UpvitError, match=r"keeps channels of attn.1, a unit it removes"):
        Plan.from_dict({**full, "keep": {**full["keep"], "attn.1": list(range(24))},
                        "heads": {**full["heads"], "attn.1": [[0], [1], [2], [3]]}})
    with pytest.raises(UpvitError, match="do not pair into blocks"):
        Plan.from_dict({**full, "units": ["attn.0", "ffn.0", "ffn.1", "attn.2", "ffn.2"],
                        "keep": {**full["keep"], "ffn.1": list(range(48))}})
    with pytest.raises(UpvitError, match="has no unit 'attn.7'"):
        upvit.make_plan(model, random_scores(model), drop_units=["attn.7"])
    swin = tiny_swin(depths=[4, 2, 2])
    with pytest.raises(UpvitError, match="shifts the windows of every second block"):
        upvit.make_plan(swin, random_scores(swin), drop_units=["attn.1", "ffn.1"])


# ------------------------------------------------------------------------------------------ the driver
def _dataset(n: int = 32, augment: bool = True) -> ImageTensorDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8)
    return ImageTensorDataset(images, rng.integers(0, 5, size=n), [0.5] * 3, [0.5] * 3, augment=augment, seed=0)


CFG = dict(epochs=4, batch_size=8, lr=2e-3, weight_decay=1e-3, warmup_epochs=0.5, max_steps_per_epoch=2, amp="off")


def _run(out, callback=None, resume=False, **overrides):
    teacher = tiny_vit(depth=4, seed=1, std=0.3)
    options = dict(remove=2, steps=2, train_config=TrainConfig(**CFG), val_data=_dataset(16, augment=False),
                   bench_batch=4, bench_runs=1, device="cpu", callback=callback, resume=resume)
    options.update(overrides)
    return upvit.prune_depth(tiny_vit(depth=4, seed=1, std=0.3), teacher, _dataset(), tiny_images(6), out_dir=str(out),
                             **options)


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


DETERMINISTIC = ("step", "removed", "candidates", "depth", "depths", "origin_units", "top1_before_ft", "top1",
                 "val_loss", "params", "macs", "finetune")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run (one thread, as every test here: bit-identity needs the same thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("depth") / "straight"
        model = _run(out)
    finally:
        torch.set_num_threads(before)
    return out, model


def test_driver_removes_the_lowest_candidate_each_step_and_logs_it(straight):
    out, model = straight
    log = _log(out)
    assert [r["step"] for r in log] == [0, 1, 2] and [r["depth"] for r in log] == [4, 3, 2]
    for r in log[1:]:
        scores = [c["score"] for c in r["candidates"]]
        assert len(r["candidates"]) == 2 * (r["depth"] + 1) - 1  # every block and hybrid of the model it pruned
        assert len(r["removed"]) == 1 and r["removed"][0]["score"] == min(scores)
        assert r["params"] < log[r["step"] - 1]["params"] and r["macs"] < log[r["step"] - 1]["macs"]
        assert r["finetune"]["epoch"] == 2 and r["top1"] is not None
    assert len(model.blocks) == 2 and model.upvit_config.extra["depth"]["origin_units"] == log[-1]["origin_units"]
    # the step's scores were measured on the model that step pruned: recompute step 2's from step 1's model
    step1 = upvit.load(str(out / "step-1"))
    cands = [Candidate(tuple(c["units"]), c["kind"]) for c in log[2]["candidates"]]
    again = score_candidates(step1, tiny_images(6), cands, "kl")
    assert again.tolist() == [c["score"] for c in log[2]["candidates"]]
    _strict_timm(model)
    table = (out / "depth.md").read_text()
    assert table.count("\n| ") == 4 and ("block attn" in table or "hybrid ffn" in table)


@pytest.mark.parametrize("kill", ["scored-1", "finetuned-1", "step-1", "scored-2", "mid-finetune-2"])
def test_resume_after_a_kill_gives_the_same_final_model(straight, tmp_path, monkeypatch, kill):
    out = tmp_path / "killed"
    if kill == "mid-finetune-2":  # the 7th training batch: step 2, epoch 2 (2 epochs x 2 batches per step)
        calls = {"n": 0}
        real = upvit.distill.distillation_loss

        def crashing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 7:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(upvit.distill, "distillation_loss", crashing)
        with pytest.raises(KeyboardInterrupt):
            _run(out)
        monkeypatch.setattr(upvit.distill, "distillation_loss", real)
        assert os.path.isfile(out / "step-2" / "checkpoint.pt") and not os.path.isfile(out / "step-2" / "step.json")
    else:
        event, step = kill.rsplit("-", 1)

        def callback(name, k):
            if (name, k) == (event, int(step)):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            _run(out, callback=callback)
    with pytest.raises(UpvitError, match="already holds a depth-pruning run"):
        _run(out)
    model = _run(out, resume=True)
    a = load_tensors(str(straight[0] / "model.safetensors"))[0]
    b = load_tensors(str(out / "model.safetensors"))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = _log(straight[0]), _log(out)
    assert [{k: r.get(k) for k in DETERMINISTIC} for r in la] == [{k: r.get(k) for k in DETERMINISTIC} for r in lb]
    assert len(model.blocks) == 2


def test_baseline_criteria_and_one_shot(tmp_path):
    last = _run(tmp_path / "last", criterion="last", steps=1, train_config=None)
    assert last.upvit_config.extra["depth"]["removed"] == [[["attn.2", "ffn.2"], ["attn.3", "ffn.3"]]]
    log = _log(tmp_path / "last")
    assert {c["kind"] for c in log[1]["candidates"]} == {"block"} and len(log[1]["removed"]) == 2
    bi = _run(tmp_path / "bi", criterion="block_influence", steps=1, train_config=None, kinds=("block",))
    rows = _log(tmp_path / "bi")[1]
    lowest = sorted(rows["candidates"], key=lambda c: c["score"])[:2]
    assert sorted(r["units"] for r in rows["removed"]) == sorted(c["units"] for c in lowest)
    assert len(bi.blocks) == 2


@pytest.mark.parametrize("case,match", [
    ({"remove": 3, "steps": 2}, "does not split into 2 equal steps"),
    ({"train_config": TrainConfig(**{**CFG, "epochs": 3})}, "3 fine-tuning epochs do not split into 2"),
    ({"remove": 4, "steps": 1}, "remove fewer than 4"),
    ({"criterion": "magnitude"}, "unknown depth criterion"),
    ({"resume": True}, "holds no depth-pruning run"),
])
def test_driver_bad_input_one_line(tmp_path, case, match):
    with pytest.raises(UpvitError, match=match):
        _run(tmp_path / "bad", **case)


@pytest.mark.parametrize("case,match", [
    ({"remove": 0}, "remove must be a positive integer, got 0"),
    ({"steps": True}, "steps must be a positive integer, got True"),
    ({"remove": 2, "steps": 2, "candidate_blocks": 2}, "each step removes 1 blocks-worth, not a multiple"),
    ({"kinds": ("block", "triple")}, "candidate kinds must be among block, hybrid"),
    ({"kinds": ()}, "candidate kinds must be among"),
    ({"alpha": -0.5}, "alpha must be a finite number at least 0, got -0.5"),
    ({"alpha": float("nan")}, "alpha must be a finite number at least 0"),
    ({"temperature": 0.0}, "temperature must be a finite number above 0, got 0.0"),
    ({"bench_runs": 0}, "bench_runs must be a positive integer"),
    ({"criterion": "magnitude"}, "unknown depth criterion 'magnitude'"),
    ({"steps": 2, "train_config": TrainConfig(**{**CFG, "epochs": 3})}, "3 fine-tuning epochs do not split into 2"),
])
def test_depth_config_refuses_bad_settings_when_built(case, match):
    """Every setting is checked when the config is built, before any model is touched: one line each."""
    from upvit.depth import DepthConfig

    with pytest.raises(UpvitError, match=match) as info:
        DepthConfig(**{"remove": 2, **case})
    assert "\n" not in str(info.value)


def test_depth_config_derives_the_step_budget():
    from upvit.depth import DepthConfig

    cfg = DepthConfig(remove=4, steps=2, train_config=TrainConfig(**CFG))
    assert cfg.per_step == 2 and cfg.step_train_config.epochs == 2 and cfg.train_config.epochs == 4
    assert DepthConfig(remove=1, criterion="last").kinds == ("block",)  # the baseline drops whole blocks only
    assert DepthConfig(remove=1, kinds=["hybrid"]).kinds == ("hybrid",)
    assert DepthConfig(remove=1).step_train_config is None


def test_resume_refuses_other_settings(tmp_path):
    def stop(name, k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "r", callback=stop)
    with pytest.raises(UpvitError, match="another criterion"):
        _run(tmp_path / "r", resume=True, criterion="block_influence")


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory):
    """A tiny 3-block ViT for 1x28x28 animal-mnist, saved as a model directory."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_vit(seed=1, std=0.1, img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=3, mlp_ratio=2.0)
    upvit.save(model, str(root / "m"))
    return root / "m"


def _depth_args(model, out, *extra):
    return ["depth", str(model), "--data", "animal-mnist:train", "--val-data", "animal-mnist:val", "--remove", "2",
            "--steps", "2", "--epochs", "2", "--batch-size", "16", "--max-steps-per-epoch", "2", "--proxy-size", "8",
            "--bench-batch", "4", "--bench-runs", "1", "--device", "cpu", "--out", str(out), *extra]


def test_depth_cli_end_to_end_and_resume(mnist_model, tmp_path, capsys):
    from upvit.cli import main

    out = tmp_path / "d"
    assert main(_depth_args(mnist_model, out)) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 1 blocks" in printed and "| 2 |" in printed
    final = upvit.load(str(out))
    assert len(final.blocks) == 1 and final.upvit_config.extra["depth"]["steps"] == 2
    log = _log(out)
    assert [r["depth"] for r in log] == [3, 2, 1] and all(0 <= r["top1"] <= 100 for r in log)
    with open(out / "run.json") as f:
        run = json.load(f)
    assert run["meta"]["proxy"]["num_images"] == 8 and run["settings"]["train_config"]["epochs"] == 2
    # a finished run resumes to the same model and log without redoing anything
    assert main(_depth_args(mnist_model, out, "--resume")) == 0
    capsys.readouterr()
    again = load_tensors(str(out / "model.safetensors"))[0]
    assert all(torch.equal(v, final.state_dict()[k]) for k, v in again.items())
    assert _log(out) == log


@pytest.mark.parametrize("change,match", [
    (("--steps", "3"), "does not split into 3 equal steps"),
    (("--epochs", "3"), "3 fine-tuning epochs do not split into 2"),
    (("--remove", "4"), "remove fewer than 3"),
    (("--resume",), "holds no depth-pruning run"),
])
def test_depth_cli_bad_input_one_line(mnist_model, tmp_path, capsys, change, match):
    from upvit.cli import main

    args = _depth_args(mnist_model, tmp_path / "bad")
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args.append(change[0])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("upvit: error:") and match in err, err


def test_depth_cli_checks_the_settings_before_reading_anything(tmp_path, capsys):
    """A --remove that does not split into --steps is refused before the model or the data is read, and
    nothing is written (the model and data named here do not exist)."""
    from upvit.cli import main

    args = _depth_args(tmp_path / "no-model", tmp_path / "out")
    args[args.index("--data") + 1] = str(tmp_path / "no-data")
    args[args.index("--steps") + 1] = "3"
    _one_line_error(main, args, capsys, "does not split into 3 equal steps")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def folder_world(tmp_path_factory):
    """A tiny 2-class RGB ImageFolder with one damaged file, and a 2-block model for it."""
    from helpers import write_image_folder

    root = tmp_path_factory.mktemp("depth-folder")
    write_image_folder(str(root / "data"), per_class=3, size=16)
    with open(root / "data" / "a" / "999.png", "wb") as f:
        f.write(b"not a png")
    upvit.save(tiny_vit(num_classes=2, embed_dim=16, num_heads=2, depth=2), str(root / "m"))
    return root


def _folder_args(root, out, *extra):
    return ["depth", str(root / "m"), "--data", str(root / "data"), "--remove", "1", "--epochs", "0",
            "--proxy-size", "4", "--bench-batch", "2", "--bench-runs", "1", "--device", "cpu", "--out", str(out),
            *extra]


def _one_line_error(main, args, capsys, match):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("upvit") and "error:" in err and match in err, err


def test_depth_cli_honours_numbers_overwrite_protection_and_image_options(folder_world, tmp_path, capsys):
    """`upvit depth` validated no number, wrote into any --out and ignored --force, --check-images,
    --skip-bad-images and --class-map; now it does what train and finetune do with each."""
    from upvit.cli import main

    root = folder_world
    for flag, value in (("--remove", "0"), ("--epochs", "-1"), ("--proxy-size", "0"), ("--alpha", "-1"),
                        ("--bench-runs", "0"), ("--lr", "nan")):
        # the last of a repeated option wins: the bad value replaces the valid one
        _one_line_error(main, _folder_args(root, tmp_path / "n", "--skip-bad-images", f"{flag}={value}"), capsys, flag)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    _one_line_error(main, _folder_args(root, taken, "--skip-bad-images"), capsys, "is not empty")
    assert os.listdir(taken) == ["keep.txt"]
    _one_line_error(main, _folder_args(root, tmp_path / "c", "--check-images"), capsys, "unreadable image file")
    _one_line_error(main, _folder_args(root, tmp_path / "m", "--skip-bad-images", "--class-map", "nowhere.json"),
                    capsys, "nowhere.json")
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()
    out = tmp_path / "d"
    assert main(_folder_args(root, out, "--check-images", "--skip-bad-images")) == 0
    capsys.readouterr()
    assert len(upvit.load(str(out)).blocks) == 1
    _one_line_error(main, _folder_args(root, out, "--skip-bad-images"), capsys, "--force")  # a finished run is kept
    assert main(_folder_args(root, out, "--skip-bad-images", "--force", "--remove", "1")) == 0  # --force starts over
    capsys.readouterr()
    assert len(upvit.load(str(out)).blocks) == 1 and len(_log(out)) == 2


# ------------------------------------------------------------------------------------------ PVTv2 (sr convs, dwconv)
@pytest.mark.parametrize("units", [("attn.0", "ffn.0"), ("ffn.0", "attn.1"), ("attn.3", "ffn.3"),
                                   ("ffn.2", "attn.3", "attn.4", "ffn.4")])
def test_rebuilt_pvt_equals_the_original_with_the_units_skipped(units):
    from pvt_helpers import PVT_IMG, tiny_pvt

    model = tiny_pvt(seed=3, std=0.3)
    x = torch.randn(3, 3, PVT_IMG, PVT_IMG, generator=torch.Generator().manual_seed(0))
    small = remove_units(model, units)
    depths = [len(stage.blocks) for stage in small.stages]
    assert small.upvit_config.timm_kwargs["depths"] == depths and sum(depths) == 6 - len(units) // 2
    with torch.no_grad():
        ref, full = get_adapter(model).forward(x, skip=frozenset(units)), model(x)
        out, strict = small(x), _strict_timm(small)(x)
    assert (ref - full).abs().max() > 1e-3  # skipping really changes the logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(strict, out)


def test_pvt_unit_kl_equals_a_naive_skip_and_rerun_reference():
    from pvt_helpers import PVT_IMG, tiny_pvt

    model = tiny_pvt(seed=4, std=0.3)
    x = torch.randn(3, 3, PVT_IMG, PVT_IMG, generator=torch.Generator().manual_seed(1))
    cands = candidates(model)
    got = score_candidates(model, x, cands, "kl", batch_size=2).tolist()  # two proxy batches
    assert len(cands) == 2 * 6 - 3 and max(got) > 1e-3  # blocks + hybrids inside each of the 3 stages
    with torch.no_grad():
        p = torch.log_softmax(model(x).double(), -1)
        for c, value in zip(cands, got):  # naive: rebuild the shallower model and compare its logits
            q = torch.log_softmax(remove_units(model, c.units)(x).double(), -1)
            assert value == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-4, abs=1e-7), c.units


def test_families_without_depth_surgery_refuse_candidates_in_one_line():
    from hf_helpers import tiny_bert, tiny_gpt2

    for model in (tiny_gpt2(), tiny_bert()):
        with pytest.raises(UpvitError, match="cannot be rebuilt with fewer blocks yet"):
            candidates(model)
