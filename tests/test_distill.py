"""DistillationLoss against hand-computed values; teacher handling."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import upvit
import upvit.distill
from helpers import tiny_images, tiny_vit
from upvit.distill import DistillationLoss, check_teacher

STUDENT = [[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
TEACHER = [[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
LABELS = [1, 2]


class FixedTeacher(nn.Module):
    """Returns given logits whatever the images (or a (cls, dist) pair of them)."""

    def __init__(self, logits, pair_with=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.logits = torch.tensor(logits)
        self.pair_with = None if pair_with is None else torch.tensor(pair_with)

    def forward(self, x):
        out = self.logits + 0 * self.w
        return out if self.pair_with is None else (out, self.pair_with + 0 * self.w)


def _reference(student, teacher, labels, alpha, t):
    """CE + alpha * T^2 * mean_i sum_k q_ik (log q_ik - log p_ik), written out with numpy."""
    s, q_logits = np.asarray(student) / t, np.asarray(teacher) / t
    p = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    q = np.exp(q_logits) / np.exp(q_logits).sum(1, keepdims=True)
    p1 = np.exp(np.asarray(student)) / np.exp(np.asarray(student)).sum(1, keepdims=True)
    ce = -np.mean([math.log(p1[i, y]) for i, y in enumerate(labels)])
    kl = np.mean((q * (np.log(q) - np.log(p))).sum(1))
    return ce + alpha * t * t * kl, ce, kl


def test_loss_hand_computed_case():
    # By hand: p_0 = softmax(1, 2, 0) = (0.2447, 0.6652, 0.0900); CE_0 = -log 0.6652 = 0.4076;
    # p_1 = softmax(0, 0, 1) = (0.2119, 0.2119, 0.5761); CE_1 = -log 0.5761 = 0.5514 -> CE = 0.4795.
    # q_0 = softmax(2, 0, 0) = (0.7870, 0.1065, 0.1065), q_1 = uniform.
    # KL_0 = sum q log(q/p) = 0.7870 ln(3.2158) + 0.1065 ln(0.1601) + 0.1065 ln(1.1830) = 0.7420
    # KL_1 = (1/3)(ln(1.5728) * 2 + ln(0.5786)) = 0.1195 -> batchmean KL = 0.4308.
    crit = DistillationLoss(FixedTeacher(TEACHER), alpha=0.5)
    loss, parts = crit(torch.tensor(STUDENT), torch.zeros(2, 1), torch.tensor(LABELS))
    assert parts["ce"] == pytest.approx(0.4795, abs=2e-4)
    assert parts["kl"] == pytest.approx(0.4308, abs=2e-4)
    assert loss.item() == pytest.approx(0.4795 + 0.5 * 0.4308, abs=3e-4)
    ref_loss, ref_ce, ref_kl = _reference(STUDENT, TEACHER, LABELS, 0.5, 1.0)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert parts["ce"] == pytest.approx(ref_ce, rel=1e-6) and parts["kl"] == pytest.approx(ref_kl, rel=1e-6)


def test_temperature_scales_by_t_squared():
    crit = DistillationLoss(FixedTeacher(TEACHER), alpha=0.3, temperature=2.0)
    loss, parts = crit(torch.tensor(STUDENT), torch.zeros(2, 1), torch.tensor(LABELS))
    ref_loss, ref_ce, ref_kl = _reference(STUDENT, TEACHER, LABELS, 0.3, 2.0)
    assert parts["kl"] == pytest.approx(ref_kl, rel=1e-6)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert loss.item() == pytest.approx(ref_ce + 0.3 * 4 * ref_kl, rel=1e-6)


def test_pair_output_teacher_is_averaged():
    a, b = [[3.0, 0.0, 1.0], [0.0, 2.0, 0.0]], [[1.0, 0.0, -1.0], [2.0, 0.0, 2.0]]
    mean = ((np.asarray(a) + np.asarray(b)) / 2).tolist()
    loss, _ = DistillationLoss(FixedTeacher(a, pair_with=b), alpha=1.0)(torch.tensor(STUDENT), torch.zeros(2, 1),
                                                                          torch.tensor(LABELS))
    assert loss.item() == pytest.approx(_reference(STUDENT, mean, LABELS, 1.0, 1.0)[0], rel=1e-6)


def test_teacher_frozen_and_gradient_only_reaches_student():
    teacher = tiny_vit(seed=1).train()
    student = tiny_vit(seed=2).train()
    crit = DistillationLoss(teacher, alpha=1.0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # even if someone flips it back, the teacher runs in eval mode
    images, labels = tiny_images(4), torch.tensor([0, 1, 2, 3])
    loss, parts = crit(student(images), images, labels)
    loss.backward()
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    with torch.no_grad():
        expected = _reference(student.eval()(images).numpy(), teacher(images).numpy(), labels.tolist(), 1.0, 1.0)
    # student in train mode has no dropout here, so eval-mode logits equal the train-mode ones
    assert loss.item() == pytest.approx(expected[0], rel=1e-5)


def test_class_count_mismatch_is_one_clear_error():
    crit = DistillationLoss(FixedTeacher([[0.0, 1.0]] * 2))
    with pytest.raises(upvit.UpvitError, match="outputs per image"):
        crit(torch.tensor(STUDENT), torch.zeros(2, 1), torch.tensor(LABELS))
    with pytest.raises(upvit.UpvitError, match="teacher has 7 classes but the student has 5"):
        check_teacher(tiny_vit(), tiny_vit(num_classes=7))


def test_bad_options():
    with pytest.raises(upvit.UpvitError, match="alpha"):
        DistillationLoss(FixedTeacher(TEACHER), alpha=-1)
    with pytest.raises(upvit.UpvitError, match="temperature"):
        DistillationLoss(FixedTeacher(TEACHER), temperature=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher_moves_to_student_device():
    teacher = tiny_vit(seed=1)
    crit = DistillationLoss(teacher, amp="off")
    student = tiny_vit(seed=2).cuda()
    images = tiny_images(4).cuda()
    loss, _ = crit(student(images), images, torch.tensor([0, 1, 2, 3]).cuda())
    assert next(teacher.parameters()).device.type == "cuda" and loss.device.type == "cuda"
    ref = _reference(student(images).detach().cpu().numpy(), teacher(images).cpu().numpy(), [0, 1, 2, 3], 1.0, 1.0)
    assert loss.item() == pytest.approx(ref[0], rel=1e-4)


# ------------------------------------------------------------------------------ feature distillation
def _pvt_teacher_and_student():
    from plan_helpers import random_scores
    from pvt_helpers import tiny_pvt

    teacher = tiny_pvt(seed=1, std=0.2)
    plan = upvit.make_plan(teacher, random_scores(teacher, seed=3), embed_dim=[4, 8, 16], mlp_hidden=[8, 16, 32])
    return teacher, upvit.prune(teacher, plan).train(), plan


def _pooled_features(model, x):
    """The pooled penultimate feature, through timm's own API (independent of the criterion's hooks)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_feature_distillation_hand_computed_case():
    from upvit.distill import FeatureDistillationLoss, feature_channels_from_plan

    teacher, student, plan = _pvt_teacher_and_student()
    channels = feature_channels_from_plan(student, teacher)
    assert channels == plan.keep["res.2"] and len(channels) == 16  # the teacher has 32 final channels
    crit = FeatureDistillationLoss(teacher, student, channels, alpha=20.0)
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 4, 2])
    loss, parts = crit(student(x), x, labels)
    # the criterion reads the features of the forward that produced the logits, once
    with pytest.raises(upvit.UpvitError, match="did not pass through its classifier"):
        crit(torch.zeros(4, 5), x, labels)
    with torch.no_grad():
        s, t = _pooled_features(student, x).numpy(), _pooled_features(teacher, x).numpy()
        logits = student(x).numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -np.mean(logp[np.arange(4), labels.numpy()])
    mse = np.mean((s - t[:, channels]) ** 2)  # mean over batch and channels
    assert parts["ce"] == pytest.approx(ce, rel=1e-5) and parts["mse"] == pytest.approx(mse, rel=1e-5)
    assert loss.item() == pytest.approx(ce + 20.0 * mse, rel=1e-5)
    assert mse > 1e-3
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    crit.close()
    crit._store.clear()
    student(x)
    assert "student" not in crit._store  # the hook is gone


