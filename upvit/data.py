"""Datasets: the embedded Animal-MNIST, ImageFolder directories, any torch Dataset; proxy sampling.

Data specs accepted wherever the CLI takes ``--data``:

* ``animal-mnist:train`` / ``animal-mnist:val`` / ``animal-mnist:all`` -- the embedded dataset
  (10 classes x 1,000 grayscale 28x28 silhouettes, MIT, shipped in the ``animal-mnist`` package).
  The split is stratified and fixed: for each class in label order, the class's indices are
  permuted by one ``numpy.random.default_rng(0)`` generator, the first 800 go to ``train`` and the
  last 200 to ``val`` (8,000 / 2,000 images).
* ``emoji:train|val|all`` -- Google's emoji images (``make emoji``; ``$UPVIT_EMOJI_DIR`` or ``data/emoji``),
  9 categories, split by base emoji so skin-tone variants stay together (:func:`emoji_split`), read at the
  model's input size; ``animal-mnist-rgb:train|val|all`` -- the embedded set at the model's input size and
  channels (default 3x112x112). Both without augmentation (deterministic: teacher outputs can be cached).
* ``shakespeare:train|val|all`` and ``text:FILE_OR_DIR``: text, for text models (:mod:`upvit.text`).
* a directory in ImageNet layout (one sub-folder per class): read with torchvision's ImageFolder
  and the usual ViT evaluation transform (resize to ``size / crop_pct``, centre crop, normalise)
  taken from the model's data config (input size and channels included: a 1-channel model reads
  its images as grayscale). A file that cannot be decoded raises one :class:`BadImageError` naming
  it, or, with ``skip_bad_images=True``, is skipped and counted (:func:`unreadable_report`).

The model's class names (``config.json``) must equal the data's; :func:`align_classes` refuses a
mismatch or applies an explicit class map.

From Python, any ``torch.utils.data.Dataset`` yielding ``(image, label)`` can be passed directly.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import multiprocessing
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, default_collate

from .errors import BadImageError, UpvitError
from .tasks import is_text

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
            raise UpvitError(f"unexpected animal-mnist contents {images.shape}/{labels.shape}: "
                             "reinstall animal-mnist==0.4")
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


# ------------------------------------------------------------------------ images at the model's size
def resize_images(images: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """uint8 [N, C0, H0, W0] -> uint8 [N, C, H, W] for a model input (C, H, W): bicubic (antialiased when
    shrinking), grey replicated to 3 channels or RGB averaged to grey (ITU-R 601 weights) as C asks."""
    c, h, w = size
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    out = []
    for chunk in x.split(256):  # bounded memory at 224 px
        chunk = chunk.float()
        if chunk.shape[1] == 3 and c == 1:
            chunk = (chunk * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif chunk.shape[1] == 1 and c == 3:
            chunk = chunk.expand(-1, 3, -1, -1)
        elif chunk.shape[1] != c:
            raise UpvitError(f"cannot feed {chunk.shape[1]}-channel images to a {c}-channel model")
        if tuple(chunk.shape[-2:]) != (h, w):
            chunk = F.interpolate(chunk, size=(h, w), mode="bicubic", align_corners=False,
                                  antialias=h < chunk.shape[-2])
        out.append(chunk.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out).numpy()


def _model_input(data_config: dict[str, Any] | None, default: tuple[int, int, int]
                 ) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    """(input size, mean, std) from a model's data config, or ``default`` with ImageNet statistics."""
    cfg = data_config or {}
    size = tuple(int(v) for v in cfg.get("input_size", default))
    if len(size) != 3 or size[0] not in (1, 3):
        raise UpvitError(f"input_size {list(size)} is not [C, H, W] with 1 or 3 channels")
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)[: size[0]] if size[0] == 3 else (0.5,)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)[: size[0]] if size[0] == 3 else (0.5,)))
    return size, mean, std  # type: ignore[return-value]


