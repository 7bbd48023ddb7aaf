"""The Fisher estimate against finite differences of the KL along each channel's mask."""
from __future__ import annotations

import pytest
import torch

import upvit
from helpers import tiny_images, tiny_vit
from upvit.adapters import Masks, get_adapter
from upvit.errors import UpvitError
from upvit.importance.fisher import fisher_scores


def kl_along_mask(adapter, images, key: str, channel: int, m: float, logq: torch.Tensor | None = None) -> float:
    """sum_i KL(q_i || p_i(m)) with channel ``channel`` of site ``key`` scaled to ``m`` (float64)."""
    size = {s.key: s.size for s in adapter.topology().sites}[key]
    mask = torch.ones(size, dtype=torch.float64)
    mask[channel] = m
    with torch.no_grad():
        if logq is None:
            logq = torch.log_softmax(adapter.forward(images), -1)
        logp = torch.log_softmax(adapter.forward(images, Masks({key: mask})), -1)
    return float((logq.exp() * (logq - logp)).sum())


def fd_hessian(adapter, images, key: str, channel: int, h: float = 0.05) -> tuple[float, float]:
    """Central second difference of the KL at m = 1 (the KL and its slope vanish there), with one
    Richardson step (steps h and h/2) to cancel the O(h^2) truncation error; and a bound on its error.

    The bound is the sum of the two errors a finite difference has, each derived rather than tuned:
    - truncation: Richardson's result R(h) errs by O(h^4), so R(2h) errs by ~16x as much and
      |R(h) - R(2h)| (about 15x the error of R(h)) bounds it;
    - rounding: every KL value is a float64 sum over images of sum_k q_k (log q_k - log p_k); the
      log p_k carry rounding errors of the forward pass that change with the summation order (thread
      count, batch blocking). Measured over 1/2 threads and split/whole batches on these models, a KL
      value moves by under 0.7 u S (u: unit roundoff, S = sum_i sum_k q_ik |log q_ik|); eta = 16 u S
      is the per-value bound used. A second difference (p - 2z + m) / h^2 then errs by at most
      4 eta / h^2, and R(h) = (4 D(h/2) - D(h)) / 3 by (4 * 16 + 4) eta / (3 h^2).
    h = 0.05 keeps both far below 1e-3 of the Hessians checked (asserted by the test)."""
    with torch.no_grad():
        logq = torch.log_softmax(adapter.forward(images), -1)
    zero = kl_along_mask(adapter, images, key, channel, 1.0, logq)

    def second_difference(step: float) -> float:
        plus, minus = (kl_along_mask(adapter, images, key, channel, 1 + s, logq) for s in (step, -step))
        return (plus - 2 * zero + minus) / step**2

    d_half, d_one, d_two = (second_difference(s) for s in (h / 2, h, 2 * h))
    richardson = (4 * d_half - d_one) / 3
    truncation = abs(richardson - (4 * d_one - d_two) / 3)
    eta = 16 * (torch.finfo(torch.float64).eps / 2) * float((logq.exp() * logq.abs()).sum())
    rounding = 68 * eta / (3 * h**2)
    return richardson, truncation + rounding


@pytest.mark.parametrize("distilled", [False, True])
def test_fisher_equals_finite_difference_kl_hessian(distilled):
    model = tiny_vit(distilled=distilled, std=0.2).double()
    adapter = get_adapter(model)
    images = tiny_images(5).double()
    scores = fisher_scores(adapter, images, batch_size=3, classes="exact")
    assert scores.meta["method"] == "fisher" and scores.meta["classes"] == "exact"
    checked = 0
    for key, channels in [("res.0", [0, 7, 23]), ("attn.0", [1, 12, 22]), ("attn.1", [5, 17]),
                          ("ffn.0", [0, 30, 47]), ("ffn.1", [9, 40])]:
        for c in channels:
            fd, bound = fd_hessian(adapter, images, key, c)
            est = 2 * float(scores[key][c])  # score = 1/2 * Hessian diagonal
            assert fd > 0
            assert bound < 1e-3 * fd, (key, c, bound / fd)  # sharp enough to catch a wrong Fisher
            assert abs(est - fd) <= bound, (key, c, est, fd, bound)
            checked += 1
    assert checked == 13


def test_fisher_is_second_order_limit_of_true_removal_kl():
    """For small weights the removal KL is close to its quadratic estimate; ranks agree broadly."""
    model = tiny_vit(std=0.08).double()
    adapter = get_adapter(model)
    images = tiny_images(6).double()
    est = fisher_scores(adapter, images, classes="exact")
    for key, c in [("res.0", 3), ("attn.1", 4), ("ffn.0", 11)]:
        exact = kl_along_mask(adapter, images, key, c, 0.0)
        assert float(est[key][c]) == pytest.approx(exact, rel=0.25)


def test_sampled_classes_are_seeded_and_unbiased():
    model = tiny_vit(std=0.2)
    adapter = get_adapter(model)
    images = tiny_images(4)
    exact = fisher_scores(adapter, images, classes="exact")
    a = fisher_scores(adapter, images, classes="sample", num_samples=300, seed=3)
    b = fisher_scores(adapter, images, classes="sample", num_samples=300, seed=3)
    c = fisher_scores(adapter, images, classes="sample", num_samples=300, seed=4)
    assert a.meta["classes"] == "sample" and a.meta["seed"] == 3
    for key, t in exact.items():
        assert torch.equal(a[key], b[key])
        assert not torch.equal(a[key], c[key])
        rel = (a[key] - t).abs().sum() / t.abs().sum()
        assert rel < 0.15, key


