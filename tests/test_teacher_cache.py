"""Teacher outputs cached per distinct training image (issue 23, item 4): same loss as recomputing."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import upvit
from helpers import tiny_vit
from upvit.data import ImageTensorDataset
from upvit.distill import DistillationLoss, TeacherCache
from upvit.train import TrainConfig


def _data(augment: bool, n: int = 24) -> ImageTensorDataset:
    rng = np.random.default_rng(0)
    return ImageTensorDataset(rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8), rng.integers(0, 5, n),
                              [0.5] * 3, [0.5] * 3, augment=augment, seed=0)


class _Counting:
    """Counts the images the teacher sees (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.images = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        self.images += inputs[0].shape[0]


def test_cache_returns_each_images_own_outputs():
    teacher = tiny_vit(seed=3)
    compute = DistillationLoss(teacher).teacher_logits
    x = torch.randn(10, 3, 16, 16)
    cache = TeacherCache()
    first = cache(x[:6], compute)
    # a new batch in another order, with a repeat and four unseen images
    order = torch.tensor([9, 2, 2, 7, 0, 5, 8, 6])
    again = cache(x[order], compute)
    torch.testing.assert_close(first, compute(x[:6]), rtol=0, atol=1e-5)
    torch.testing.assert_close(again, compute(x[order]), rtol=0, atol=1e-5)
    assert cache.misses == 6 + 4 and cache.hits == 4 and len(cache.store) == 10
    small = TeacherCache(max_entries=2)
    torch.testing.assert_close(small(x, compute), compute(x), rtol=0, atol=1e-5)  # computed, not stored
    assert len(small.store) == 2


def _one_image_at_a_time(model: torch.nn.Module) -> torch.nn.Module:
    """The teacher's forward run image by image: each image's logits then do not depend on which batch it came
    in (a batched GEMM's summation order does, by ~1e-7, and with 2 threads differently than with 1), so a
    cached run and a recomputing run see bit-identical teacher outputs and must train bit-identically."""
    forward = model.forward
    model.forward = lambda x: torch.cat([forward(x[i:i + 1]) for i in range(x.shape[0])])
    return model


def _finetune(tmp_path, name: str, cache, augment: bool = False):
    teacher, student = _one_image_at_a_time(tiny_vit(seed=1)), tiny_vit(seed=2)
    counter = _Counting(teacher)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, warmup_epochs=0, amp="off", seed=0)
    record = upvit.finetune(student, teacher, _data(augment), cfg, str(tmp_path / name), alpha=2.0, temperature=2.0,
                            cache_teacher=cache)
    log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    saved = upvit.load(str(tmp_path / name)).upvit_config.extra["distillation"]
    return record, log, student, counter.images, saved


def test_cached_training_gives_the_same_losses_and_weights(tmp_path):
    _, plain_log, plain, plain_seen, plain_saved = _finetune(tmp_path, "plain", False)
    _, cached_log, cached, cached_seen, cached_saved = _finetune(tmp_path, "cached", "auto")
    assert plain_seen == 3 * 24 and cached_seen == 24  # the teacher ran once per image, not once per epoch
    assert not plain_saved["teacher_cache"] and cached_saved["teacher_cache"]
    for a, b in zip(plain_log, cached_log, strict=True):
        for key in ("train_loss", "train_ce", "train_kl"):
            assert b[key] == a[key], key
    for k, v in plain.state_dict().items():
        assert torch.equal(cached.state_dict()[k], v), k


def test_auto_leaves_augmented_data_uncached(tmp_path):
    *_, seen, saved = _finetune(tmp_path, "aug", "auto", augment=True)
    assert seen == 3 * 24 and not saved["teacher_cache"]
    with pytest.raises(upvit.UpvitError, match="cache_teacher must be"):
        upvit.finetune(tiny_vit(), copy.deepcopy(tiny_vit()), _data(False), TrainConfig(epochs=1, batch_size=8),
                       str(tmp_path / "bad"), cache_teacher="sometimes")