def animal_mnist_resized(split: str, data_config: dict[str, Any] | None, augment: bool = False,
                         seed: int = 0) -> tuple[ImageTensorDataset, DataInfo]:
    """``animal-mnist-rgb:SPLIT``: the embedded split at the model's input size and channels (grey
    replicated to 3 channels, resized bicubic), normalised with the model's mean/std. Default (no model):
    3x112x112 with ImageNet statistics, the size a pretrained ViT-S/14 reads as 8x8 patches."""
    indices = animal_mnist_split()
    if split not in indices:
        raise UpvitError(f"unknown animal-mnist-rgb split {split!r}: use train, val or all")
    size, mean, std = _model_input(data_config, (3, 112, 112))
    images, labels = animal_mnist_arrays()
    idx = indices[split]
    ds = ImageTensorDataset(resize_images(images[idx], size), labels[idx], mean, std, augment=augment, seed=seed)
    info = DataInfo(10, list(ANIMAL_MNIST_CLASSES), size, mean, std, 1.0, "bicubic",
                    extra={"dataset": "animal-mnist-rgb", "split": split})
    return ds, info


# ------------------------------------------------------------------------------------------- emoji
EMOJI_ENV = "UPVIT_EMOJI_DIR"
EMOJI_DEFAULT_DIR = os.path.join("data", "emoji")  # where `make emoji` unpacks the npm tarball
EMOJI_DROP = ("Component",)  # skin-tone and hair swatches, not pictures of a category
EMOJI_SPLIT_SEED = 0
EMOJI_VAL_FRACTION = 0.2


def emoji_root() -> str:
    """The unpacked ``emoji-datasource-google`` package: ``$UPVIT_EMOJI_DIR`` or ``data/emoji`` (either the
    folder holding ``package/`` or ``package/`` itself)."""
    root = os.environ.get(EMOJI_ENV) or EMOJI_DEFAULT_DIR
    for cand in (os.path.join(root, "package"), root):
        if os.path.isfile(os.path.join(cand, "emoji.json")):
            return cand
    raise UpvitError(f"no emoji.json under {root!r}: run `make emoji` (npm pack emoji-datasource-google@16.0.0) "
                     f"or set {EMOJI_ENV} to the unpacked package")


def emoji_index(root: str | None = None) -> list[dict[str, Any]]:
    """One record per image: ``file``, ``category``, ``base`` (the base emoji's image, shared by its skin-tone
    variants). Categories in ``EMOJI_DROP`` and entries without a Google image are left out."""
    root = root or emoji_root()
    with open(os.path.join(root, "emoji.json"), encoding="utf-8") as f:
        entries = json.load(f)
    records = []
    for e in entries:
        if e.get("category") in EMOJI_DROP or not e.get("has_img_google"):
            continue
        records.append({"file": e["image"], "category": e["category"], "base": e["image"]})
        for var in (e.get("skin_variations") or {}).values():
            if var.get("has_img_google"):
                records.append({"file": var["image"], "category": e["category"], "base": e["image"]})
    return records


def emoji_split(records: list[dict[str, Any]], seed: int = EMOJI_SPLIT_SEED,
                val_fraction: float = EMOJI_VAL_FRACTION) -> dict[str, list[str]]:
    """Base emoji per split: per category (sorted), its sorted base images permuted by one
    ``default_rng(seed)``, the first ``round(val_fraction * n)`` to ``val``. Variants follow their base, so
    no emoji straddles train and validation."""
    rng = np.random.default_rng(seed)
    bases: dict[str, list[str]] = {}
    for r in records:
        group = bases.setdefault(r["category"], [])
        if r["base"] not in group:
            group.append(r["base"])
    split: dict[str, list[str]] = {"train": [], "val": []}
    for cat in sorted(bases):
        names = sorted(bases[cat])
        order = [names[i] for i in rng.permutation(len(names))]
        n_val = round(val_fraction * len(names))
        split["val"] += sorted(order[:n_val])
        split["train"] += sorted(order[n_val:])
    return split


