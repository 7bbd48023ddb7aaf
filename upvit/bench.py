"""Parameters, FLOPs (attention matmuls included) and throughput of a model.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one image while every
attention module runs its explicit (unfused) path (the model's adapter switches it), so the two
attention matmuls (q k^T and attn v) are counted as ordinary matmuls. We report multiply-accumulates ("MACs"), the unit the ViT papers
call FLOPs (timm DeiT-S: 4.6 G).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _adapter(model: nn.Module):
    from .adapters import get_adapter
    from .errors import UpvitError

    try:
        return get_adapter(model)
    except UpvitError:
        return None


def unfused_attention(model: nn.Module) -> contextlib.AbstractContextManager:
    """Attention as explicit matmuls while inside (so the FLOP counter sees them); the adapter knows how."""
    adapter = _adapter(model)
    return adapter.explicit_attention() if adapter is not None else contextlib.nullcontext()


def input_size_of(model: nn.Module) -> tuple[int, ...]:
    config = getattr(model, "upvit_config", None)
    if config is not None and config.data_config.get("input_size"):
        return tuple(config.data_config["input_size"])
    adapter = _adapter(model)
    size = adapter.input_size() if adapter is not None else None
    return tuple(size) if size else (3, 224, 224)


@torch.inference_mode()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass on one image."""
    from torch.utils.flop_counter import FlopCounterMode

    input_size = input_size or input_size_of(model)
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    with unfused_attention(model), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.inference_mode()
def throughput(model: nn.Module, batch_size: int = 64, input_size: tuple[int, int, int] | None = None,
               warmup: int = 3, runs: int = 10, device: str | torch.device = "cpu") -> dict[str, float]:
    """Images/s at ``batch_size``: median over ``runs`` timed forwards after ``warmup`` untimed ones."""
    input_size = input_size or input_size_of(model)
    device = torch.device(device)
    model = model.eval().to(device)
    x = torch.randn(batch_size, *input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"images_per_second": batch_size / median, "median_batch_seconds": median, "batch_size": batch_size,
            "runs": runs, "warmup": warmup}


def describe(model: nn.Module, name: str, batch_size: int = 64, runs: int = 10, device: str = "cpu") -> dict[str, Any]:
    """One row of the bench table."""
    return {"model": name, "params": count_params(model), "macs": count_macs(model),
            "input_size": list(input_size_of(model)), **throughput(model, batch_size=batch_size, runs=runs, device=device)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of bench rows."""
    lines = ["| model | params (M) | GMACs | images/s | batch |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e9:.4f} | "
                     f"{r['images_per_second']:.1f} | {r['batch_size']} |")
    return "\n".join(lines)
