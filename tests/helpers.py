"""Shared test helpers: tiny timm ViTs with weights large enough that removals matter, the CLI in a
subprocess (or in-process) with its one-line error contract, tiny ImageFolders, byte-for-byte file snapshots."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from upvit.models import ModelConfig, create_timm_model

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=24, depth=2, num_heads=4, mlp_ratio=2.0)


def tiny_vit(distilled: bool = False, seed: int = 0, std: float = 0.3, **overrides) -> torch.nn.Module:
    """A tiny eval-mode ViT (or distilled DeiT) with N(0, std) weights and an upvit config."""
    name = "deit_base_distilled_patch16_224" if distilled else "vit_base_patch16_224"
    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = create_timm_model(name, kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    model.upvit_config = ModelConfig(timm_name=name, timm_kwargs=kwargs, data_config={
        "input_size": [kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"]],
        "mean": [0.5] * kwargs["in_chans"], "std": [0.5] * kwargs["in_chans"]})
    return model.eval()


def tiny_images(n: int = 6, seed: int = 1, **overrides) -> torch.Tensor:
    kwargs = {**TINY, **overrides}
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"], generator=g)


SWIN_NAME = "swin_tiny_patch4_window7_224"
# 32 px, patch 2, window 4: maps of 16x16, 8x8, 4x4, so stages 0 and 1 run shifted windows (with the
# shift mask) and stage 2 a single clipped window; widths 8/16/32, heads 2/4/8 (head dim 4)
TINY_SWIN = dict(img_size=32, patch_size=2, window_size=4, in_chans=3, num_classes=5, embed_dim=8, depths=[2, 2, 2],
                 num_heads=[2, 4, 8], mlp_ratio=2.0)


def tiny_swin(seed: int = 0, std: float = 0.3, **overrides) -> torch.nn.Module:
    """A tiny eval-mode timm Swin with N(0, std) weights and an upvit config."""
    kwargs = {**TINY_SWIN, **overrides}
    torch.manual_seed(seed)
    model = create_timm_model(SWIN_NAME, kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    c = kwargs["in_chans"]
    model.upvit_config = ModelConfig(timm_name=SWIN_NAME, timm_kwargs=kwargs, data_config={
        "input_size": [c, kwargs["img_size"], kwargs["img_size"]], "mean": [0.5] * c, "std": [0.5] * c})
    return model.eval()


def run_cli(*args, timeout=300, cwd=None):
    """``python -m upvit ARGS`` in a fresh interpreter (the repository's upvit), quiet progress bars."""
    return subprocess.run([sys.executable, "-m", "upvit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO,
                          env={"HF_HUB_OFFLINE": "1", "UPVIT_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1"})


def run_main(*args, cwd=None):
    """``upvit ARGS`` in this process (``upvit.cli.main``): the exit status, stdout and stderr that
    :func:`run_cli` gives, without starting an interpreter (torch, timm and transformers imported again
    cost seconds of CPU per call). Keep :func:`run_cli` for what needs a fresh process: separate processes
    on purpose, start-up, stray output of imports; a few end-to-end calls per command stay there."""
    import contextlib
    import io

    from upvit.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads, here = torch.get_num_threads(), os.getcwd()
    try:
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["upvit", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_one_line_error(result, fragment):
    """Non-zero exit, exactly one non-empty line on stderr, no traceback, ``fragment`` in that line."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image_folder(root, classes=("a", "b"), per_class: int = 3, size: int = 20, mode: str = "RGB",
                       seed: int = 0) -> list[str]:
    """A tiny ImageFolder of random PNGs; returns the file paths in ImageFolder (sorted) order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for cls in sorted(classes):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            path = os.path.join(root, cls, f"{i:03d}.png")
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(path)
            paths.append(path)
    return paths


def snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), to check that nothing changed."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out
