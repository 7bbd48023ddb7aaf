"""The certificate of a pruned (or fine-tuned) model directory: report.json + report.md.

What a user deploying the output wants to know before trusting it: that the directory loads through the
family's *stock* class in a fresh Python process (``timm.create_model(name, **kwargs)`` + a strict
``load_state_dict`` of ``model.safetensors``, or ``<transformers class>.from_pretrained`` with no missing,
unexpected or mismatched weights) and computes what the in-memory model computes; its shape, parameters,
MACs and measured throughput next to the source's; its divergence from the source on a proxy set where
one is at hand (summed over samples, the criterion of docs/method.md: KL for classifiers and language
models, 1 - cos for sentence encoders); and, on request, ONNX Runtime parity of its export.

A failed reload is an error (:class:`UpvitError`), never a warning: the directory is not what it claims.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

from .errors import UpvitError

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
RELOAD_RTOL = 1e-4  # same library, same CPU: only thread-count summation order differs (~1e-7 of the scale)

# Runs in a fresh interpreter with nothing of upvit imported: the stock classes only.
_CHILD = r"""
import json, os, sys
import torch
from safetensors.torch import load_file, save_file

directory, inputs_path, out_path = sys.argv[1:4]
inputs = load_file(inputs_path)
if os.path.isfile(os.path.join(directory, "upvit.json")) or (
        "architectures" in json.load(open(os.path.join(directory, "config.json")))):
    import transformers
    arch = json.load(open(os.path.join(directory, "config.json")))["architectures"][0]
    model, info = getattr(transformers, arch).from_pretrained(directory, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"{arch}.from_pretrained: " + "; ".join(f"{k} {list(v)[:3]}" for k, v in bad.items()))
else:
    import timm
    config = json.load(open(os.path.join(directory, "config.json")))
    model = timm.create_model(config["timm_name"], pretrained=False, **config["timm_kwargs"])
    try:
        model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=True)
    except RuntimeError as e:
        raise SystemExit("strict load_state_dict: " + " ".join(str(e).split())[:300])
