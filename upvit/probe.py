"""A downstream teacher from a pretrained backbone: a linear classifier on its frozen class-token features.

``python -m upvit.probe BACKBONE_DIR --data emoji:train --val-data emoji:val --out DIR`` (``make
dinov2-teacher``) reads the backbone (an upvit model directory with ``num_classes=0``, e.g. the converted
DINOv2 ViT-S/14), computes its features once (the class token after the final norm: exactly what a timm
classification head reads with ``global_pool="token"``), fits a multinomial logistic regression on them
(full-batch L-BFGS, fixed L2 weight, no tuning on the validation set), and writes the backbone with the
fitted head as a classification model directory (``num_classes`` = the data's classes), plus ``head.safetensors``
(the head alone: small enough to ship) and ``probe.json`` (accuracies, timings, the split's files).

``upvit eval MODEL --data VAL --knn-train TRAIN [--knn-k 10]`` measures any backbone (a bare or pruned one
included) by kNN top-1 on its features (:func:`knn_eval`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import UpvitError


@torch.no_grad()
def features(model: nn.Module, dataset: Dataset, batch_size: int = 64,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-logits features [N, D], labels [N]) of a timm model: ``forward_head(..., pre_logits=True)`` (a
    headless backbone's output embedding; a classifier's pooled input of its head), on CPU in float32.
    ``device``: where the model runs (default: where its parameters are)."""
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        raise UpvitError(f"features are read from a timm model (forward_features / forward_head); this "
                         f"{type(model).__name__} has none: use a timm backbone or classifier")
    if device is not None:
        model.to(device)
    where = next(model.parameters()).device
    model.eval()
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = x.to(where)
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-4, steps: int = 200) -> nn.Linear:
    """Multinomial logistic regression on standardised-free features: mean CE + ``l2`` * ||W||^2 (bias free),
    L-BFGS from zero. Deterministic."""
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.requires_grad_(False)


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             k: int = 10) -> float:
    """kNN top-1 (%) with cosine similarity, majority vote of the ``k`` nearest (ties: the lowest label)."""
    a, b = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    idx = (b @ a.T).topk(k, dim=1).indices
    votes = F.one_hot(train_y[idx], int(train_y.max()) + 1).sum(1)
    return float((votes.argmax(1) == test_y).double().mean() * 100)


def knn_eval(model: nn.Module, train: Dataset, val: Dataset, k: int = 10, batch_size: int = 64,
             device: torch.device | str | None = None) -> dict[str, Any]:
    """kNN@``k`` top-1 (%) of a model's features (:func:`features`; any backbone, pruned or not, and any
    timm classifier's pre-logits): every ``val`` image takes the majority label of the ``k`` ``train`` images
    of highest cosine similarity (:func:`knn_top1`). The two sets' labels must use the same classes; the
    model's own classes (if any) are not used. Returns ``knn_top1``, ``k``, ``n`` (val images),
    ``train_images`` and ``feature_dim``."""
    if not isinstance(k, int) or k < 1:
        raise UpvitError(f"--knn-k must be a positive integer, got {k!r}")
    if k > len(train):
        raise UpvitError(f"--knn-k {k} is larger than the {len(train)} images of the kNN training set: "
                         "use a smaller k or more training images")
    xtr, ytr = features(model, train, batch_size, device)
    xva, yva = features(model, val, batch_size, device)
    return {"knn_top1": knn_top1(xtr, ytr, xva, yva, k), "k": k, "n": len(yva), "train_images": len(ytr),
            "feature_dim": int(xtr.shape[1])}


def with_head(backbone: nn.Module, head: nn.Linear, class_names: list[str]) -> nn.Module:
    """A copy of the backbone whose timm head is ``head``; its config says ``num_classes`` and the classes."""
    model = copy.deepcopy(backbone)
    model.reset_classifier(head.out_features)
    model.head.load_state_dict(head.state_dict())
    config = copy.deepcopy(backbone.upvit_config)
    config.kwargs["num_classes"] = head.out_features
    config.class_names = list(class_names)
    model.upvit_config = config
    return model.eval()


