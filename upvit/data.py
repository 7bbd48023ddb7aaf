"""Datasets: the embedded Animal-MNIST, ImageFolder directories, any torch Dataset; proxy sampling.

Data specs accepted wherever the CLI takes ``--data``:

* ``animal-mnist:train`` / ``animal-mnist:val`` / ``animal-mnist:all`` -- the embedded dataset
  (10 classes x 1,000 grayscale 28x28 silhouettes, MIT, shipped in the ``animal-mnist`` package).
  The split is stratified and fixed: for each class in label order, the class's indices are
  permuted by one ``numpy.random.default_rng(0)`` generator, the first 800 go to ``train`` and the
  last 200 to ``val`` (8,000 / 2,000 images).
* ``shakespeare:train|val|all`` and ``text:FILE_OR_DIR``: text, for text models (:mod:`upvit.text`).
* a directory in ImageNet layout (one sub-folder per class): read with torchvision's ImageFolder
  and the usual ViT evaluation transform (resize to ``size / crop_pct``, centre crop, normalise)
  taken from the model's data config.

From Python, any ``torch.utils.data.Dataset`` yielding ``(image, label)`` can be passed directly.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .errors import UpvitError

ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
ANIMAL_MNIST_SPLIT_SEED = 0
ANIMAL_MNIST_VAL_PER_CLASS = 200
# Pixel mean/std of the train split (pixels scaled to [0, 1]); see tests/test_data.py.
ANIMAL_MNIST_MEAN = (0.2725,)
ANIMAL_MNIST_STD = (0.4056,)


@dataclass
class DataInfo:
    """What a model needs to know about its data."""

    num_classes: int
    class_names: list[str]
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    extra: dict[str, Any] = field(default_factory=dict)

    def data_config(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }


# ----------------------------------------------------------------------------------- Animal-MNIST
def _animal_mnist_dir() -> str:
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise UpvitError(
            "the embedded dataset needs the 'animal-mnist' package: "
            "pip install --no-deps animal-mnist==0.4 (or run `make test` once)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")


_ARRAYS: tuple[np.ndarray, np.ndarray] | None = None


def animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 images (uint8 [N, 28, 28]) and labels (int64 [N]), read from the package's pickles.

    The package's own loader imports tensorflow, so the gzip'd pickles are read directly.
    """
    global _ARRAYS
    if _ARRAYS is None:
        folder = _animal_mnist_dir()
        with gzip.open(os.path.join(folder, "animal_data_version_3.gz"), "rb") as f:
            images = np.asarray(pickle.load(f), dtype=np.uint8)
        with gzip.open(os.path.join(folder, "animal_label_version_3.gz"), "rb") as f:
            labels = np.asarray(pickle.load(f), dtype=np.int64)
        if images.shape != (10000, 28, 28) or labels.shape != (10000,):
            raise UpvitError(f"unexpected animal-mnist contents {images.shape}/{labels.shape}: reinstall animal-mnist==0.4")
        _ARRAYS = (images, labels)
    return _ARRAYS