def test_auto_switches_to_sampling_above_max_exact_classes():
    model = tiny_vit(std=0.2)
    images = tiny_images(3)
    s = upvit.score(model, images, method="fisher", max_exact_classes=4, num_samples=2)
    assert s.meta["classes"] == "sample" and s.meta["num_samples"] == 2
    s = upvit.score(model, images, method="fisher")
    assert s.meta["classes"] == "exact" and s.meta["num_images"] == 3


def test_batching_does_not_change_scores_and_model_is_untouched():
    model = tiny_vit(std=0.2)
    images = tiny_images(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = upvit.score(model, images, method="fisher", batch_size=7)
    b = upvit.score(model, images, method="fisher", batch_size=2)
    for key, t in a.items():
        torch.testing.assert_close(t, b[key], rtol=1e-5, atol=1e-12)
        assert t.dtype == torch.float64 and (t >= 0).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("options, match", [
    ({"batch_size": 0}, "batch_size"),
    ({"classes": "all"}, "classes must be one of"),
    ({"num_samples": 0}, "num_samples"),
    ({"max_exact_classes": -1}, "max_exact_classes"),
])
def test_bad_options_give_clear_errors(options, match):
    with pytest.raises(UpvitError, match=match):
        upvit.score(tiny_vit(), tiny_images(2), method="fisher", **options)


def test_rank_truncation_keeps_the_largest_eigen_components():
    """rank=K-1 is the full expectation; smaller ranks give a lower bound that grows with the rank."""
    model = tiny_vit(std=0.2)
    adapter = get_adapter(model)
    images = tiny_images(4)
    full = fisher_scores(adapter, images)
    assert full.meta["captured_fraction"] == pytest.approx(1.0)
    previous = None
    for r in (1, 2, 4):
        s = fisher_scores(adapter, images, rank=r)
        total = sum(float(t.sum()) for _, t in s.items())
        if r == 4:  # 5 classes: 4 non-zero components = exact
            for key, t in full.items():
                torch.testing.assert_close(s[key], t, rtol=1e-5, atol=1e-12)
        else:
            assert 0 < s.meta["captured_fraction"] < 1
            assert all((s[key] <= t * (1 + 1e-5) + 1e-12).all() for key, t in full.items())
        assert previous is None or total > previous
        previous = total
    with pytest.raises(UpvitError, match="rank must be"):
        fisher_scores(adapter, images, rank=0)


# ---------------------------------------------------------------- fast path (mask probes) vs autograd through masks
VARIANTS = [dict(distilled=False), dict(distilled=True), dict(distilled=False, init_values=0.5),
            dict(distilled=True, init_values=0.5), dict(distilled=False, global_pool="avg", init_values=0.5)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_probe_gradients_equal_mask_gradients(variant):
    """Signed per-sample d(v . z_i)/d m_{i,c} of every site: plain forward + probes == autograd through masks."""
    from upvit.importance.fisher import _masks_forward, _probes_forward

    adapter = get_adapter(tiny_vit(std=0.2, **variant).double())
    images = tiny_images(4).double()
    with torch.enable_grad():
        logits_m, grads_m = _masks_forward(adapter, images)
        logits_p, grads_p = _probes_forward(adapter, images)
        torch.testing.assert_close(logits_p, logits_m, rtol=1e-12, atol=1e-12)
        v = torch.randn(logits_m.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        ref = grads_m((logits_m * v).sum(), False)
        got = grads_p((logits_p * v).sum(), False)
    assert set(got) == set(ref) == {s.key for s in adapter.topology().sites}
    for key, g in ref.items():
        assert g.shape == (4, {s.key: s.size for s in adapter.topology().sites}[key]) and g.abs().max() > 0
        torch.testing.assert_close(got[key], g, rtol=1e-9, atol=1e-12 * float(g.abs().max()), msg=key)


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_probes_engine_scores_equal_masks_engine(variant):
    adapter = get_adapter(tiny_vit(std=0.2, **variant).double())
    images = tiny_images(5).double()
    ref = fisher_scores(adapter, images, batch_size=3, engine="masks")
    got = fisher_scores(adapter, images, batch_size=3)
    assert ref.meta["engine"] == "masks" and got.meta["engine"] == "probes"
    for key, t in ref.items():
        torch.testing.assert_close(got[key], t, rtol=1e-9, atol=1e-12 * float(t.max()), msg=key)


def test_probes_engine_on_frozen_weights_float32():
    """Frozen weights build no graph by themselves: the probes make the stream require grad."""
    model = tiny_vit(std=0.2, init_values=0.5)
    images = tiny_images(4)
    ref = fisher_scores(get_adapter(model), images, engine="masks")
    model.requires_grad_(False)
    got = fisher_scores(get_adapter(model), images, engine="probes")
    assert not any(p.requires_grad for p in model.parameters())
    for key, t in ref.items():
        torch.testing.assert_close(got[key], t, rtol=1e-4, atol=1e-6 * float(t.max()), msg=key)


def test_engine_option_errors():
    from upvit.adapters.timm_vit import TimmViTAdapter

    class NoProbes(TimmViTAdapter):
        def probing(self):
            return None

    model = tiny_vit()
    with pytest.raises(UpvitError, match="engine must be one of"):
        upvit.score(model, tiny_images(2), method="fisher", engine="fast")
    adapter = NoProbes(model)
    with pytest.raises(UpvitError, match="records no mask probes"):
        fisher_scores(adapter, tiny_images(2), engine="probes")
    assert fisher_scores(adapter, tiny_images(2)).meta["engine"] == "masks"
