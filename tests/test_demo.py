"""The demo end to end, at test size (a tiny random teacher; the shipped teacher is exercised by `make demo`)."""
import json
import os

import torch

from upvit.demo import DemoConfig, SharedTeacher, run_demo
from upvit.io import save
from upvit.models import load_model


def tiny_teacher(path):
    torch.manual_seed(0)
    model = load_model("timm:vit_base_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,"
                       "embed_dim=48,depth=2,num_heads=12,mlp_ratio=2.0")
    model.upvit_config.data_config.update({"mean": [0.2725], "std": [0.4056]})
    save(model, path)


def test_quick_demo_end_to_end(tmp_path):
    tiny_teacher(str(tmp_path / "teacher"))
    shapes = {"S": {"embed_dim": 24, "num_heads": 6, "mlp_hidden": 48}, "T": {"embed_dim": 12, "num_heads": 3, "mlp_hidden": 24}}
    cfg = DemoConfig.quick(teacher=str(tmp_path / "teacher"), out=str(tmp_path / "out"), shapes=shapes, proxy_size=8)
    report = run_demo(cfg)
    names = [r["model"] for r in report["rows"]]
    assert names[0] == "teacher" and len(names) == 9
    assert {n for n in names[1:]} == {f"{s}-{k}" for s in ("upvit", "magnitude", "random", "scratch") for k in "ST"}
    for r in report["rows"][1:]:
        want = shapes[r["shape"]]
        d, h = want["embed_dim"], want["mlp_hidden"]
        # params of a 2-block ViT at (d, h) with 10 classes, 16 patches of 7x7x1, class token
        expected = 49 * d + d + d + 17 * d + 2 * (4 * d + 3 * d * d + 3 * d + d * d + d + d * h + h + h * d + d) + 2 * d + d * 10 + 10
        assert r["params"] == expected, r
        assert 0 <= r["top1"] <= 100 and r["images_per_second"] > 0
    # every run after the first reuses the teacher's logits for the same batches
    assert report["teacher_cache_hits"] == 7 * 3
    for f in ("demo.md", "demo.json", "demo.png", "scores.safetensors"):
        assert os.path.getsize(tmp_path / "out" / f) > 0
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["rows"] == report["rows"]
    # the quick run's 200 validation images come evenly from the 10 classes (not 200 bears)
    assert report["val_images"] == 200 and report["val_images_per_class"] == [20] * 10


def test_shared_teacher_is_exact_and_caches():
    teacher = torch.nn.Linear(4, 3)
    shared = SharedTeacher(teacher)
    x = torch.randn(5, 4)
    a, b = shared(x), shared(x.clone())
    assert torch.equal(a, teacher(x).detach()) and torch.equal(a, b) and shared.hits == 1
    assert not torch.equal(shared(x + 1), a) and shared.hits == 1
