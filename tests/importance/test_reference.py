"""The one reference engine: every exact criterion (one-shot KL, greedy rounds, depth unit scores) measures
with the adapter's own divergence against the original's outputs computed once."""
from __future__ import annotations

import pytest
import torch

import upvit
from hf_helpers import tiny_bert, token_inputs
from naive_hf import naive_bert_score
from upvit.adapters import get_adapter
from upvit.adapters.base import Adapter
from upvit.importance.greedy import JointKL
from upvit.importance.kl import kl_scores
from upvit.importance.units import unit_scores


def test_greedy_on_a_sentence_encoder_scores_its_rounds_with_the_encoders_divergence():
    """The defect: greedy's rounds used softmax-KL of the embeddings while its first pass (the one-shot
    engine) used 1 - cos, and labelled the result "kl". Round one with nothing removed yet must equal the
    one-shot scores, and those equal the naive slice-and-rerun 1 - cos."""
    model = tiny_bert()
    adapter = get_adapter(model)
    assert adapter.divergence == "cosine"
    inputs = token_inputs()
    one_shot = kl_scores(adapter, inputs, progress=False)["res.0"]
    joint = JointKL(adapter, inputs, "res.0")
    first_round = joint.removals(torch.ones(24, dtype=torch.float64), torch.arange(24))
    naive = torch.tensor([naive_bert_score(model, inputs, "res.0", c) for c in range(24)], dtype=torch.float64)
    torch.testing.assert_close(first_round, one_shot, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(first_round, naive, rtol=1e-4, atol=1e-7)
    s = upvit.score(model, inputs, method="greedy", targets=[dict(embed_dim=12, num_heads=4, mlp_hidden=32)])
    assert s.meta["criterion"] == "1 - cos" and s.meta["divergence"] == "cosine"


def test_depth_unit_scores_use_the_encoders_divergence():
    """Skipping a unit of a sentence encoder is measured like removing a channel: sum of 1 - cos."""
    model = tiny_bert()
    adapter = get_adapter(model)
    inputs = token_inputs()
    got = unit_scores(adapter, inputs, [("attn.1", "ffn.1")])
    with torch.no_grad():
        ref = adapter.output_reference(adapter.forward(inputs))
        with adapter.masking(None, skip=frozenset({"attn.1", "ffn.1"})):
            skipped = adapter.forward(inputs)
    e0, e1 = ref[0].squeeze(1), torch.nn.functional.normalize(skipped.double().squeeze(1), dim=-1)
    torch.testing.assert_close(got, (1 - (e0 * e1).sum(-1)).sum().view(1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("batch_size", [2, 64])
def test_a_greedy_run_computes_the_original_outputs_once(monkeypatch, batch_size):
    """One reference for every residual site of a run: the original's outputs once per proxy batch."""
    calls = []
    original = Adapter.output_reference
    monkeypatch.setattr(Adapter, "output_reference", lambda self, out: calls.append(1) or original(self, out))
    from helpers import tiny_images, tiny_swin

    model = tiny_swin()
    images = tiny_images(3, img_size=32)
    initial = upvit.score(model, images, method="magnitude")
    calls.clear()
    upvit.score(model, images, method="greedy", initial=initial, ratios=[0.5], batch_size=batch_size)
    assert len(calls) == -(-3 // batch_size)  # 3 residual sites, one reference


def test_hybrid_keeps_one_reference_across_its_rounds(monkeypatch):
    """Every exact round of the hybrid scorer reuses the original's outputs of the first and hashes no
    weight (the fingerprint is for persisted scores); its scores still equal the exact engine's."""
    from helpers import tiny_images, tiny_vit
    from upvit.importance import hybrid as hybrid_module
    from upvit.importance import kl as kl_module

    model, images = tiny_vit(embed_dim=24, num_heads=4), tiny_images(4)
    from plan_helpers import scrambled

    # a misleading screen forces several exact rounds
    monkeypatch.setattr(hybrid_module, "fisher_scores", scrambled(hybrid_module.fisher_scores))
    references, hashes = [], []
    original, fingerprint = Adapter.output_reference, kl_module.fingerprint
    monkeypatch.setattr(Adapter, "output_reference", lambda self, out: references.append(1) or original(self, out))
    monkeypatch.setattr(kl_module, "fingerprint", lambda *a: hashes.append(1) or fingerprint(*a))
    s = upvit.score(model, images, method="hybrid", targets=[dict(embed_dim=12, num_heads=2, mlp_hidden=48)],
                    band=0.02, min_band=1)
    assert s.meta["exact_calls"] > 1 and len(references) == 1 and not hashes
    exact = kl_scores(get_adapter(model), images, progress=False)
    for key, known in s.meta["exact_channels"].items():
        if known:  # hybrid's rounds batch other candidates together than one full run, and a batched product's
            # rounding depends on its shape (with 2 threads it differs): the engine's own batching bound of
            # test_kl.py::test_candidates_only_scores_those_and_batching_does_not_matter
            top = float(exact[key].max())
            torch.testing.assert_close(s[key][known], exact[key][known], rtol=1e-5, atol=1e-6 * top)
