"""Exact KL with the candidates' forwards in reduced precision (``dtype``), and the candidate batch
chosen from a memory budget (``memory_gb``)."""
from __future__ import annotations

import pytest
import torch

from helpers import TINY, run_main, tiny_images, tiny_vit
from upvit.adapters import get_adapter
from upvit.errors import UpvitError
from upvit.importance.kl import bytes_per_candidate_input, candidate_batch_for_memory, compute_dtype, kl_scores

BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)


def test_bf16_scores_within_the_bound_bf16_precision_allows():
    """Two bounds, each derived, not tuned:

    * per image, |KL(q||softmax(z+e)) - KL(q||softmax(z))| <= 2 max_k |e_k| exactly (the change is
      -sum q e + logsumexp(z+e) - logsumexp(z), each term at most max|e|). The candidates' logit error e
      is taken as at most twice the bf16 error of the unmasked model, measured independently (plain
      autocast forward against float32), so |s_bf16 - s_fp32| <= 4 sum_i E_i per channel;
    * first order: a score is quadratic in the candidate's logit change, so a relative logit error of at
      most one unit roundoff per rounded matmul output ((4 depth + 2) u, u = 2^-8) changes a site's
      largest scores by at most twice that, relative.

    The first bound is below the widest site's spread of scores, so a bf16 path that ignored the masks or garbled
    the logits would fail it."""
    model, images = tiny_vit(), tiny_images(6)
    adapter = get_adapter(model)
    exact = kl_scores(adapter, images, progress=False)
    half = kl_scores(adapter, images, progress=False, dtype="bf16")
    assert half.meta["compute_dtype"] == "bfloat16" and exact.meta["compute_dtype"] == "float32"
    with torch.no_grad():
        z = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            zb = model(images).float()
    bound = float(4 * (zb - z).abs().amax(-1).sum())
    spread = max(float(v.max() - v.min()) for _, v in exact.items())
    assert 0 < bound < spread  # the check discriminates (on the widest-spread site; the relative one on all)
    relative = 2 * (4 * TINY["depth"] + 2) * BF16_UNIT_ROUNDOFF
    worst = 0.0
    for key, v in exact.items():
        err = float((v - half[key]).abs().max())
        assert err <= bound, key
        assert err <= relative * float(v.max()), key
        worst = max(worst, err)
    assert worst > 0  # bf16 did change the arithmetic


def test_reduced_precision_leaves_the_reference_in_full_precision(monkeypatch):
    """The teacher's logits (the KL's reference) come from a float32 forward outside autocast; the
    divergence receives float32 candidate logits and accumulates in float64."""
    model, images = tiny_vit(), tiny_images(4)
    adapter = get_adapter(model)
    seen_ref, seen_div = [], []
    ref_fn, div_fn = adapter.output_reference, adapter.output_divergence

    def spy_ref(logits):
        seen_ref.append((logits.dtype, torch.is_autocast_enabled("cpu")))
        return ref_fn(logits)

    def spy_div(reference, logits, weights):
        out = div_fn(reference, logits, weights)
        seen_div.append((reference[0].dtype, logits.dtype, out.dtype, torch.is_autocast_enabled("cpu")))
        return out

    monkeypatch.setattr(adapter, "output_reference", spy_ref)
    monkeypatch.setattr(adapter, "output_divergence", spy_div)
    kl_scores(adapter, images, progress=False, dtype="bf16")
    assert seen_ref and all(d == (torch.float32, False) for d in seen_ref)
    assert seen_div and all(r in (torch.float32, torch.float64) and lg == torch.float32 and o == torch.float64
                            and not ac for r, lg, o, ac in seen_div)