def probe(backbone_dir: str, data: str, val_data: str, out_dir: str, l2: float = 1e-4) -> dict[str, Any]:
    """Fit the head, write the classification model directory + ``head.safetensors`` + ``probe.json``."""
    from .data import load_data
    from .io import atomic_write_json, load, save, save_tensors

    backbone = load(backbone_dir)
    if getattr(backbone, "num_classes", None) != 0:
        raise UpvitError(f"{backbone_dir} already has a classifier: pass the bare backbone (num_classes=0)")
    cfg = backbone.upvit_config.data_config
    train, info = load_data(data, cfg)
    val, val_info = load_data(val_data, cfg)
    if val_info.class_names != info.class_names:
        raise UpvitError(f"{data} and {val_data} have different classes")
    t0 = time.time()
    xtr, ytr = features(backbone, train)
    xva, yva = features(backbone, val)
    t_feat = time.time() - t0
    t0 = time.time()
    head = fit_linear(xtr, ytr, info.num_classes, l2)
    t_fit = time.time() - t0
    def acc(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((head(x).argmax(1) == y).float().mean() * 100)

    model = with_head(backbone, head, info.class_names)
    model.upvit_config.extra["probe"] = {"backbone": backbone_dir, "data": data, "l2": l2}
    save(model, out_dir)
    save_tensors(os.path.join(out_dir, "head.safetensors"), {"weight": head.weight, "bias": head.bias},
                 metadata={"classes": json.dumps(info.class_names)})
    report = {
        "backbone": backbone_dir, "data": data, "val_data": val_data, "input_size": list(info.input_size),
        "classes": info.class_names, "train_images": len(train), "val_images": len(val), "l2": l2,
        "train_top1": round(acc(xtr, ytr), 2), "val_top1": round(acc(xva, yva), 2),
        "knn10_val_top1": round(knn_top1(xtr, ytr, xva, yva), 2),
        "feature_seconds": round(t_feat, 1), "fit_seconds": round(t_fit, 1),
        "files": {"train": getattr(train, "files", None), "val": getattr(val, "files", None)},
    }
    atomic_write_json(os.path.join(out_dir, "probe.json"), report)
    return report


def attach(backbone_dir: str, head_file: str, out_dir: str) -> nn.Module:
    """Write the classifier from a backbone and a saved head (``head.safetensors``: ``weight``, ``bias`` and
    the class names in its metadata), without computing any feature: the shipped emoji head
    (``upvit/assets/dinov2_emoji/head.safetensors``) on the converted backbone is the teacher."""
    from .io import load, load_tensors, save

    backbone = load(backbone_dir)
    tensors, meta = load_tensors(head_file)
    if set(tensors) != {"weight", "bias"} or "classes" not in meta:
        raise UpvitError(f"{head_file} is not a head file from upvit.probe (weight, bias and the class names)")
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.shape[1] != backbone.num_features:
        raise UpvitError(f"the head reads {weight.shape[1]} features but the backbone gives {backbone.num_features}")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    model = with_head(backbone, head, json.loads(meta["classes"]))
    model.upvit_config.extra["probe"] = {"backbone": backbone_dir, "head": os.path.basename(head_file)}
    save(model, out_dir)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m upvit.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("backbone", help="model directory of the bare backbone (num_classes=0)")
    p.add_argument("--data", help="training data spec, e.g. emoji:train")
    p.add_argument("--val-data", help="validation data spec, e.g. emoji:val")
    p.add_argument("--head", help="attach this saved head (head.safetensors) instead of fitting one")
    p.add_argument("--out", required=True, help="classification model directory to write")
    p.add_argument("--l2", type=float, default=1e-4, help="L2 weight on the head's weights (default 1e-4)")
    args = p.parse_args(argv)
    try:
        if args.l2 < 0:
            raise UpvitError("--l2 must be non-negative")
        if args.head:
            attach(args.backbone, args.head, args.out)
            print(f"wrote {args.out}: {args.backbone} with the head {args.head}")
            return 0
        if not (args.data and args.val_data):
            raise UpvitError("pass --data and --val-data to fit a head, or --head FILE to attach a saved one")
        r = probe(args.backbone, args.data, args.val_data, args.out, args.l2)
    except UpvitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: linear probe val top-1 {r['val_top1']:.2f}% (train {r['train_top1']:.2f}%, "
          f"kNN@10 {r['knn10_val_top1']:.2f}%) on {r['val_images']} / {r['train_images']} images at "
          f"{r['input_size'][1]} px; features {r['feature_seconds']} s, fit {r['fit_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