def read_emoji_images(root: str, files: Sequence[str]) -> np.ndarray:
    """uint8 [N, 3, 64, 64]: each RGBA PNG composited on white."""
    from PIL import Image

    folder = os.path.join(root, "img", "google", "64")
    out = np.empty((len(files), 3, 64, 64), dtype=np.uint8)
    for i, name in enumerate(files):
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as im:
                rgba = im.convert("RGBA")
        except (OSError, ValueError) as e:
            raise BadImageError(f"cannot read emoji image {path} ({type(e).__name__}): "
                                "run `make emoji` again") from None
        if rgba.size != (64, 64):
            rgba = rgba.resize((64, 64), Image.BICUBIC)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out[i] = np.asarray(Image.alpha_composite(white, rgba).convert("RGB")).transpose(2, 0, 1)
    return out


def emoji(split: str, data_config: dict[str, Any] | None = None, root: str | None = None,
          augment: bool = False, seed: int = 0) -> tuple[ImageTensorDataset, DataInfo]:
    """``emoji:train|val|all``: Google's emoji (64x64 RGBA on white) labelled with their 9 categories
    (``Component`` dropped), split by base emoji (see :func:`emoji_split`), resized to the model's input
    (default 3x112x112, ImageNet statistics). No augmentation unless asked: the transform is deterministic,
    so distillation can cache the teacher's outputs."""
    if split not in ("train", "val", "all"):
        raise UpvitError(f"unknown emoji split {split!r}: use train, val or all")
    root = root or emoji_root()
    records = emoji_index(root)
    classes = sorted({r["category"] for r in records})
    if split != "all":
        keep = set(emoji_split(records)[split])
        records = [r for r in records if r["base"] in keep]
    size, mean, std = _model_input(data_config, (3, 112, 112))
    images = resize_images(read_emoji_images(root, [r["file"] for r in records]), size)
    labels = np.array([classes.index(r["category"]) for r in records], dtype=np.int64)
    ds = ImageTensorDataset(images, labels, mean, std, augment=augment, seed=seed)
    ds.files = [r["file"] for r in records]
    info = DataInfo(len(classes), classes, size, mean, std, 1.0, "bicubic",
                    extra={"dataset": "emoji", "split": split, "root": os.path.abspath(root)})
    return ds, info


# ------------------------------------------------------------------------------------ ImageFolder
SKIP_HINT = "replace or remove the file, or pass --skip-bad-images to skip unreadable images"


class CheckedImageFolder(Dataset):
    """An ImageFolder whose unreadable files are one clear error naming the file, or are skipped.

    ``on_bad``:

    * ``"raise"``: :class:`BadImageError` naming the file and the fix;
    * ``"drop"`` (evaluation, proxy sets): the item is ``None``; :func:`collate_readable` leaves it out;
    * ``"substitute"`` (training): the next readable file in folder order (usually the same class)
      stands in, so batches keep their size and distributed ranks stay in step.

    Skipped files are flagged in shared memory, so DataLoader worker processes report them too.
    """

    def __init__(self, folder: Any, on_bad: str = "raise") -> None:
        if on_bad not in ("raise", "drop", "substitute"):
            raise ValueError(f"on_bad must be raise, drop or substitute, not {on_bad!r}")
        self.folder = folder
        self.on_bad = on_bad
        self.root = str(folder.root)
        self.samples = folder.samples
        self.targets = folder.targets
        self.classes = folder.classes
        # one byte per file, in shared memory: visible across fork/spawn DataLoader workers
        self.bad = multiprocessing.RawArray("b", len(folder.samples)) if on_bad != "raise" else None

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Any:
        """The decoded image of file ``index`` (a PIL image), or BadImageError."""
        path = self.samples[index][0]
        try:
            return self.folder.loader(path)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for damaged files
            raise BadImageError(f"cannot read image {path} ({type(e).__name__}: {' '.join(str(e).split())[:100]}): "
                                f"{SKIP_HINT}", path=path) from None

    def _item(self, index: int) -> tuple[Any, int]:
        image = self.read(index)
        if self.folder.transform is not None:
            image = self.folder.transform(image)
        return image, self.samples[index][1]

    def __getitem__(self, index: int) -> Any:
        if self.on_bad == "raise":
            return self._item(index)
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if self.bad[i]:
                if self.on_bad == "drop":
                    return None
                continue
            try:
                return self._item(i)
            except BadImageError:
                self.bad[i] = 1
                if self.on_bad == "drop":
                    return None
        raise UpvitError(f"no image under {self.root} can be read: check the data directory")

    def unreadable(self) -> list[int]:
        """Indices of the files skipped so far (empty in "raise" mode)."""
        if self.bad is None:
            return []
        return np.flatnonzero(np.frombuffer(self.bad, dtype=np.int8)).tolist()

    def scan(self, desc: str = "checking images") -> list[int]:
        """Decode every file once (no transform); returns the unreadable ones and flags them."""
        from .progress import progress

        bad = []
        for i in progress(range(len(self.samples)), desc=desc, leave=False):
            try:
                self.read(i)
            except BadImageError:
                bad.append(i)
                if self.bad is not None:
                    self.bad[i] = 1
        return bad