def test_fp32_option_is_the_default_engine_bit_for_bit():
    model, images = tiny_vit(), tiny_images(4)
    adapter = get_adapter(model)
    a = kl_scores(adapter, images, progress=False)
    b = kl_scores(adapter, images, progress=False, dtype="fp32")
    assert a.meta["fingerprint"] == b.meta["fingerprint"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_bad_dtypes_are_one_clear_error():
    with pytest.raises(UpvitError, match="fp16 needs a CUDA device"):
        compute_dtype("fp16", torch.device("cpu"))
    with pytest.raises(UpvitError, match="use fp32, bf16 or fp16"):
        compute_dtype("int8", torch.device("cpu"))
    with pytest.raises(UpvitError, match="memory_gb"):
        kl_scores(get_adapter(tiny_vit()), tiny_images(2), progress=False, memory_gb=0)


def test_memory_chooser_against_a_hand_computation():
    # DeiT-B at 224 px: 197 tokens, width 768, FFN 3072, 12 heads, float32.
    # per token 7*768 + 2*3072 = 11,520 values; 197 tokens -> 2,269,440; attention 12*197*197 = 465,708
    # -> 2,735,148 values = 10,940,592 bytes per candidate-image
    assert bytes_per_candidate_input(197, 768, 3072, 12) == 10_940_592
    # 6 GiB budget, 1 GiB fixed, 8 proxy images per forward: 5 * 2**30 // (8 * 10,940,592) = 61
    assert candidate_batch_for_memory(6, 8, 197, 768, 3072, 12, fixed_bytes=2**30) == 61
    # bf16 halves the bytes: 122
    assert candidate_batch_for_memory(6, 8, 197, 768, 3072, 12, fixed_bytes=2**30, element_bytes=2) == 122
    assert candidate_batch_for_memory(0.001, 64, 197, 768, 3072, 12) == 1  # never below one candidate


def test_memory_budget_caps_the_engine_and_leaves_scores_equal():
    """A budget too small for the token-rows default shrinks the candidate batch (as the formula says),
    and the scores stay those of the default run (the batch only groups the same per-candidate work)."""
    model, images = tiny_vit(), tiny_images(4)
    adapter = get_adapter(model)
    a = kl_scores(adapter, images, progress=False, batch_size=4)
    weights = sum(p.numel() * 4 for p in model.parameters())
    cache = 4 * (TINY["img_size"] // TINY["patch_size"]) ** 2 * TINY["embed_dim"] * 4  # 4 images, 16 patches
    cache += 4 * 1 * TINY["embed_dim"] * 4  # ... plus the class token
    per = bytes_per_candidate_input(17, 24, 48, 4)
    budget = (weights + cache + 3 * 4 * per) / 2**30  # room for exactly 3 candidates of 4 images
    b = kl_scores(adapter, images, progress=False, batch_size=4, memory_gb=budget)
    assert a.meta["candidate_batch_used"] > 3 and b.meta["candidate_batch_used"] == 3
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-9)


def test_cli_dtype_and_memory_reach_the_engine(tmp_path):
    """`upvit score --dtype bf16 --memory-gb G` records the precision and a candidate batch within the budget;
    the scores equal an in-process bf16 run on the same proxy images."""
    import upvit
    from upvit.data import load_data, sample_proxy
    from upvit.importance.api import proxy_tensor
    from upvit.io import save

    model = tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10)
    model.upvit_config.data_config.update({"mean": [0.2725], "std": [0.4056]})
    save(model, str(tmp_path / "m"))
    out = str(tmp_path / "s.safetensors")
    r = run_main("score", tmp_path / "m", "--data", "animal-mnist:train", "--proxy-size", "4", "--batch-size", "4",
                 "--dtype", "bf16", "--memory-gb", "0.01", "--out", out)  # in-process: one thread, as the reference
    assert r.returncode == 0, r.stderr
    got = upvit.Scores.load(out)
    assert got.meta["compute_dtype"] == "bfloat16"
    ds, _ = load_data("animal-mnist:train")
    images = proxy_tensor(sample_proxy(ds, size=4, seed=0)[0])
    ref = kl_scores(get_adapter(model), images, batch_size=4, dtype="bf16", memory_gb=0.01, progress=False)
    assert got.meta["candidate_batch_used"] == ref.meta["candidate_batch_used"]
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v.double(), rtol=1e-3, atol=1e-7)  # threads may differ in bf16


def test_cli_refuses_dtype_for_other_methods_and_fp16_on_cpu(tmp_path):
    base = ["score", "no-such-model", "--data", "animal-mnist:train", "--out", str(tmp_path / "s.safetensors")]
    for extra, words in ((["--method", "fisher", "--dtype", "bf16"], "apply to --method kl only"),
                         (["--dtype", "fp16", "--device", "cpu"], "fp16 needs a CUDA device")):
        r = run_main(*base, *extra)
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        assert r.returncode != 0 and len(lines) == 1 and words in lines[0], r.stderr


def test_cpu_bf16_native_reads_the_flags():
    from upvit.importance.kl import cpu_bf16_native

    assert cpu_bf16_native("flags : fpu avx2 avx512f avx512_bf16 amx_tile") is True
    assert cpu_bf16_native("flags : fpu avx2 amx_bf16") is True
    assert cpu_bf16_native("flags : fpu avx2 avx512f avx512_vnni") is False  # AVX-512 alone is not bf16
