"""The demo end to end, at test size (a tiny random teacher; the shipped teacher is exercised by `make demo`)."""
import json
import os

import pytest
import torch

from upvit.demo import DemoConfig, SharedTeacher, run_demo
from upvit.errors import UpvitError
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
    shapes = {"S": {"embed_dim": 24, "num_heads": 6, "mlp_hidden": 48},
              "T": {"embed_dim": 12, "num_heads": 3, "mlp_hidden": 24}}
    cfg = DemoConfig.quick(teacher=str(tmp_path / "teacher"), out=str(tmp_path / "out"), shapes=shapes, proxy_size=8)
    report = run_demo(cfg)
    names = [r["model"] for r in report["rows"]]
    assert names[0] == "teacher" and len(names) == 9
    assert {n for n in names[1:]} == {f"{s}-{k}" for s in ("upvit", "magnitude", "random", "scratch") for k in "ST"}
    for r in report["rows"][1:]:
        want = shapes[r["shape"]]
        d, h = want["embed_dim"], want["mlp_hidden"]
        # params of a 2-block ViT at (d, h) with 10 classes, 16 patches of 7x7x1, class token
        expected = (49 * d + d + d + 17 * d + 2 * (4 * d + 3 * d * d + 3 * d + d * d + d + d * h + h + h * d + d)
                    + 2 * d + d * 10 + 10)
        assert r["params"] == expected, r
        assert 0 <= r["top1"] <= 100 and r["images_per_second"] > 0
    # the before-fine-tuning accuracy with and without compensation, for every pruned student
    for r in report["rows"][1:]:
        by_mode = r["top1_before_by_compensation"]
        if r["selection"] == "scratch":
            assert by_mode is None
        else:
            assert set(by_mode) == {"none", "lsq"} and by_mode["none"] == r["top1_before"]
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


def _row(selection, shape, top1, macs):
    model = "teacher" if selection == "-" else f"{selection}-{shape}"
    return {"model": model, "selection": selection, "shape": shape, "top1": top1, "macs": macs,
            "images_per_second": 100.0 + top1}  # noisy throughput: must not move the points


def test_plot_puts_each_shape_at_its_macs_labels_every_point_and_explains_shapes(tmp_path):
    import matplotlib.pyplot as plt

    from upvit.demo import plot_figure, plot_report

    macs = {"B": 138_000_000, "S": 36_000_000, "T": 9_000_000}
    rows = [_row("-", "B", 96.5, macs["B"])]
    rows += [_row(sel, shape, 70.0 + 0.2 * i + 20 * j, macs[shape])  # close accuracies within a shape
             for i, sel in enumerate(("upvit", "magnitude", "random", "scratch")) for j, shape in enumerate("ST")]
    shapes = {"S": {"embed_dim": 96, "num_heads": 6, "mlp_hidden": 384},
              "T": {"embed_dim": 48, "num_heads": 3, "mlp_hidden": 192}}
    fig = plot_figure(rows, shapes)
    ax = fig.axes[0]
    drawn = {}  # (x, y) of every marker drawn, from the figure's data lines
    for line in ax.get_lines():
        for x, y in zip(line.get_xdata(), line.get_ydata()):
            drawn[float(y)] = float(x)
    for r in rows:  # every model sits at its shape's MACs, whatever its measured throughput
        assert drawn[r["top1"]] == r["macs"], r
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == len(rows)
    for r in rows:
        name = "teacher" if r["selection"] == "-" else r["model"].replace("upvit", "UP-ViT")
        assert f"{name} {r['top1']:.1f}%" in labels, (r, labels)
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "B = the teacher's own shape" in caption and "S = embed 96 / 6 heads / MLP 384" in caption
    assert "T = embed 48 / 3 heads / MLP 192" in caption and "no error bars" in caption
    # labels of one shape are stacked apart (no two closer than the spacing), not on top of each other
    for shape in "ST":
        ys = sorted(t.xyann[1] for t in ax.texts if t.get_text().split(" ")[0].endswith(f"-{shape}"))
        assert len(ys) == 4 and min(b - a for a, b in zip(ys, ys[1:])) > 1.0
    plt.close(fig)
    # the PNG is redrawn from a report's JSON alone
    (tmp_path / "demo.json").write_text(json.dumps({"rows": rows, "config": {"shapes": shapes}}))
    plot_report(str(tmp_path / "demo.json"), str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_shows_the_seeds_mean_and_min_max_as_error_bars():
    import matplotlib.pyplot as plt

    from upvit.demo import plot_figure, plot_points

    rows = [_row("upvit", "T", y, 9_000_000) for y in (70.0, 71.0, 75.0)] + [_row("upvit", "S", 90.0, 36_000_000)]
    points = {p["shape"]: p for p in plot_points(rows)}
    assert points["T"]["y"] == 72.0 and (points["T"]["low"], points["T"]["high"], points["T"]["n"]) == (70.0, 75.0, 3)
    assert points["S"]["n"] == 1 and points["S"]["low"] == points["S"]["high"] == 90.0
    assert points["T"]["label"] == "UP-ViT-T 72.0%, 3 seeds"
    fig = plot_figure(rows)
    ax = fig.axes[0]
    (container,) = ax.containers
    segments = container.lines[2][0].get_segments()  # one vertical bar per point, from min to max
    bars = sorted((float(s[0][0]), float(s[0][1]), float(s[1][1])) for s in segments)
    assert bars == [(9_000_000, 70.0, 75.0), (36_000_000, 90.0, 90.0)]
    assert "min-max over seeds (up to 3)" in " ".join(t.get_text() for t in fig.texts)
    plt.close(fig)
    with pytest.raises(UpvitError, match="differ in MACs"):
        plot_points([_row("upvit", "T", 70.0, 9), _row("upvit", "T", 71.0, 10)])
