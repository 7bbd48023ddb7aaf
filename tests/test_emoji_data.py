"""``emoji:SPLIT`` and ``animal-mnist-rgb:SPLIT`` (issue 23), on a tiny emoji package this test writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from upvit.data import emoji, emoji_index, emoji_split, load_data, resize_images
from upvit.errors import UpvitError

CATS = ("Animals & Nature", "Flags", "People & Body")


def _png(path, rgba):
    Image.fromarray(np.asarray(rgba, dtype=np.uint8), "RGBA").save(path)


@pytest.fixture
def emoji_dir(tmp_path, monkeypatch):
    """10 base emoji per category (People & Body with 2 skin variants each) + one Component swatch."""
    img = tmp_path / "package" / "img" / "google" / "64"
    img.mkdir(parents=True)
    entries, rng = [], np.random.default_rng(0)
    for c, cat in enumerate(CATS):
        for k in range(10):
            name = f"{c:02x}{k:02x}.png"
            colour = rng.integers(0, 256, (64, 64, 4))
            colour[..., 3] = 255
            _png(img / name, colour)
            entry = {"image": name, "category": cat, "has_img_google": True}
            if cat == "People & Body":
                entry["skin_variations"] = {}
                for tone in ("1F3FB", "1F3FF"):
                    vname = f"{c:02x}{k:02x}-{tone.lower()}.png"
                    _png(img / vname, colour)
                    entry["skin_variations"][tone] = {"image": vname, "has_img_google": True}
            entries.append(entry)
    _png(img / "swatch.png", np.full((64, 64, 4), 200))
    entries.append({"image": "swatch.png", "category": "Component", "has_img_google": True})
    # a half-transparent red pixel block: composited on white it must be pink, not dark red
    pixel = np.zeros((64, 64, 4))
    pixel[..., 0], pixel[..., 3] = 255, 128
    _png(img / "ghost.png", pixel)
    entries.append({"image": "ghost.png", "category": "Flags", "has_img_google": True})
    (tmp_path / "package" / "emoji.json").write_text(json.dumps(entries))
    monkeypatch.setenv("UPVIT_EMOJI_DIR", str(tmp_path))
    return tmp_path / "package"


def test_index_drops_component_and_keeps_variants(emoji_dir):
    records = emoji_index(str(emoji_dir))
    assert len(records) == 10 + 11 + 30 and all(r["category"] != "Component" for r in records)
    assert sum(r["base"] != r["file"] for r in records) == 20


def test_split_by_base_emoji_is_seeded_and_disjoint(emoji_dir):
    records = emoji_index(str(emoji_dir))
    split = emoji_split(records)
    assert split == emoji_split(records)  # seeded
    assert not set(split["train"]) & set(split["val"])
    assert len(split["val"]) == 2 + 2 + 2  # round(0.2 * 10 or 11) per category
    train_ds, _ = emoji("train", {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
    val_ds, info = emoji("val", {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
    assert len(train_ds) + len(val_ds) == 51 and info.class_names == sorted(CATS)
    base = {r["file"]: r["base"] for r in records}
    assert not {base[f] for f in train_ds.files} & {base[f] for f in val_ds.files}  # variants never straddle


def test_images_composited_on_white_at_the_model_size(emoji_dir):
    ds, info = load_data("emoji:all", {"input_size": [3, 16, 16], "mean": [0.0] * 3, "std": [1.0] * 3})
    i = ds.files.index("ghost.png")
    x, y = ds[i]
    assert x.shape == (3, 16, 16) and info.class_names[y] == "Flags"
    # alpha 128/255 red over white: (255, 127, 127) / 255
    torch.testing.assert_close(x[:, 8, 8], torch.tensor([1.0, 127 / 255, 127 / 255]), atol=2 / 255, rtol=0)


def test_missing_folder_and_bad_split_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("UPVIT_EMOJI_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UpvitError, match="make emoji"):
        load_data("emoji:train", None)
    with pytest.raises(UpvitError, match="use train, val or all"):
        emoji("test")


def test_resize_images_channels_and_identity():
    grey = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    rgb = resize_images(grey, (3, 8, 8))
    assert rgb.shape == (2, 3, 8, 8) and (rgb[:, 0] == grey).all() and (rgb[:, 2] == grey).all()
    up = resize_images(np.full((1, 1, 4, 4), 77, np.uint8), (1, 12, 12))
    assert (up == 77).all()  # a constant image stays constant through bicubic resizing


def test_animal_mnist_rgb_follows_the_model():
    ds, info = load_data("animal-mnist-rgb:val", {"input_size": [3, 56, 56], "mean": [0.5] * 3, "std": [0.25] * 3})
    x, _ = ds[0]
    assert x.shape == (3, 56, 56) and len(ds) == 2000 and info.num_classes == 10
    torch.testing.assert_close(x[0], x[1])  # grey replicated
    ref, _ = load_data("animal-mnist:val", None)
    raw = ref[0][0] * 0.4056 + 0.2725  # back to [0, 1]
    small = torch.nn.functional.avg_pool2d((x[0] * 0.25 + 0.5)[None, None], 2)[0, 0]
    assert (small - raw[0]).abs().mean() < 0.05  # the same picture, twice the size
