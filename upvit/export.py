"""ONNX export of a (pruned) model, checked in ONNX Runtime before it is kept.

What is exported is the output upvit itself compares (:func:`upvit.evaluation.model_output`): a
classifier's logits (a distilled DeiT's averaged pair), a language model's per-token logits, a bare
text encoder's mean-pooled, L2-normalised sentence embedding. Inputs are named ``pixel_values``
(images, ``[batch, C, H, W]``) or ``input_ids`` + ``attention_mask`` (text, ``[batch, sequence]``);
the batch axis is dynamic, and so is the sequence axis of a text model.

The exporter is torch's TorchScript-based one (``dynamo=False``, opset 17) by default. Both it and the
dynamo exporter (``exporter="dynamo"``, opset 18) reach ONNX Runtime parity on every family upvit prunes
(tests/test_export.py); the TorchScript one exports a tiny model in about a second where dynamo needs
10-40 s on a 2-core CPU, and it takes dynamic axes by name where dynamo needs a symbolic dimension with a
family-specific bound (GPT-2's sequence <= n_positions). Parity is checked on sample inputs built from the
model's own data config (:func:`sample_inputs`) at two batch sizes (and two sequence lengths for text),
one of them different from the traced one, so a batch or sequence size baked into the graph is caught.
The tolerance is relative to the output's scale: ``max |onnx - torch| <= rtol * max(|torch|, 1)``.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .errors import UpvitError

DEFAULT_RTOL = 1e-3  # float32 kernels differ by ~1e-6 of the scale; a wrong graph differs by O(scale)
OPSETS = {"legacy": 17, "dynamo": 18}


def is_text(model: nn.Module) -> bool:
    from .adapters import task_of
    from .tasks import is_text as is_text_task

    return is_text_task(task_of(model))


def input_names(model: nn.Module) -> list[str]:
    return ["input_ids", "attention_mask"] if is_text(model) else ["pixel_values"]


def output_name(model: nn.Module) -> str:
    from .adapters import task_of
    from .tasks import output_name as task_output

    return task_output(task_of(model))


class OutputOf(nn.Module):
    """The model with named tensor inputs and the one output upvit compares (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from .evaluation import model_output

        return model_output(self.model, pixel_values)


class TextOutputOf(OutputOf):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        from .adapters import task_of
        from .evaluation import logits_of
        from .tasks import Task

        extra = {"use_cache": False} if task_of(self.model) == Task.CAUSAL_LM else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return logits_of(out, {"attention_mask": attention_mask})


def wrapped(model: nn.Module) -> OutputOf:
    return (TextOutputOf if is_text(model) else OutputOf)(model).eval()


def sequence_length(model: nn.Module) -> int:
    """A text model's sequence length from its data config (block size / max length)."""
    from .adapters import input_size_of

    return int(input_size_of(model)[0])


def sample_inputs(model: nn.Module, batch_size: int, seq_len: int | None = None,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs as the model's data pipeline would give them, seeded.

    Images: uniform pixels in [0, 1] normalised with the data config's mean and std. Text: token ids
    uniform over the vocabulary, ``seq_len`` long (default: the data config's length), with the last
    sample's final quarter padded (attention mask 0) when there is more than one sample."""
    g = torch.Generator().manual_seed(seed)
    if is_text(model):
        length = seq_len or sequence_length(model)
        ids = torch.randint(0, int(model.config.vocab_size), (batch_size, length), generator=g)
        mask = torch.ones_like(ids)
        if batch_size > 1 and length > 3:
            mask[-1, length - length // 4:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    from .adapters import input_size_of

    size = input_size_of(model)
    config = getattr(model, "upvit_config", None)
    dc = (config.data_config if config is not None else None) or {}
    mean = torch.tensor(dc.get("mean") or [0.5] * size[0]).view(-1, 1, 1)
    std = torch.tensor(dc.get("std") or [0.5] * size[0]).view(-1, 1, 1)
    return {"pixel_values": (torch.rand(batch_size, *size, generator=g) - mean) / std}


@dataclass
class Parity:
    """One parity check: ONNX Runtime's output against PyTorch's on the same inputs."""

    batch_size: int
    seq_len: int | None
    max_abs_diff: float
    scale: float  # max |torch output|
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class ExportResult:
    path: str
    exporter: str
    opset: int
    inputs: list[str]
    output: str
    dynamic_axes: dict[str, dict[int, str]]
    parity: list[Parity] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max((p.max_abs_diff for p in self.parity), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_abs_diff"] = self.max_abs_diff
        return d


def dynamic_axes_of(model: nn.Module) -> dict[str, dict[int, str]]:
    if is_text(model):
        axes = {0: "batch", 1: "sequence"}
        return {"input_ids": dict(axes), "attention_mask": dict(axes), output_name(model): {0: "batch"}}
    return {"pixel_values": {0: "batch"}, output_name(model): {0: "batch"}}


def _dynamo_shapes(model: nn.Module) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    batch = Dim("batch")
    if not is_text(model):
        return {"pixel_values": {0: batch}}
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    seq = Dim("sequence", min=2, max=int(limit))
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def _quiet():
    """torch.onnx prints progress and warns about tracing; the CLI shows one summary line instead."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def export_onnx(model: nn.Module, path: str, exporter: str = "legacy", opset: int | None = None, check: bool = True,
                rtol: float = DEFAULT_RTOL, seed: int = 0) -> ExportResult:
    """Write ``model`` to ``path`` as ONNX and (``check``) verify it in ONNX Runtime.

    Raises :class:`UpvitError` (one line naming the difference) when the exported graph's output differs
    from PyTorch's by more than ``rtol`` times the output's scale; the file is removed then."""
    import time

    if exporter not in OPSETS:
        raise UpvitError(f"unknown exporter {exporter!r}: use legacy (TorchScript) or dynamo")
    opset = opset or OPSETS[exporter]
    module = wrapped(model)
    names = input_names(model)
    trace = sample_inputs(model, 2, seed=seed)
    args = tuple(trace[n] for n in names)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    final, path = path, os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")  # renamed once checked
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), _quiet():
            if exporter == "legacy":
                torch.onnx.export(module, args, path, dynamo=False, input_names=names,
                                  output_names=[output_name(model)],
                                  dynamic_axes=dynamic_axes_of(model), opset_version=opset, do_constant_folding=True)
            else:
                torch.onnx.export(module, args, path, dynamo=True, input_names=names, output_names=[output_name(model)],
                                  dynamic_shapes=_dynamo_shapes(model), opset_version=opset, external_data=False)
    except UpvitError:
        raise
    except Exception as e:
        if os.path.exists(path):
            os.unlink(path)
        raise UpvitError(f"ONNX export ({exporter}, opset {opset}) failed: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:240]}") from None
    result = ExportResult(path=final, exporter=exporter, opset=opset, inputs=names, output=output_name(model),
                          dynamic_axes=dynamic_axes_of(model))
    if check:
        try:
            result.parity = check_parity(model, path, rtol=rtol, seed=seed + 1)
        except BaseException:
            os.unlink(path)  # a graph that is not the model is never left behind
            raise
    os.replace(path, final)
    result.seconds = time.perf_counter() - t0
    return result


def session(path: str, threads: int | None = None):
    """An ONNX Runtime CPU session (``threads``: intra-op threads; default ORT's own choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UpvitError(f"ONNX Runtime cannot load {path}: {' '.join(str(e).split())[:240]}") from None


def run_session(sess, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    feed = {i.name: inputs[i.name].cpu().numpy() for i in sess.get_inputs()}
    return sess.run(None, feed)[0]


def parity_cases(model: nn.Module) -> list[tuple[int, int | None]]:
    """(batch, sequence) pairs checked: the traced batch 2 and batch 3; text also at a shorter sequence."""
    if not is_text(model):
        return [(2, None), (3, None)]
    full = sequence_length(model)
    return [(2, full), (3, max(2, full // 2 + 1))]


@torch.no_grad()
def check_parity(model: nn.Module, path: str, rtol: float = DEFAULT_RTOL, seed: int = 1,
                 cases: list[tuple[int, int | None]] | None = None) -> list[Parity]:
    """Max |ONNX Runtime - PyTorch| on sample inputs; one-line :class:`UpvitError` above the tolerance."""
    sess = session(path)
    module = wrapped(model)
    out = []
    for i, (b, length) in enumerate(cases or parity_cases(model)):
        inputs = sample_inputs(model, b, length, seed=seed + i)
        ref = module(**inputs).float().numpy()
        got = run_session(sess, inputs)
        if got.shape != ref.shape:
            raise UpvitError(f"ONNX parity failed: output shape {list(got.shape)} in ONNX Runtime vs {list(ref.shape)} "
                             f"in PyTorch at batch {b}" + (f", sequence {length}" if length else ""))
        diff = float(np.abs(got - ref).max())
        scale = float(np.abs(ref).max())
        p = Parity(b, length, diff, scale, rtol * max(scale, 1.0))
        if not p.ok or not np.isfinite(diff):
            at = f"batch {b}" + (f", sequence {length}" if length else "")
            raise UpvitError(f"ONNX parity failed: max |onnxruntime - torch| = {diff:.3g} at {at} exceeds "
                             f"the tolerance {p.tolerance:.3g} ({rtol:g} x output scale {scale:.3g}); "
                             "the exported graph is not the model")
        out.append(p)
    return out


def onnx_runner(model: nn.Module, inputs: dict[str, torch.Tensor],
                threads: int | None = None) -> Callable[[], np.ndarray]:
    """Export ``model`` (unchecked, to a temporary file removed once loaded) and return a callable that
    runs ``inputs`` through ONNX Runtime once: the runtime side of :func:`upvit.bench.make_runner`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="upvit-onnx-") as folder:
        path = os.path.join(folder, "model.onnx")
        export_onnx(model, path, check=False)
        sess = session(path, threads)
    feed = {i.name: inputs[i.name].cpu().numpy() for i in sess.get_inputs()}
    return lambda: sess.run(None, feed)[0]