model.eval()
with torch.no_grad():
    if "pixel_values" in inputs:
        out = model(inputs["pixel_values"])
    else:
        extra = {"use_cache": False} if "CausalLM" in type(model).__name__ else {}
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extra)
    if isinstance(out, (tuple, list)):
        out = (out[0] + out[1]) / 2
    elif not isinstance(out, torch.Tensor):
        if getattr(out, "logits", None) is not None:
            out = out.logits
        else:  # a bare encoder: the mean-pooled, L2-normalised sentence embedding
            m = inputs["attention_mask"].to(out.last_hidden_state.dtype).unsqueeze(-1)
            out = torch.nn.functional.normalize((out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
save_file({"output": out.contiguous()}, out_path)
"""


class ReloadCheck:
    """Reload ``directory`` through the stock class in a fresh process and compare its output with
    ``model``'s on sample inputs from the model's data config. The process starts at construction (so
    other work overlaps its start-up, mostly importing torch and timm); :meth:`result` waits for it and
    raises :class:`UpvitError` on any failure."""

    def __init__(self, directory: str, model: nn.Module, timeout: float = 600) -> None:
        from safetensors.torch import save_file

        from .export import sample_inputs, wrapped

        self.directory, self.timeout, self.t0 = directory, timeout, time.perf_counter()
        inputs = sample_inputs(model, 2, seed=11)
        with torch.no_grad():
            self.want = wrapped(model.eval())(**inputs).float()
        self.tmp = tempfile.TemporaryDirectory(prefix="upvit-reload-")
        self.out_path = os.path.join(self.tmp.name, "out.safetensors")
        inputs_path = os.path.join(self.tmp.name, "inputs.safetensors")
        save_file({k: v.contiguous() for k, v in inputs.items()}, inputs_path)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, directory, inputs_path, self.out_path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    def result(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        try:
            try:
                _, stderr = self.proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                raise UpvitError(f"reload check of {self.directory} timed out after {self.timeout:.0f}s") from None
            if self.proc.returncode != 0:
                last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
                raise UpvitError(f"reload check failed: the stock class cannot load {self.directory}: "
                                 f"{last[0].strip()[:300]}")
            got = load_file(self.out_path)["output"].float()
        finally:
            self.tmp.cleanup()
        want = self.want
        if got.shape != want.shape:
            raise UpvitError(f"reload check failed: {self.directory} reloaded gives outputs of shape "
                             f"{list(got.shape)}, "
                             f"the pruned model {list(want.shape)}")
        diff = float((got - want).abs().max())
        scale = float(want.abs().max())
        tolerance = RELOAD_RTOL * max(scale, 1.0)
        if not diff <= tolerance:
            raise UpvitError(f"reload check failed: {self.directory} reloaded through the stock class differs from the "
                             f"saved model by {diff:.3g} (tolerance {tolerance:.3g}): the files do not hold this model")
        return {"ok": True, "max_abs_diff": diff, "output_scale": scale, "tolerance": tolerance,
                "loader": _loader_name(self.directory), "seconds": round(time.perf_counter() - self.t0, 2)}

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.tmp.cleanup()


def reload_check(directory: str, model: nn.Module, timeout: float = 600) -> dict[str, Any]:
    """:class:`ReloadCheck` started and waited for."""
    return ReloadCheck(directory, model, timeout).result()


def _loader_name(directory: str) -> str:
    from .models import LIBRARIES

    return next(lib for lib in LIBRARIES if lib.owns_dir(directory)).stock_loader(directory)


@torch.no_grad()
def proxy_divergence(source: nn.Module, model: nn.Module, proxy, batch_size: int = 64) -> dict[str, Any]:
    """Sum over the proxy samples (and their events, padding excluded) of the adapter's divergence between
    the source's outputs and ``model``'s (KL(source || model), or 1 - cos for sentence encoders)."""
    from .adapters import get_adapter
    from .adapters.base import batch_len, batch_slice

    a_src, a_new = get_adapter(source.eval()), get_adapter(model.eval())
    total, n = 0.0, batch_len(proxy)
    for start in range(0, n, batch_size):
        x = batch_slice(proxy, start, min(n, start + batch_size))
        ref = a_src.output_reference(a_src.events(x))
        out = a_new.events(x)
        if a_src.divergence == "cosine" and out.shape[-1] != ref[0].shape[-1]:
            out = _at_source_channels(model, out, ref[0].shape[-1])
        total += float(a_src.output_divergence(ref, out.unsqueeze(0), a_src.event_weights(x))[0])
    return {"criterion": {"kl": "KL(source || pruned)", "cosine": "1 - cos"}[a_src.divergence], "sum": total,
            "per_sample": total / max(n, 1), "samples": n}


def _at_source_channels(model: nn.Module, embedding: torch.Tensor, width: int) -> torch.Tensor:
    """A pruned model's embedding ``[B, E, d]`` laid out as the source's ``[B, E, width]``: channel i at the
    source channel its plan kept (the last residual site's ``keep[i]``), 0 at removed ones, the layout of the
    masked source that scoring compared (an embedding is compared channel by channel, 1 - cos)."""
    from .plan import Plan

    config = getattr(model, "upvit_config", None)
    plan = (config.extra if config is not None else {}).get("plan")
    if plan is None:
        raise UpvitError(f"the pruned model's embedding has {embedding.shape[-1]} channels and the source's {width}, "
                         "and it records no plan saying which source channels it kept: prune it with upvit")
    p = Plan.from_dict(plan)
    keep = torch.as_tensor(p.keep[p.residual_sites()[-1]], device=embedding.device)
    if len(keep) != embedding.shape[-1] or int(keep.max()) >= width:
        raise UpvitError(f"the pruned model's plan keeps {len(keep)} final channels but its embedding has "
                         f"{embedding.shape[-1]}: compare it with the model it was pruned from")
    placed = embedding.new_zeros(*embedding.shape[:-1], width)
    placed[..., keep] = embedding
    return placed


def certify(directory: str, model: nn.Module, source: nn.Module | None = None, proxy=None, onnx: bool = False,
            bench_batch: int = 64, bench_runs: int = 5, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check ``directory`` (where ``model`` was just saved) and write report.json + report.md there.

    ``source``: the model it was pruned from (shapes, ratios, divergence); ``proxy``: inputs on which the
    divergence from the source is measured; ``onnx``: also export ``model.onnx`` with ONNX Runtime parity.
    Raises :class:`UpvitError` when the reload or the ONNX parity fails (no report is written then)."""
    from .io import atomic_write_bytes, atomic_write_json

    t0 = time.perf_counter()
    report: dict[str, Any] = {"directory": directory, **(extra or {})}
    check = ReloadCheck(directory, model)  # runs while the rest is measured
    try:
        _measure(report, directory, model, source, proxy, onnx, bench_batch, bench_runs)
    except BaseException:
        check.cancel()
        raise
    report["reload"] = check.result()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(os.path.join(directory, REPORT_JSON), report)
    atomic_write_bytes(os.path.join(directory, REPORT_MD), (report_markdown(report) + "\n").encode())
    return report


def _measure(report: dict[str, Any], directory: str, model: nn.Module, source: nn.Module | None, proxy, onnx: bool,
             bench_batch: int, bench_runs: int) -> None:
    from .adapters import get_adapter
    from .bench import count_macs, count_params, throughput

    models = {"target": model} if source is None else {"source": source, "target": model}
    for role, m in models.items():
        m.eval()
        tp = throughput(m, batch_size=bench_batch, runs=bench_runs, warmup=1)
        report[role] = {"shape": get_adapter(m).describe(), "params": count_params(m), "macs": count_macs(m),
                        "throughput": {"per_second": tp["images_per_second"], "batch_size": bench_batch,
                                       "runs": bench_runs, "runtime": "torch", "threads": torch.get_num_threads()}}
    if source is not None:
        report["ratios"] = {"params": report["target"]["params"] / report["source"]["params"],
                            "macs": report["target"]["macs"] / report["source"]["macs"],
                            "speedup": (report["target"]["throughput"]["per_second"]
                                        / report["source"]["throughput"]["per_second"])}
    report["proxy_divergence"] = (proxy_divergence(source, model, proxy)
                                  if source is not None and proxy is not None else None)
    if onnx:
        from .export import export_onnx

        result = export_onnx(model, os.path.join(directory, "model.onnx"))
        report["onnx"] = {"ok": True, **{k: v for k, v in result.to_dict().items() if k != "parity"},
                          "path": "model.onnx", "parity": [vars(p) for p in result.parity]}
    else:
        report["onnx"] = None


def _shape_line(shape: dict[str, Any]) -> str:
    def value(v):  # per-block lists of one repeated width read as "12 x6"
        return f"{v[0]} x{len(v)}" if isinstance(v, list) and len(v) > 1 and all(x == v[0] for x in v) else v

    keys = [k for k in shape if k not in ("family", "class")]
    return f"{shape.get('class')} ({shape.get('family')}): " + ", ".join(f"{k} {value(shape[k])}" for k in keys)


def report_markdown(r: dict[str, Any]) -> str:
    lines = [f"# Certificate of {os.path.basename(os.path.normpath(r['directory']))}", ""]
    rl = r["reload"]
    lines += [f"- Reload: **passed** through `{rl['loader']}` in a fresh process; max |diff| {rl['max_abs_diff']:.3g} "
              f"(tolerance {rl['tolerance']:.3g}, output scale {rl['output_scale']:.3g})"]
    if r.get("onnx"):
        o = r["onnx"]
        lines.append(f"- ONNX: `{o['path']}` ({o['exporter']} exporter, opset {o['opset']}), ONNX Runtime parity max "
                     f"|diff| {o['max_abs_diff']:.3g}")
    d = r.get("proxy_divergence")
    lines.append(f"- Proxy-set divergence from the source: {d['criterion']} summed over {d['samples']} samples "
                 f"{d['sum']:.4g} ({d['per_sample']:.4g} per sample)" if d else
                 "- Proxy-set divergence from the source: not measured (no proxy data given)")
    lines += ["", "| | shape | params | MACs | throughput /s (batch) |", "|---|---|---:|---:|---:|"]
    for role in ("source", "target"):
        if role in r:
            m = r[role]
            lines.append(f"| {role} | {_shape_line(m['shape'])} | {m['params']:,} | {m['macs']:,} | "
                         f"{m['throughput']['per_second']:.1f} ({m['throughput']['batch_size']}) |")
    if "ratios" in r:
        q = r["ratios"]
        lines += ["", f"Params {q['params']:.1%} of the source, MACs {q['macs']:.1%}, "
                      f"measured speed-up {q['speedup']:.2f}x "
                  f"(PyTorch eager, {r['target']['throughput']['threads']} thread(s), median of "
                  f"{r['target']['throughput']['runs']} runs; a quick reading, see `upvit bench` for a careful one)."]
    return "\n".join(lines)
