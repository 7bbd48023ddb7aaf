"""Knowledge distillation from the original model (docs/method.md section 4).

``DistillationLoss`` is a criterion in the training loop's contract
``criterion(logits, images, labels) -> (loss, parts)``: it holds the frozen teacher and runs it on the
same images, so :func:`upvit.train.fit` never branches on distillation (the DeiT habit).

    loss = CE(y, p) + alpha * T^2 * KL(q_T || p_T)

with p = softmax(student logits / T), q = softmax(teacher logits / T), the KL summed over classes and
averaged over the samples of the batch ("batchmean"), the CE averaged over the batch. The ``T^2``
factor (Hinton et al.) keeps the soft-target gradients at the same scale across temperatures; at
the default T = 1 (the paper's setting) it is 1. Note the public UP-ViT code *summed* the KL over
each GPU's batch of 32 images with alpha 0.2, i.e. a per-sample weight of 6.4 in this convention.

Language models (logits ``[B, T, V]``, labels ``[B, T]`` with -100 where there is no target): the
same loss per token, the CE and the KL both averaged over the positions that have a target (for
the fixed blocks of :mod:`upvit.text`, every position), i.e. "batchmean" over tokens.

Sentence encoders (no distribution to match): :class:`EmbeddingDistillation` matches the in-batch
cosine-similarity matrix of the student's sentence embeddings to the teacher's (mean squared
difference over the off-diagonal pairs), which works whatever the two embedding widths are and is
what a sentence encoder is used for.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UpvitError
from .evaluation import model_output


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)`` for given logits; ``kl`` is batchmean KL(q || p) at ``temperature`` (without T^2).
    Per-token logits ``[B, T, V]`` count the positions whose label is not -100."""
    if student_logits.dim() == 3:
        keep = labels.flatten() != -100
        student_logits = student_logits.flatten(0, 1)[keep]
        teacher_logits = teacher_logits.flatten(0, 1)[keep]
        labels = labels.flatten()[keep]
    ce = F.cross_entropy(student_logits, labels)
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    return ce + alpha * temperature ** 2 * kl, ce, kl


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameter names, shapes and values (identifies a teacher)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class DistillationLoss:
    """CE on the labels plus ``alpha`` x KL from a frozen teacher, in the criterion contract.

    The teacher is put in eval mode with ``requires_grad`` off, moved to the student's device on
    first use, and run under ``torch.no_grad``; a teacher returning a (cls, dist) pair is averaged.
    On CUDA the teacher runs under bfloat16 autocast when ``amp`` is "auto" or "bf16" (the student
    does too in :func:`upvit.train.fit`); its logits are used in float32.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, temperature: float = 1.0, amp: str = "auto") -> None:
        if not isinstance(teacher, nn.Module):
            raise UpvitError(f"the teacher must be a torch module, got {type(teacher).__name__}")
        if alpha < 0:
            raise UpvitError(f"--alpha must be non-negative, got {alpha}")
        if not temperature > 0:
            raise UpvitError(f"--temperature must be positive, got {temperature}")
        if amp not in ("auto", "off", "bf16"):
            raise UpvitError("amp must be auto, off or bf16")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.amp = amp
        self._teacher_id: str | None = None

    def describe(self) -> dict[str, Any]:
        """Plain-data identity of the criterion (part of the resume fingerprint and provenance)."""
        if self._teacher_id is None:
            self._teacher_id = model_fingerprint(self.teacher)
        return {"criterion": "distillation", "alpha": self.alpha, "temperature": self.temperature,
                "reduction": "batchmean", "t2_scaling": True, "teacher_fingerprint": self._teacher_id}

    @torch.no_grad()
    def teacher_logits(self, images) -> torch.Tensor:
        """The teacher's float32 logits for ``images`` (an image tensor or a dict of token tensors;
        teacher moved to their device if needed)."""
        device = (next(iter(images.values())) if isinstance(images, dict) else images).device
        first = next(self.teacher.parameters(), None)
        if first is not None and first.device != device:
            self.teacher.to(device)
        self.teacher.eval()
        use_bf16 = self.amp == "bf16" or (self.amp == "auto" and device.type == "cuda")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model_output(self.teacher, images)
        return out.float()

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.teacher_logits(images)
        if teacher.shape != logits.shape:
            raise UpvitError(f"the teacher gives {list(teacher.shape[1:])} outputs per image but the student "
                             f"{list(logits.shape[1:])}: use a teacher trained on the same classes")
        loss, ce, kl = distillation_loss(logits, teacher, labels, self.alpha, self.temperature)
        return loss, {"ce": ce.item(), "kl": kl.item()}

    def __repr__(self) -> str:
        return f"DistillationLoss(alpha={self.alpha}, temperature={self.temperature})"


class EmbeddingDistillation(DistillationLoss):
    """For sentence encoders: ``loss = alpha * mean over pairs i != j of (cos_s(i, j) - cos_t(i, j))^2``,
    the student's and the teacher's in-batch cosine similarities of their (L2-normalised) sentence
    embeddings. Labels and temperature are unused. Any embedding widths work."""

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "criterion": "embedding-similarity distillation",
                "reduction": "mean over in-batch sentence pairs", "t2_scaling": False}

    def __call__(self, logits: torch.Tensor, images, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.teacher_logits(images)
        if logits.dim() != 2 or teacher.dim() != 2 or logits.shape[0] < 2:
            raise UpvitError("embedding distillation needs [batch, width] sentence embeddings and a batch of >= 2")
        loss = similarity_mse(logits, teacher)
        return self.alpha * loss, {"sim_mse": loss.item()}


def similarity_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the off-diagonal in-batch cosine similarities (rows re-normalised)."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    return ((s @ s.T - t @ t.T)[off] ** 2).mean()


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher whose classes or input size differ from the student's (one clear line)."""
    s_classes, t_classes = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
    if s_classes is not None and t_classes is not None and s_classes != t_classes:
        raise UpvitError(f"the teacher has {t_classes} classes but the student has {s_classes}: "
                         "distil from the model the student was pruned from")
    s_cfg, t_cfg = getattr(student, "upvit_config", None), getattr(teacher, "upvit_config", None)
    s_in = list((s_cfg.data_config if s_cfg else {}).get("input_size", []))
    t_in = list((t_cfg.data_config if t_cfg else {}).get("input_size", []))
    if s_in and t_in and s_in != t_in:
        raise UpvitError(f"the teacher expects input {t_in} but the student {s_in}: use a teacher on the same data")


