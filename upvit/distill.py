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

Option ``distill="features"`` (:class:`FeatureDistillationLoss`; the paper reportedly distils PVTv2
this way, with alpha 20): the penultimate features instead of the logits,

    loss = CE(y, p) + alpha * mean over the batch and channels of (f_student - f_teacher[:, keep])^2

where f is the pooled feature that enters the final linear classifier (:meth:`Adapter.classifier`).
The pruned student's feature channel i *is* the teacher's residual channel ``keep[i]`` of the last
stage (the plan recorded it, ``config.extra["plan"]``), so the teacher's features are read at those
channels: no learned projection, nothing added to the student.

A headless backbone (a timm model with ``num_classes=0``: its forward gives the pooled embedding, there is no
classifier and no class) is distilled label-free with ``distill="features"`` (:class:`EmbeddingFeatureDistillation`):

    loss = alpha * mean over the batch and channels of (e_student - e_teacher[:, keep])^2

where e is the model's output embedding (what its forward returns) and ``keep`` the plan's kept channels
of the last residual site as above; no CE, the labels of the data are never read (any image set will do).

Language models (logits ``[B, T, V]``, labels ``[B, T]`` with -100 where there is no target): the
same loss per token, the CE and the KL both averaged over the positions that have a target (for
the fixed blocks of :mod:`upvit.text`, every position), i.e. "batchmean" over tokens.

Teacher outputs are cached (:class:`TeacherCache`) when the training images are the same every epoch (a
deterministic transform, e.g. ``emoji:train`` or any dataset without augmentation): the teacher then runs
once per distinct image, keyed by the image's bytes, and every later epoch costs only the student's passes.
Keyed by content, the cache cannot hand one image's outputs to another, whatever the order, batch or resume.

Sentence encoders (no distribution to match): :class:`EmbeddingDistillation` matches the in-batch
cosine-similarity matrix of the student's sentence embeddings to the teacher's (mean squared
difference over the off-diagonal pairs), which works whatever the two embedding widths are and is
what a sentence encoder is used for.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
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
    from .fingerprint import digest

    def parts():
        for name, t in model.state_dict().items():
            yield name
            yield json.dumps(list(t.shape))
            yield t.detach().float()

    return digest(parts()).hexdigest()[:16]


