"""Parameters, FLOPs (attention matmuls included) and throughput of a model.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one image while every
attention module runs its explicit (unfused) path (the model's adapter switches it), so the two
attention matmuls (q k^T and attn v) are counted as ordinary matmuls. We report multiply-accumulates ("MACs"),
the unit the ViT papers call FLOPs (timm DeiT-S: 4.6 G). Text models are measured on one sequence of their block length
(``input_size`` is ``[T]``; throughput is sequences/s, ``tokens_per_second`` is added).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from .adapters import input_size_of
from .errors import UpvitError


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


def example_batch(model: nn.Module, batch_size: int, input_size: tuple[int, ...] | None, device, random: bool = False):
    """A batch of model inputs: images, or (text models) token ids of the block length."""
    from .adapters import task_of
    from .tasks import is_text

    if is_text(task_of(model)):
        adapter = _adapter(model)
        return adapter.example_inputs(batch_size, device)
    input_size = input_size or input_size_of(model)
    make = torch.randn if random else torch.zeros
    return make(batch_size, *input_size, device=device)


@torch.inference_mode()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass on one image (one sequence for a text model)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .evaluation import model_output

    was_training = model.training
    model.eval()
    x = example_batch(model, 1, input_size, next(model.parameters()).device)
    with unfused_attention(model), FlopCounterMode(display=False) as counter:
        model_output(model, x)
    model.train(was_training)
    return counter.get_total_flops() // 2


RUNTIMES = ("torch", "onnxruntime")


def make_runner(model: nn.Module, x, runtime: str = "torch", device: torch.device | str = "cpu") -> Callable[[], Any]:
    """A callable that runs one forward of batch ``x`` in ``runtime`` (and waits for it): what a timing
    loop calls. ``torch``: PyTorch eager on ``device``; ``onnxruntime``: the model exported to ONNX (see
    :mod:`upvit.export`) in ONNX Runtime on the CPU, with as many intra-op threads as torch uses."""
    from .evaluation import model_output

    if runtime not in RUNTIMES:
        raise UpvitError(f"unknown runtime {runtime!r}: use {' or '.join(RUNTIMES)}")
    device = torch.device(device)
    if runtime == "onnxruntime":
        if device.type != "cpu":
            raise UpvitError(f"--runtime onnxruntime runs on the CPU here, not {device}: use --device cpu")
        from .export import onnx_runner

        inputs = x if isinstance(x, dict) else {"pixel_values": x}
        return onnx_runner(model.cpu().eval(), inputs, threads=torch.get_num_threads())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            out = model_output(model, x)
        sync()
        return out

    return run


SPREAD_WARNING = 0.10  # relative interquartile range of the runs' throughputs above which ``upvit bench`` warns
clock = time.perf_counter  # the timer of every timed run (tests swap in a fake one)


def time_runs(runners: list[Callable[[], Any]], warmup: int = 3, runs: int = 10) -> list[list[float]]:
    """Seconds of ``runs`` timed calls of every runner, after ``warmup`` untimed calls of each.

    The runners take turns (round 1: a, b, c; round 2: a, b, c; ...), so a burst of load from other
    processes slows every model alike instead of one of them: models of one architecture then differ
    by no more than the spread the statistics report."""
    for run in runners:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(runs):
        for run, out in zip(runners, times):
            t0 = clock()
            run()
            out.append(clock() - t0)
    return times


def run_statistics(seconds: list[float], batch_size: int) -> dict[str, float]:
    """Throughput statistics of timed runs of one batch each: the median images/s, its quartiles
    (statistics.quantiles, inclusive method: the 25th/75th percentiles interpolated between runs), min,
    max, and ``spread`` = interquartile range / median (0 for a single run)."""
    rates = sorted(batch_size / t for t in seconds)
    median = statistics.median(rates)
    q1, _, q3 = statistics.quantiles(rates, n=4, method="inclusive") if len(rates) > 1 else (median,) * 3
    return {"images_per_second": median, "images_per_second_q1": q1, "images_per_second_q3": q3,
            "images_per_second_min": rates[0], "images_per_second_max": rates[-1], "spread": (q3 - q1) / median,
            "median_batch_seconds": statistics.median(seconds)}


def _measure(models: list[nn.Module], batch_size: int, input_size, warmup: int, runs: int, device,
             runtime: str) -> list[dict[str, Any]]:
    device = torch.device(device)
    runners = []
    for model in models:
        model = model.eval().to(device)
        runners.append(make_runner(model, example_batch(model, batch_size, input_size, device, random=True),
                                   runtime, device))
    return [{**run_statistics(t, batch_size), "batch_size": batch_size, "runs": runs, "warmup": warmup,
             "runtime": runtime} for t in time_runs(runners, warmup, runs)]


def throughput(model: nn.Module, batch_size: int = 64, input_size: tuple[int, int, int] | None = None,
               warmup: int = 3, runs: int = 10, device: str | torch.device = "cpu",
               runtime: str = "torch") -> dict[str, float]:
    """Images/s at ``batch_size``: the median over ``runs`` timed forwards after ``warmup`` untimed
    ones, with its spread (:func:`run_statistics`)."""
    return _measure([model], batch_size, input_size, warmup, runs, device, runtime)[0]


def describe_many(models: list[tuple[str, nn.Module]], batch_size: int = 64, runs: int = 10, device: str = "cpu",
                  runtime: str = "torch", warmup: int = 3) -> list[dict[str, Any]]:
    """Rows of the bench table for several models, their timed runs interleaved (:func:`time_runs`)."""
    speeds = _measure([m for _, m in models], batch_size, None, warmup, runs, device, runtime)
    rows = []
    for (name, model), speed in zip(models, speeds):
        row = {"model": name, "params": count_params(model), "macs": count_macs(model),
               "input_size": list(input_size_of(model)), **speed}
        if len(row["input_size"]) == 1:  # a text model: one sample is a sequence of input_size[0] tokens
            row["sequences_per_second"] = row["images_per_second"]  # the same number, in the text's own unit
            row["tokens_per_second"] = row["images_per_second"] * row["input_size"][0]
        rows.append(row)
    return rows


def describe(model: nn.Module, name: str, batch_size: int = 64, runs: int = 10, device: str = "cpu",
             runtime: str = "torch") -> dict[str, Any]:
    """One row of the bench table."""
    return describe_many([(name, model)], batch_size, runs, device, runtime)[0]


def spread_warning(rows: list[dict[str, Any]], limit: float = SPREAD_WARNING) -> str | None:
    """One line naming the models whose runs varied by more than ``limit`` (IQR / median), or None."""
    wide = [f"{r['model']} {100 * r['spread']:.0f}%" for r in rows if r.get("spread", 0.0) > limit]
    if not wide:
        return None
    return (f"throughput varied between timed runs (interquartile range / median above {100 * limit:.0f}%: "
            f"{', '.join(wide)}): the machine was busy; compare models only within that spread, or rerun on an idle "
            "machine with more --runs")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of bench rows: the median throughput, its interquartile range and min-max."""
    text = [len(r.get("input_size", [3])) == 1 for r in rows]  # a text model's sample is a sequence
    unit = "sequences/s" if rows and all(text) else "samples/s" if any(text) else "images/s"
    lines = [f"| model | params (M) | GMACs | {unit} (median) | IQR | min-max | spread | batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e9:.4f} | "
                     f"{r['images_per_second']:.1f} | "
                     f"{r['images_per_second_q1']:.1f}-{r['images_per_second_q3']:.1f} | "
                     f"{r['images_per_second_min']:.1f}-{r['images_per_second_max']:.1f} | "
                     f"{100 * r['spread']:.0f}% | {r['batch_size']} |")
    return "\n".join(lines)