def finetune(student: nn.Module, teacher: nn.Module, train_data, cfg, out_dir: str, alpha: float = 1.0,
             temperature: float = 1.0, val_data=None, resume: bool = False, device: torch.device | str | None = None,
             teacher_name: str | None = None, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune ``student`` in place with distillation from ``teacher``; write ``out_dir``.

    ``cfg`` is a :class:`upvit.train.TrainConfig`. The model directory written to ``out_dir`` records
    the teacher (``teacher_name`` or its timm name, plus a weight fingerprint), alpha and the
    temperature under ``config.extra["distillation"]``. Returns the last epoch's log record.

    >>> import upvit                                                     # doctest: +SKIP
    >>> record = upvit.finetune(pruned, teacher, train_ds, upvit.TrainConfig(epochs=10), "out/ft")  # doctest: +SKIP
    """
    from .train import fit

    from .hf import task_of

    check_teacher(student, teacher)
    kind = EmbeddingDistillation if task_of(student) == "sentence-embedding" else DistillationLoss
    criterion = kind(teacher, alpha=alpha, temperature=temperature, amp=cfg.amp)
    t_cfg = getattr(teacher, "upvit_config", None)
    provenance = {**criterion.describe(), "teacher": teacher_name or (t_cfg.timm_name if t_cfg else type(teacher).__name__)}
    extra = {**(extra_config or {}), "distillation": provenance}
    return fit(student, train_data, cfg, out_dir, criterion=criterion, val_data=val_data, resume=resume,
               device=device, extra_config=extra)