class TeacherCache:
    """The teacher's outputs per distinct input image, keyed by a 128-bit BLAKE2 digest of its bytes.

    ``cache(images, compute)`` returns ``compute(images)`` for a batch, running ``compute`` only on the
    images not seen before (a batch of new images costs one teacher pass, as without the cache). Only
    tensors are cached (token dicts pass through). At most ``max_entries`` outputs are kept (then new
    images are computed and not stored), so a random transform costs memory only up to that bound; use
    the cache where the transform is deterministic (``finetune(..., cache_teacher="auto")`` does)."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def keys(images: torch.Tensor) -> list[bytes]:
        rows = images.detach().to("cpu", torch.float32).contiguous()
        return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in rows]

    def __call__(self, images: Any, compute: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            return compute(images)
        keys = self.keys(images)
        todo, seen = [], set()
        for i, k in enumerate(keys):  # new images, each once even if the batch repeats it
            if k not in self.store and k not in seen:
                todo.append(i)
                seen.add(k)
        fresh: dict[bytes, torch.Tensor] = {}
        if todo:
            out = compute(images[todo] if len(todo) < len(keys) else images)
            for j, i in enumerate(todo):
                value = out[j].detach().cpu()
                fresh[keys[i]] = value
                if len(self.store) < self.max_entries:
                    self.store[keys[i]] = value
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return torch.stack([fresh[k] if k in fresh else self.store[k] for k in keys]).to(images.device)


class DistillationLoss:
    """CE on the labels plus ``alpha`` x KL from a frozen teacher, in the criterion contract.

    The teacher is put in eval mode with ``requires_grad`` off, moved to the student's device on
    first use, and run under ``torch.no_grad``; a teacher returning a (cls, dist) pair is averaged.
    On CUDA the teacher runs under bfloat16 autocast when ``amp`` is "auto" or "bf16" (the student
    does too in :func:`upvit.train.fit`); its logits are used in float32.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, temperature: float = 1.0, amp: str = "auto",
                 cache: TeacherCache | None = None) -> None:
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
        self.cache = cache  # None: run the teacher on every batch
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
        use_bf16 = _bf16_autocast(self.amp, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model_output(self.teacher, images)
        return out.float()

    def __call__(self, logits: torch.Tensor, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.cache(images, self.teacher_logits) if self.cache is not None else self.teacher_logits(images)
        if teacher.shape != logits.shape:
            raise UpvitError(f"the teacher gives {list(teacher.shape[1:])} outputs per image but the student "
                             f"{list(logits.shape[1:])}: use a teacher trained on the same classes")
        loss, ce, kl = distillation_loss(logits, teacher, labels, self.alpha, self.temperature)
        return loss, {"ce": ce.item(), "kl": kl.item()}

    def __repr__(self) -> str:
        return f"DistillationLoss(alpha={self.alpha}, temperature={self.temperature})"


DISTILL_KINDS = ("logits", "features")


def is_headless(model: nn.Module) -> bool:
    """A timm backbone built with ``num_classes=0``: its forward returns the pooled embedding (no classifier)."""
    return getattr(model, "num_classes", None) == 0


def _feature_width(model: nn.Module, role: str) -> int:
    """The width of the features feature distillation matches: the embedding a headless backbone outputs
    (timm's ``num_features``), else the input of the final linear classifier."""
    if is_headless(model):
        width = getattr(model, "num_features", None)
        if not isinstance(width, int):
            raise UpvitError(f"the {role} is a headless {type(model).__name__} that does not say its embedding width "
                             "(num_features): use a timm backbone")
        return width
    return _classifier(model, role).in_features


def _classifier(model: nn.Module, role: str) -> nn.Linear:
    from .adapters import get_adapter

    try:
        head = get_adapter(model).classifier()
    except UpvitError:
        head = None
    if head is None:
        raise UpvitError(f"feature distillation reads the input of the {role}'s final linear classifier, and this "
                         f"{type(model).__name__} has none that upvit can find: use distill='logits'")
    return head


def feature_channels_from_plan(student: nn.Module, teacher: nn.Module) -> list[int] | None:
    """The teacher's penultimate-feature channels (a headless backbone's: its output embedding) that the
    student's features correspond to: the kept channels of the plan's last residual site (recorded in
    ``student.upvit_config.extra["plan"]``).
    None when the widths are equal and there is no plan (same channels)."""
    from .plan import Plan

    s_width, t_width = _feature_width(student, "student"), _feature_width(teacher, "teacher")
    config = getattr(student, "upvit_config", None)
    plan_dict = (config.extra if config is not None else {}).get("plan")
    if plan_dict is None:
        if s_width == t_width:
            return None
        raise UpvitError(f"the student's features have {s_width} channels and the teacher's {t_width}, and the student "
                         "records no pruning plan saying which teacher channels it kept: prune it with upvit, or use "
                         "distill='logits'")
    plan = Plan.from_dict(plan_dict)
    keep = plan.keep[plan.residual_sites()[-1]]
    source = plan.source_topology()
    src_width = source.residual(source.num_stages - 1).size if source is not None else t_width
    if len(keep) != s_width or src_width != t_width or max(keep) >= t_width:
        raise UpvitError(f"the student's plan keeps {len(keep)} of {src_width} final channels, but the student has "
                         f"{s_width} and the teacher {t_width}: distil from the model the student was pruned from")
    return list(keep)


def _bf16_autocast(amp: str, device: torch.device) -> bool:
    """Whether the teacher runs under bfloat16 autocast: always with "bf16", on CUDA only with "auto"."""
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def _ready_teacher(teacher: nn.Module, images: torch.Tensor) -> None:
    """Move the frozen teacher to the images' device (once) and keep it in eval mode."""
    first = next(teacher.parameters(), None)
    if first is not None and first.device != images.device:
        teacher.to(images.device)
    teacher.eval()


class FeatureDistillationLoss:
    """CE on the labels plus ``alpha`` x MSE between the student's pooled penultimate features and
    the teacher's at ``channels`` (all when None), in the criterion contract (module doc).

    The student's features are captured by a forward pre-hook on its classifier during the training
    loop's own forward (no second student forward); :meth:`close` removes it. The teacher runs frozen,
    in eval mode, under ``torch.no_grad`` (bfloat16 autocast on CUDA as for :class:`DistillationLoss`).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, channels: list[int] | None = None,
                 alpha: float = 20.0, amp: str = "auto", cache: TeacherCache | None = None) -> None:
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise UpvitError("feature distillation needs the teacher and the student as torch modules")
        if alpha < 0:
            raise UpvitError(f"alpha must be non-negative, got {alpha}")
        if amp not in ("auto", "off", "bf16"):
            raise UpvitError("amp must be auto, off or bf16")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.amp, self.cache = float(alpha), amp, cache
        self._teacher_head = _classifier(teacher, "teacher")
        s_width, t_width = _classifier(student, "student").in_features, self._teacher_head.in_features
        self.channels = None if channels is None else torch.as_tensor(channels, dtype=torch.long)
        n = t_width if self.channels is None else len(self.channels)
        if n != s_width or (self.channels is not None and (self.channels.min() < 0 or self.channels.max() >= t_width)):
            raise UpvitError(f"feature distillation matches {n} teacher channels (of {t_width}) to the student's "
                             f"{s_width}: give one teacher channel per student channel")
        store: dict[str, torch.Tensor] = {}  # a closure, not a bound method: a deep copy of the student (EMA)
        self._store = store  # shares it instead of copying this criterion and its teacher

        def capture(module, inputs):
            store["student"] = inputs[0]

        self._handle = _classifier(student, "student").register_forward_pre_hook(capture)
        self._teacher_id: str | None = None

    def describe(self) -> dict[str, Any]:
        if self._teacher_id is None:
            self._teacher_id = model_fingerprint(self.teacher)
        return {"criterion": "feature_distillation", "alpha": self.alpha, "features": "pooled input of the classifier",
                "loss": "CE + alpha * MSE (mean over batch and channels)",
                "channels": None if self.channels is None else self.channels.tolist(),
                "teacher_fingerprint": self._teacher_id}

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 penultimate features ``[B, D_teacher]``."""
        _ready_teacher(self.teacher, images)
        got: list[torch.Tensor] = []
        handle = self._teacher_head.register_forward_pre_hook(lambda module, inputs: got.append(inputs[0]))
        use_bf16 = _bf16_autocast(self.amp, images.device)
        try:
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                self.teacher(images)
        finally:
            handle.remove()
        return got[-1].float()

    def __call__(self, logits: torch.Tensor, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        student = self._store.pop("student", None)
        if student is None or student.shape[0] != logits.shape[0]:
            raise UpvitError("the student's forward did not pass through its classifier: feature distillation "
                             "needs the student the criterion was built for")
        teacher = self.cache(images, self.teacher_features) if self.cache is not None else self.teacher_features(images)
        if self.channels is not None:
            teacher = teacher.index_select(1, self.channels.to(teacher.device))
        ce = F.cross_entropy(logits, labels)
        mse = F.mse_loss(student.float(), teacher)
        return ce + self.alpha * mse, {"ce": ce.item(), "mse": mse.item()}

    def close(self) -> None:
        self._handle.remove()

    def __repr__(self) -> str:
        return f"FeatureDistillationLoss(alpha={self.alpha})"


class EmbeddingFeatureDistillation:
    """Label-free feature distillation of a headless backbone (``num_classes=0``): ``alpha`` x MSE between
    the student's output embedding (the ``logits`` argument of the criterion contract: what the headless
    model's forward returns) and the teacher's at ``channels`` (all when None). No CE: ``labels`` are
    never read, so the training images may come from any set. The teacher runs frozen, in eval mode,
    under ``torch.no_grad`` (bfloat16 autocast on CUDA as for :class:`DistillationLoss`); ``cache``: a
    :class:`TeacherCache` of its embeddings."""

    def __init__(self, teacher: nn.Module, student: nn.Module, channels: list[int] | None = None,
                 alpha: float = 20.0, amp: str = "auto", cache: TeacherCache | None = None) -> None:
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise UpvitError("feature distillation needs the teacher and the student as torch modules")
        if not (is_headless(teacher) and is_headless(student)):
            raise UpvitError("label-free feature distillation needs a headless student and teacher (num_classes=0); "
                             "a classifier pair uses FeatureDistillationLoss")
        if alpha < 0:
            raise UpvitError(f"alpha must be non-negative, got {alpha}")
        if amp not in ("auto", "off", "bf16"):
            raise UpvitError("amp must be auto, off or bf16")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.amp, self.cache = float(alpha), amp, cache
        s_width, t_width = _feature_width(student, "student"), _feature_width(teacher, "teacher")
        self.channels = None if channels is None else torch.as_tensor(channels, dtype=torch.long)
        n = t_width if self.channels is None else len(self.channels)
        if n != s_width or (self.channels is not None and (self.channels.min() < 0 or self.channels.max() >= t_width)):
            raise UpvitError(f"feature distillation matches {n} teacher channels (of {t_width}) to the student's "
                             f"{s_width}: give one teacher channel per student channel")
        self._teacher_id: str | None = None

    def describe(self) -> dict[str, Any]:
        """Plain-data identity of the criterion (part of the resume fingerprint and provenance)."""
        if self._teacher_id is None:
            self._teacher_id = model_fingerprint(self.teacher)
        return {"criterion": "feature_distillation", "alpha": self.alpha,
                "features": "output embedding of the headless backbone",
                "loss": "alpha * MSE (mean over batch and channels), no CE: labels unused",
                "channels": None if self.channels is None else self.channels.tolist(),
                "teacher_fingerprint": self._teacher_id}

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 output embedding ``[B, D_teacher]``."""
        _ready_teacher(self.teacher, images)
        use_bf16 = _bf16_autocast(self.amp, images.device)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model_output(self.teacher, images)
        return out.float()

    def __call__(self, logits: torch.Tensor, images: torch.Tensor,
                 labels: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.cache(images, self.teacher_features) if self.cache is not None else self.teacher_features(images)
        if self.channels is not None:
            teacher = teacher.index_select(1, self.channels.to(teacher.device))
        if logits.shape != teacher.shape:
            raise UpvitError(f"the student outputs {list(logits.shape[1:])} per image and the teacher's kept features "
                             f"are {list(teacher.shape[1:])}: both must be pooled embeddings (global_pool 'token' or "
                             "'avg')")
        mse = F.mse_loss(logits.float(), teacher)
        return self.alpha * mse, {"mse": mse.item()}

    def close(self) -> None:
        """Nothing to release (no hooks); the same interface as :class:`FeatureDistillationLoss`."""

    def __repr__(self) -> str:
        return f"EmbeddingFeatureDistillation(alpha={self.alpha})"


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
             teacher_name: str | None = None, extra_config: dict[str, Any] | None = None,
             distill: str = "logits", cache_teacher: bool | str = "auto") -> dict[str, Any]:
    """Fine-tune ``student`` in place with distillation from ``teacher``; write ``out_dir``.

    ``cfg`` is a :class:`upvit.train.TrainConfig`. ``distill``: "logits" (the KL above, the default)
    or "features" (MSE on the pooled penultimate features, the teacher's read at the channels the
    student's plan kept; ``temperature`` does not apply). A headless student and teacher (``num_classes=0``)
    take "features" only: alpha x MSE on the output embeddings, no CE, labels unused, no ``val_data``.
    The model directory written to ``out_dir`` records the teacher (``teacher_name`` or its timm name, plus a
    weight fingerprint) and the criterion under ``config.extra["distillation"]``. ``cache_teacher``: keep the
    teacher's outputs per distinct training image (:class:`TeacherCache`) so it runs once per image instead of once
    per epoch; "auto" (default) does so when the training set declares a deterministic transform (``augment``
    False, as ``emoji:``, ``animal-mnist-rgb:`` and an un-augmented ``animal-mnist:`` dataset do). The loss is the
    same either way.
    Returns the last epoch's log record.

    >>> import upvit                                                     # doctest: +SKIP
    >>> record = upvit.finetune(pruned, teacher, train_ds, upvit.TrainConfig(epochs=10), "out/ft")  # doctest: +SKIP
    >>> record = upvit.finetune(pruned, teacher, train_ds, cfg, "out/ft-f",  # doctest: +SKIP
    ...                         alpha=20, distill="features")
    """
    from .adapters import task_of
    from .tasks import Task, is_text
    from .train import fit

    if distill not in DISTILL_KINDS:
        raise UpvitError(f"distill must be one of {', '.join(DISTILL_KINDS)}, got {distill!r}")
    check_teacher(student, teacher)
    if cache_teacher not in (True, False, "auto"):
        raise UpvitError(f"cache_teacher must be True, False or 'auto', got {cache_teacher!r}")
    deterministic = getattr(train_data, "augment", None) is False
    cache = TeacherCache() if cache_teacher is True or (cache_teacher == "auto" and deterministic) else None
    headless = is_headless(student)
    if headless and distill != "features":
        raise UpvitError("the student is a headless backbone (num_classes=0): it has no logits to distil; use "
                         "--distill features (distill='features': MSE on its embedding, labels unused)")
    if headless and val_data is not None:
        raise UpvitError("a headless backbone has no classes to validate: drop --val-data (val_data) and measure kNN "
                         "top-1 with `upvit eval MODEL --data VAL --knn-train TRAIN`")
    if distill == "features":
        if is_text(task_of(student)):
            raise UpvitError("distill='features' reads an image classifier's penultimate features: "
                             "use distill='logits' "
                             "for text models")
        kind_f = EmbeddingFeatureDistillation if headless else FeatureDistillationLoss
        criterion: Any = kind_f(teacher, student, feature_channels_from_plan(student, teacher), alpha=alpha,
                                amp=cfg.amp, cache=cache)
    else:
        kind = EmbeddingDistillation if task_of(student) == Task.SENTENCE_EMBEDDING else DistillationLoss
        criterion = kind(teacher, alpha=alpha, temperature=temperature, amp=cfg.amp, cache=cache)
    t_cfg = getattr(teacher, "upvit_config", None)
    # the cache stays out of describe() (the resume fingerprint): the loss is the same with or without it
    provenance = {**criterion.describe(), "teacher": teacher_name or (t_cfg.name if t_cfg else type(teacher).__name__),
                  "teacher_cache": cache is not None}
    extra = {**(extra_config or {}), "distillation": provenance}
    try:
        return fit(student, train_data, cfg, out_dir, criterion=criterion, val_data=val_data, resume=resume,
                   device=device, extra_config=extra)
    finally:
        if distill == "features":
            criterion.close()
