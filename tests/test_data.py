import numpy as np
import pytest
import torch

from upvit.data import (
    ANIMAL_MNIST_MEAN,
    ANIMAL_MNIST_STD,
    animal_mnist,
    animal_mnist_arrays,
    animal_mnist_split,
    load_data,
    sample_proxy,
    stratified_split,
)
from upvit.errors import UpvitError


def test_split_sizes_disjoint_and_stratified():
    split = animal_mnist_split()
    _, labels = animal_mnist_arrays()
    train, val = split["train"], split["val"]
    assert len(train) == 8000 and len(val) == 2000
    assert len(np.intersect1d(train, val)) == 0
    assert len(np.union1d(train, val)) == 10000
    assert np.bincount(labels[train], minlength=10).tolist() == [800] * 10
    assert np.bincount(labels[val], minlength=10).tolist() == [200] * 10


def test_split_is_deterministic_and_depends_on_seed():
    labels = animal_mnist_arrays()[1]
    a, b = stratified_split(labels, 200, 0), stratified_split(labels, 200, 0)
    assert np.array_equal(a["val"], b["val"])
    assert np.array_equal(animal_mnist_split()["val"], a["val"])  # the documented split is seed 0
    assert not np.array_equal(stratified_split(labels, 200, 1)["val"], a["val"])


def test_normalisation_constants_match_train_split():
    images = animal_mnist_arrays()[0][animal_mnist_split()["train"]].astype(np.float64) / 255
    assert images.mean() == pytest.approx(ANIMAL_MNIST_MEAN[0], abs=1e-4)
    assert images.std() == pytest.approx(ANIMAL_MNIST_STD[0], abs=1e-4)


def test_eval_items_are_normalised_pixels_and_augmentation_is_seeded():
    ds, info = animal_mnist("val")
    images, labels = animal_mnist_arrays()
    i0 = animal_mnist_split()["val"][3]
    x, y = ds[3]
    expected = (torch.tensor(images[i0], dtype=torch.float32) / 255 - ANIMAL_MNIST_MEAN[0]) / ANIMAL_MNIST_STD[0]
    assert torch.allclose(x[0], expected) and y == labels[i0]
    assert info.input_size == (1, 28, 28) and info.num_classes == 10
    aug, _ = animal_mnist("train", augment=True, seed=0)
    a1, a2 = aug[5][0], aug[5][0]
    assert torch.equal(a1, a2)  # same (seed, epoch, index) -> same image
    aug.set_epoch(1)
    assert not torch.equal(aug[5][0], a1)


def test_proxy_sampling_random_and_per_class():
    ds, _ = animal_mnist("train")
    sub, rec = sample_proxy(ds, size=50, seed=3)
    sub2, _ = sample_proxy(ds, size=50, seed=3)
    assert sub.indices == sub2.indices and len(set(sub.indices)) == 50 and rec["sampling"] == "random"
    sub, rec = sample_proxy(ds, per_class=2, seed=0)
    assert np.bincount(ds.labels[sub.indices].numpy(), minlength=10).tolist() == [2] * 10
    with pytest.raises(UpvitError, match="empty"):
        sample_proxy(ds, size=0)


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(UpvitError, match="does not exist"):
        load_data(str(tmp_path / "nope"))


def test_image_folder_reads_class_dirs(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray((np.ones((20, 20, 3)) * 40 * (i + 1)).astype(np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bilinear"}
    ds, info = load_data(str(tmp_path), data_config=cfg)
    x, y = ds[2]
    assert info.class_names == ["a", "b"] and x.shape == (3, 16, 16) and y == 1
    assert torch.allclose(x, torch.full_like(x, (40 / 255 - 0.5) / 0.5), atol=1e-2)


def test_check_data_spec_refuses_what_cannot_name_data_without_reading_it(tmp_path):
    """Data-free scorers check --data with check_data_spec: the spellings load_data accepts pass, the rest is one
    UpvitError naming the problem (a file, a missing directory, an unknown split, missing text)."""
    from upvit.data import check_data_spec
    from upvit.errors import UpvitError

    (tmp_path / "corpus.txt").write_text("some words")
    for good in ("animal-mnist", "animal-mnist:val", "animal-mnist-rgb:all", "emoji:train", "shakespeare:val",
                 f"text:{tmp_path / 'corpus.txt'}", str(tmp_path)):
        check_data_spec(good)
    for bad, fragment in ((str(tmp_path / "corpus.txt"), "is a file"), (str(tmp_path / "nowhere"), "does not exist"),
                          ("animal-mnist:nosplit", "unknown animal-mnist split"), ("emoji:x", "unknown emoji split"),
                          (f"text:{tmp_path / 'none.txt'}", "text data")):
        with pytest.raises(UpvitError, match=fragment):
            check_data_spec(bad)