def test_feature_distillation_needs_a_plan_or_equal_widths():
    from pvt_helpers import tiny_pvt
    from upvit.distill import FeatureDistillationLoss, feature_channels_from_plan

    teacher, student, _ = _pvt_teacher_and_student()
    import copy

    scratch = upvit.models.build_model(copy.deepcopy(student.upvit_config))
    scratch.upvit_config.extra = {}
    with pytest.raises(upvit.UpvitError, match="records no pruning plan"):
        feature_channels_from_plan(scratch, teacher)
    assert feature_channels_from_plan(tiny_pvt(seed=5), teacher) is None  # same widths: the same channels
    with pytest.raises(upvit.UpvitError, match="distil from the model the student was pruned from"):
        feature_channels_from_plan(student, tiny_pvt(embed_dims=[8, 16, 24], num_heads=[1, 2, 4]))
    with pytest.raises(upvit.UpvitError, match="matches 3 teacher channels"):
        FeatureDistillationLoss(teacher, student, [0, 1, 2])
    with pytest.raises(upvit.UpvitError, match="use distill='logits'"):
        FeatureDistillationLoss(teacher, tiny_vit(distilled=True))


def test_finetune_with_feature_distillation(tmp_path):
    from upvit.data import ImageTensorDataset
    from upvit.train import TrainConfig

    teacher, student, plan = _pvt_teacher_and_student()
    rng = np.random.default_rng(0)
    data = ImageTensorDataset(rng.integers(0, 256, size=(16, 3, 32, 32), dtype=np.uint8), rng.integers(0, 5, size=16),
                              [0.5] * 3, [0.5] * 3, augment=True, seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0, ema_decay=0.9, amp="off")
    record = upvit.finetune(student, teacher, data, cfg, str(tmp_path / "f"), alpha=20.0, distill="features")
    assert record["train_mse"] > 0 and "train_kl" not in record
    assert record["train_loss"] == pytest.approx(record["train_ce"] + 20.0 * record["train_mse"], rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    saved = upvit.load(str(tmp_path / "f")).upvit_config.extra["distillation"]
    assert saved["criterion"] == "feature_distillation" and saved["channels"] == plan.keep["res.2"]
    assert not student._forward_pre_hooks and not any(m._forward_pre_hooks for m in student.modules())  # closed
    with pytest.raises(upvit.UpvitError, match="distill must be one of logits, features"):
        upvit.finetune(student, teacher, data, cfg, str(tmp_path / "g"), distill="hidden")


def test_cli_finetune_passes_the_distillation_kind(tmp_path, monkeypatch):
    from pvt_helpers import tiny_pvt
    from upvit.cli import main

    model = tiny_pvt(img_size=28, in_chans=1, num_classes=10)
    upvit.save(model, str(tmp_path / "m"))
    seen = {}
    # the stub saves the student untrained; the certificate's fresh-process reload is test_certificate.py's job
    monkeypatch.setattr(upvit.distill, "finetune",
                        lambda student, teacher, data, cfg, out, **k: seen.update(k) or upvit.save(student, out)
                        or {"epoch": 1})
    monkeypatch.setattr(upvit.cli, "_certify", lambda *a, **k: None)
    args = ["finetune", str(tmp_path / "m"), "--teacher", str(tmp_path / "m"), "--data", "animal-mnist:train",
            "--out", str(tmp_path / "o")]
    assert main(args + ["--distill", "features", "--alpha", "20"]) == 0
    assert seen["distill"] == "features" and seen["alpha"] == 20.0
    assert main(args[:-1] + [str(tmp_path / "o2")]) == 0 and seen["distill"] == "logits"  # a fresh --out
