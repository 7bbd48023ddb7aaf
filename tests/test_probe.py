"""The linear-probe teacher (issue 23): a logistic-regression head on frozen class-token features."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import upvit
from helpers import tiny_vit
from upvit import probe


def test_fit_linear_matches_a_separable_rule_and_knn_hand_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).long() + 2 * (x[:, 1] > 0).long()  # 4 classes, linearly separable
    head = probe.fit_linear(x, y, 4, l2=1e-5)
    assert (head(x).argmax(1) == y).float().mean() >= 0.97
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert probe.knn_top1(train, labels, test, torch.tensor([0, 1]), k=1) == 100.0
    # k=5: every query sees all five neighbours, and class 1 has the majority
    assert probe.knn_top1(train, labels, test, torch.tensor([0, 1]), k=5) == 50.0


def test_probe_writes_a_classifier_equal_to_head_on_features(tmp_path, monkeypatch):
    from upvit.data import DataInfo, ImageTensorDataset

    backbone = tiny_vit(num_classes=0, img_size=16, patch_size=4)
    upvit.save(backbone, str(tmp_path / "bb"))
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 3, 16, 16), dtype=np.uint8), np.arange(40) % 3

    def fake_load_data(spec, cfg, **_):
        part = slice(0, 30) if spec == "fake:train" else slice(30, 40)
        ds = ImageTensorDataset(images[part], labels[part], [0.5] * 3, [0.5] * 3)
        return ds, DataInfo(3, ["a", "b", "c"], (3, 16, 16), (0.5,) * 3, (0.5,) * 3)

    monkeypatch.setattr("upvit.data.load_data", fake_load_data)
    assert probe.main([str(tmp_path / "bb"), "--data", "fake:train", "--val-data", "fake:val",
                       "--out", str(tmp_path / "t")]) == 0
    model = upvit.load(str(tmp_path / "t"))
    assert model.upvit_config.class_names == ["a", "b", "c"] and model.num_classes == 3
    report = json.loads((tmp_path / "t" / "probe.json").read_text())
    ds, _ = fake_load_data("fake:val", None)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    feats, _ = probe.features(backbone, ds)
    head, _ = upvit.io.load_tensors(str(tmp_path / "t" / "head.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), feats @ head["weight"].T + head["bias"], rtol=1e-4, atol=1e-5)
        top1 = float((model(x).argmax(1) == torch.as_tensor(labels[30:])).float().mean() * 100)
    assert report["val_top1"] == pytest.approx(top1, abs=0.01)
    assert probe.main([str(tmp_path / "t"), "--data", "fake:train", "--val-data", "fake:val",
                       "--out", str(tmp_path / "u")]) == 2  # already a classifier
    # the saved head attached to the backbone again gives the same classifier, without features
    assert probe.main([str(tmp_path / "bb"), "--head", str(tmp_path / "t" / "head.safetensors"),
                       "--out", str(tmp_path / "v")]) == 0
    again = upvit.load(str(tmp_path / "v"))
    assert again.upvit_config.class_names == ["a", "b", "c"]
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("task, classes", [("dinov2_emoji", 9), ("dinov2_animal", 10)])
def test_shipped_heads_fit_vit_s(task, classes):
    import os

    import upvit as pkg
    from upvit.io import load_tensors

    path = os.path.join(os.path.dirname(pkg.__file__), "assets", task, "head.safetensors")
    tensors, meta = load_tensors(path)
    assert tensors["weight"].shape == (classes, 384) and tensors["bias"].shape == (classes,)
    names = json.loads(meta["classes"])
    assert len(names) == classes and "Component" not in names
    with open(os.path.join(os.path.dirname(path), "probe.json")) as f:
        assert json.load(f)["classes"] == names  # the record beside the head describes this head