def collate_readable(batch: list[Any]) -> Any:
    """``default_collate`` of the items that are not ``None`` (dropped unreadable images); ``None``
    when nothing in the batch was readable."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


def image_folders(dataset: Any) -> list[CheckedImageFolder]:
    """The CheckedImageFolder(s) under a dataset and its wrappers (Subset, RemappedLabels)."""
    seen: list[CheckedImageFolder] = []
    while dataset is not None:
        if isinstance(dataset, CheckedImageFolder):
            seen.append(dataset)
            break
        dataset = getattr(dataset, "dataset", None)
    return seen


def unreadable_report(*datasets: Any) -> str | None:
    """One line counting the unreadable files skipped in ``datasets`` (summed over torchrun ranks),
    or None. Collective when distributed: every rank must call it."""
    from . import distributed as dist_utils

    folders = {id(f): f for d in datasets if d is not None for f in image_folders(d)}
    total, first = 0, None
    for folder in folders.values():
        if folder.bad is None:
            continue
        flags = torch.tensor(np.frombuffer(folder.bad, dtype=np.int8).astype(np.int32))
        flags = dist_utils.all_reduce_sum(flags)
        bad = torch.nonzero(flags).flatten().tolist()
        total += len(bad)
        if bad and first is None:
            first = folder.samples[bad[0]][0]
    if not total:
        return None
    return f"skipped {total} unreadable image file{'s' if total != 1 else ''} (first: {first})"


def stack_images(dataset: Dataset, batch_size: int = 256) -> torch.Tensor:
    """All images of a (small) dataset as one tensor, leaving out dropped unreadable files."""
    from torch.utils.data import DataLoader

    chunks = [batch[0] for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                collate_fn=collate_readable) if batch is not None]
    if not chunks:
        raise UpvitError("the proxy set is empty: none of its images could be read")
    return torch.cat(chunks)


# every spelling --data accepts, for the messages that refuse one
DATA_SPELLINGS = ("an ImageFolder directory (one sub-folder of images per class), animal-mnist:train|val|all, "
                  "or for text models shakespeare:train|val|all or text:FILE_OR_DIR")


def image_folder(root: str, data_config: dict[str, Any] | None, train: bool = False,
                 skip_bad_images: bool = False) -> tuple[Dataset, DataInfo]:
    """An ImageNet-layout directory with the model's evaluation (or training) transform.

    ``skip_bad_images``: unreadable files are dropped (evaluation) or replaced by the next readable
    file (training) and counted, instead of stopping with an error naming the file."""
    from ._compat import import_timm

    import_timm()  # patches torchvision where needed
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    check_image_folder(root)
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
        folder = ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise UpvitError(f"cannot read {root!r} as an ImageFolder (one sub-folder of images per class): {e}") from None
    ds = CheckedImageFolder(folder, on_bad=("substitute" if train else "drop") if skip_bad_images else "raise")
    info = DataInfo(len(ds.classes), list(ds.classes), tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                    cfg.get("crop_pct", 0.875), cfg.get("interpolation", "bicubic"),
                    extra={"dataset": os.path.abspath(root)})
    return ds, info


def check_data_spec(spec: str) -> None:
    """Refuse a data spec that cannot name data, without reading any: a path must be an existing directory.
    For commands that may not read their ``--data`` (data-free scorers) but must not accept nonsense."""
    name, colon, rest = spec.partition(":")
    if colon and name in ("animal-mnist", "animal-mnist-rgb", "emoji", "shakespeare"):
        if rest not in ("train", "val", "all"):
            raise UpvitError(f"unknown {name} split {rest!r}: use train, val or all")
        return
    if spec in ("animal-mnist", "shakespeare"):  # the command's default split
        return
    if name == "text" and colon:
        if not os.path.exists(rest):
            raise UpvitError(f"text data {rest!r} does not exist: pass text:FILE_OR_DIR")
        return
    check_image_folder(spec)


def check_image_folder(root: str) -> None:
    """An ImageFolder path must be an existing directory; a single file is never image data."""
    if os.path.isfile(root):
        raise UpvitError(f"data {root!r} is a file, not a directory: pass {DATA_SPELLINGS}")
    if not os.path.isdir(root):
        raise UpvitError(f"data directory {root!r} does not exist: pass {DATA_SPELLINGS}")


def load_data(spec: str, data_config: dict[str, Any] | None = None, train: bool = False, seed: int = 0,
              skip_bad_images: bool = False, tokenizer: Any = None) -> tuple[Dataset, DataInfo]:
    """Resolve a data spec (see module doc). ``train`` turns augmentation on; ``skip_bad_images``
    skips (and counts) unreadable files of an ImageFolder instead of failing on the first. Text specs
    (``shakespeare:SPLIT``, ``text:FILE_OR_DIR``, see :mod:`upvit.text`) are tokenised with
    ``tokenizer`` for the task in ``data_config`` and return a :class:`upvit.text.TextInfo`."""
    from .text import is_text_spec, text_dataset

    if is_text_spec(spec):
        return text_dataset(spec, tokenizer, data_config)
    if is_text((data_config or {}).get("task")):
        fix = f"write text:{spec}" if os.path.exists(spec) else "use shakespeare:SPLIT or text:FILE_OR_DIR"
        raise UpvitError(f"this is a text model, but {spec!r} is image data: {fix}")
    if spec.startswith(("emoji:", "animal-mnist-rgb:")):  # read at the model's input size (issue 23)
        name, _, split = spec.partition(":")
        if name == "emoji":
            return emoji(split, data_config)
        return animal_mnist_resized(split, data_config)
    if spec.startswith("animal-mnist"):
        _, _, split = spec.partition(":")
        ds, info = animal_mnist(split or ("train" if train else "val"), augment=train, seed=seed)
        if data_config is not None:
            expected = list(data_config.get("input_size", info.input_size))
            if expected != list(info.input_size):
                raise UpvitError(
                    f"the model expects input {expected} but animal-mnist images are {list(info.input_size)}: "
                    "use a model built for 1x28x28 input (for a family without an image-size argument, add "
                    "input_size=[1,28,28] to the timm: spec) or an ImageFolder dataset"
                )
        return ds, info
    return image_folder(spec, data_config, train=train, skip_bad_images=skip_bad_images)


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of a dataset without decoding images where the dataset exposes them."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr), dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def sample_proxy(dataset: Dataset, size: int | None = None, per_class: int | None = None,
                 seed: int = 0) -> tuple[Subset, dict[str, Any]]:
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


def stratified_subset(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """At most ``limit`` items drawn evenly from every class (seeded), in dataset order.

    Classes get ``limit // K`` items each, the first ``limit % K`` classes one more, so a quick
    evaluation sees every class instead of the first ``limit`` items (often all of one class).
    """
    if limit is None or limit >= len(dataset):
        return dataset
    labels = dataset_labels(dataset)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    share, extra = divmod(limit, len(classes))
    chosen = []
    for k, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        take = min(len(idx), share + (1 if k < extra else 0))
        chosen.append(rng.choice(idx, take, replace=False))
    return Subset(dataset, np.sort(np.concatenate(chosen)).tolist())


# --------------------------------------------------------------------------------- class names
class RemappedLabels(Dataset):
    """A dataset whose labels are translated to the model's class indices (``mapping[label]``)."""

    def __init__(self, dataset: Dataset, mapping: Sequence[int]) -> None:
        self.dataset = dataset
        self.mapping = list(mapping)
        self.targets = [self.mapping[int(y)] for y in dataset_labels(dataset)]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if item is None:  # a dropped unreadable image
            return None
        return item[0], self.mapping[int(item[1])]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def _preview(names: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(str(x) for x in list(names)[:n])
    return f"{len(names)}: {shown}{', ...' if len(names) > n else ''}"


def parse_class_map(text: str, data_classes: Sequence[str], model_classes: Sequence[str] | None,
                    num_outputs: int | None) -> list[int]:
    """``--class-map`` -> the model's class index for every data class (in data label order).

    Accepted forms: ``by-name`` (each data class is the model class of the same name), inline
    ``FOLDER=CLASS,FOLDER=CLASS`` or a JSON file ``{"FOLDER": "CLASS" or index}``; CLASS is a model
    class name or an output index.
    """
    if text == "by-name":
        if not model_classes:
            raise UpvitError("--class-map by-name needs the model's class names, and its config.json has none: "
                             "map folders to output indices instead, e.g. --class-map cat=3,dog=5")
        pairs = {name: name for name in data_classes}
    elif os.path.isfile(text):
        try:
            with open(text) as f:
                pairs = json.load(f)
        except (OSError, ValueError) as e:
            raise UpvitError(f"--class-map {text}: not a readable JSON file ({e})") from None
        if not isinstance(pairs, dict):
            raise UpvitError(f"--class-map {text}: the JSON must be an object {{\"FOLDER\": \"CLASS\", ...}}")
    else:
        pairs = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise UpvitError(f"--class-map {text!r}: write by-name, FOLDER=CLASS,... or a JSON file")
            pairs[key.strip()] = value.strip()
    unknown = sorted(set(pairs) - set(data_classes))
    if unknown:
        raise UpvitError(f"--class-map names {unknown[0]!r}, which is not a class of the data "
                         f"({_preview(data_classes)})")
    mapping = []
    for name in data_classes:
        if name not in pairs:
            raise UpvitError(f"--class-map does not say which model class the data's {name!r} is")
        target = pairs[name]
        if model_classes and str(target) in model_classes:
            index = list(model_classes).index(str(target))
        elif isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            index = int(target)
        else:
            raise UpvitError(f"--class-map maps {name!r} to {target!r}, which is not a class of the model"
                             + (f" ({_preview(model_classes)})" if model_classes else " (give an output index)"))
        if num_outputs is not None and not 0 <= index < num_outputs:
            raise UpvitError(f"--class-map maps {name!r} to output {index}, but the model has {num_outputs} outputs")
        mapping.append(index)
    return mapping


def align_classes(dataset: Dataset, info: DataInfo, model_classes: Sequence[str] | None, num_outputs: int | None,
                  class_map: str | None = None, data_name: str = "the data") -> Dataset:
    """The dataset with labels in the model's class order, or one clear error when they differ.

    Without ``class_map`` the data's class names must equal the model's (same names, same order);
    a model without recorded names must at least have one output per data class.
    """
    if class_map:
        return RemappedLabels(dataset, parse_class_map(class_map, info.class_names, model_classes, num_outputs))
    hint = "use data with the model's classes, or map them with --class-map (by-name, FOLDER=CLASS,... or a JSON file)"
    if model_classes:
        if list(model_classes) != list(info.class_names):
            order = " (same names, other order)" if sorted(model_classes) == sorted(info.class_names) else ""
            raise UpvitError(f"the model's classes ({_preview(model_classes)}) differ from those of {data_name} "
                             f"({_preview(info.class_names)}){order}: {hint}")
    elif num_outputs is not None and num_outputs != info.num_classes:
        raise UpvitError(f"the model has {num_outputs} outputs but {data_name} has {info.num_classes} classes: {hint}")
    return dataset