def stratified_split(labels: np.ndarray, val_per_class: int, seed: int) -> dict[str, np.ndarray]:
    """Indices of a stratified split: per class (in label order) a seeded permutation, the last
    ``val_per_class`` to val. Both index arrays are sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= val_per_class:
            raise UpvitError(f"class {c} has {len(idx)} images, too few for {val_per_class} validation images")
        idx = idx[rng.permutation(len(idx))]
        train.append(idx[:-val_per_class])
        val.append(idx[-val_per_class:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


def animal_mnist_split() -> dict[str, np.ndarray]:
    _, labels = animal_mnist_arrays()
    split = stratified_split(labels, ANIMAL_MNIST_VAL_PER_CLASS, ANIMAL_MNIST_SPLIT_SEED)
    split["all"] = np.arange(len(labels))
    return split


class ImageTensorDataset(Dataset):
    """In-memory uint8 images -> normalised float tensors, with optional light augmentation.

    Augmentation (``augment=True``) is a random affine (rotation +-15 deg, scale 0.9-1.1, shift
    +-3 px) and a horizontal flip, drawn from a generator seeded by (seed, epoch, index), so an
    epoch's images are the same whatever the number of workers and across a resume.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        images = torch.as_tensor(np.asarray(images))
        if images.dim() == 3:
            images = images.unsqueeze(1)
        self.images = images  # uint8 [N, C, H, W]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float() / 255.0
        if self.augment:
            x = self._augment(x, i)
        return (x - self.mean) / self.std, int(self.labels[i])

    def _augment(self, x: torch.Tensor, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        r = torch.rand(5, generator=g)
        angle = (r[0] * 2 - 1) * math.radians(15)
        scale = 0.9 + 0.2 * r[1]
        _, h, w = x.shape
        tx, ty = (r[2] * 2 - 1) * 3 * 2 / w, (r[3] * 2 - 1) * 3 * 2 / h
        flip = -1.0 if r[4] < 0.5 else 1.0
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.tensor([[cos * flip, -sin, tx], [sin * flip, cos, ty]], dtype=torch.float32)
        grid = F.affine_grid(theta.unsqueeze(0), [1, *x.shape], align_corners=False)
        return F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def animal_mnist(split: str = "train", augment: bool = False, seed: int = 0) -> tuple[ImageTensorDataset, DataInfo]:
    """The embedded dataset's ``train`` / ``val`` / ``all`` split and its DataInfo."""
    indices = animal_mnist_split()
    if split not in indices:
        raise UpvitError(f"unknown animal-mnist split {split!r}: use train, val or all")
    images, labels = animal_mnist_arrays()
    idx = indices[split]
    ds = ImageTensorDataset(images[idx], labels[idx], ANIMAL_MNIST_MEAN, ANIMAL_MNIST_STD, augment=augment, seed=seed)
    info = DataInfo(10, list(ANIMAL_MNIST_CLASSES), (1, 28, 28), ANIMAL_MNIST_MEAN, ANIMAL_MNIST_STD, 1.0, "bilinear",
                    extra={"dataset": "animal-mnist", "split": split})
    return ds, info


# ------------------------------------------------------------------------------------ ImageFolder
def image_folder(root: str, data_config: dict[str, Any] | None, train: bool = False) -> tuple[Dataset, DataInfo]:
    """An ImageNet-layout directory with the model's evaluation (or training) transform."""
    from ._compat import import_timm

    import_timm()  # patches torchvision where needed
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise UpvitError(f"data directory {root!r} does not exist: pass an ImageFolder root or animal-mnist:SPLIT")
    cfg = dict(data_config or {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "interpolation": "bicubic"})
    transform = create_transform(
        input_size=tuple(cfg["input_size"]), is_training=train, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        crop_pct=cfg.get("crop_pct", 0.875), interpolation=cfg.get("interpolation", "bicubic"),
    )
    if cfg["input_size"][0] == 1:  # grayscale models: ImageFolder opens RGB
        from torchvision import transforms as T

        transform = T.Compose([T.Grayscale(1), transform])
    try:
        ds = ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise UpvitError(f"cannot read {root!r} as an ImageFolder (one sub-folder of images per class): {e}") from None
    info = DataInfo(len(ds.classes), list(ds.classes), tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                    cfg.get("crop_pct", 0.875), cfg.get("interpolation", "bicubic"), extra={"dataset": os.path.abspath(root)})
    return ds, info


def load_data(spec: str, data_config: dict[str, Any] | None = None, train: bool = False, seed: int = 0,
              tokenizer: Any = None) -> tuple[Dataset, DataInfo]:
    """Resolve a data spec (see module doc). ``train`` turns augmentation on. Text specs
    (``shakespeare:SPLIT``, ``text:FILE_OR_DIR``, see :mod:`upvit.text`) are tokenised with
    ``tokenizer`` for the task in ``data_config`` and return a :class:`upvit.text.TextInfo`."""
    from .text import is_text_spec, text_dataset

    if is_text_spec(spec):
        return text_dataset(spec, tokenizer, data_config)
    if (data_config or {}).get("task") in ("causal-lm", "masked-lm", "sentence-embedding"):
        raise UpvitError(f"this is a text model, but {spec!r} is image data: use shakespeare:SPLIT or text:FILE_OR_DIR")
    if spec.startswith("animal-mnist"):
        _, _, split = spec.partition(":")
        ds, info = animal_mnist(split or ("train" if train else "val"), augment=train, seed=seed)
        if data_config is not None:
            expected = list(data_config.get("input_size", info.input_size))
            if expected != list(info.input_size):
                raise UpvitError(
                    f"the model expects input {expected} but animal-mnist images are {list(info.input_size)}: "
                    "use a model built for 1x28x28 input or an ImageFolder dataset"
                )
        return ds, info
    return image_folder(spec, data_config, train=train)


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of a dataset without decoding images where the dataset exposes them."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr), dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def sample_proxy(dataset: Dataset, size: int | None = None, per_class: int | None = None, seed: int = 0) -> tuple[Subset, dict[str, Any]]:
    """A seeded proxy subset: ``size`` random images, or ``per_class`` images of every class.

    Returns the subset and a record of the choice (for the scores' metadata).
    """
    n = len(dataset)
    rng = np.random.default_rng(seed)
    if per_class is not None:
        if per_class < 1:
            raise UpvitError("--per-class must be at least 1")
        labels = dataset_labels(dataset)
        chosen = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if len(idx) < per_class:
                raise UpvitError(f"class {c} has only {len(idx)} images, fewer than --per-class {per_class}")
            chosen.append(np.sort(rng.choice(idx, per_class, replace=False)))
        indices = np.concatenate(chosen)
        record = {"sampling": "per_class", "per_class": per_class}
    else:
        size = n if size is None else size
        if size < 1:
            raise UpvitError("the proxy set is empty: ask for at least one image (--proxy-size)")
        if size > n:
            raise UpvitError(f"--proxy-size {size} is larger than the dataset ({n} images)")
        indices = np.sort(rng.choice(n, size, replace=False))
        record = {"sampling": "random", "size": size}
    record.update({"seed": seed, "num_images": int(len(indices)), "dataset_size": n})
    return Subset(dataset, indices.tolist()), record
