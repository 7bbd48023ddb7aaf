"""A headless timm backbone (``num_classes=0``: the forward gives the pooled embedding), task-agnostic path of
issue 23 item 5: scored by 1 - cos of the embedding (not KL of a softmax over features), pruned (with
compensation), distilled label-free on its embedding, and evaluated by kNN top-1."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import upvit
from helpers import tiny_images, tiny_swin, tiny_vit
from importance.naive_vit import functional_vit, sliced_params
from plan_helpers import random_scores
from upvit.adapters import get_adapter
from upvit.errors import UpvitError


def naive_cos_score(model: torch.nn.Module, images: torch.Tensor, key: str, channel: int) -> float:
    """sum over images of 1 - cos(e, e'), e the original's embedding and e' the embedding of the model with
    ``channel`` of ``key`` genuinely sliced out (hand-written functional ViT, float64, no masks, no engine).
    A removed residual channel is absent from e': it enters the cosine as 0 at its place."""
    patch, scale = model.patch_embed.patch_size[0], model.blocks[0].attn.head_dim ** -0.5
    with torch.no_grad():
        e = functional_vit(*sliced_params(model), images, patch, scale)
        e1 = functional_vit(*sliced_params(model, key, channel), images, patch, scale)
    if key == "res.0":
        e1 = torch.cat([e1[:, :channel], torch.zeros_like(e1[:, :1]), e1[:, channel:]], 1)
    return float((1 - F.cosine_similarity(e, e1, dim=-1)).sum())


CHANNELS = [("res.0", 3), ("res.0", 17), ("attn.0", 5), ("attn.1", 22), ("ffn.0", 7), ("ffn.1", 40)]


def test_headless_vit_is_scored_by_one_minus_cos_of_its_embedding():
    """The defect: a headless ViT's exact scores were the KL of a softmax over its raw features. Now the
    exact engine and the shared reference engine (greedy's first round) give sum of 1 - cos == naive."""
    model = tiny_vit(num_classes=0)
    images = tiny_images(6)
    adapter = get_adapter(model)
    assert adapter.divergence == "cosine" and get_adapter(tiny_vit()).divergence == "kl"
    scores = upvit.score(model, images, method="kl")
    assert scores.meta["criterion"] == "1 - cos" and scores.meta["divergence"] == "cosine"
    for key, c in CHANNELS:
        ref = naive_cos_score(model, images, key, c)
        assert ref > 1e-4  # the removal matters: the comparison can fail
        assert float(scores[key][c]) == pytest.approx(ref, rel=1e-4, abs=1e-7), (key, c)
    from upvit.importance.greedy import JointKL

    joint = JointKL(adapter, images, "res.0")
    first = joint.removals(torch.ones(24, dtype=torch.float64), torch.tensor([3, 17]))
    torch.testing.assert_close(first, scores["res.0"][[3, 17]], rtol=1e-5, atol=1e-9)


def test_headless_estimates_refuse_in_one_line():
    model, images = tiny_vit(num_classes=0), tiny_images(4)
    for method, options in (("fisher", {}), ("hybrid", {"ratios": [0.5]})):
        with pytest.raises(UpvitError, match="cosine divergence of its embeddings: use method 'kl'"):
            upvit.score(model, images, method=method, **options)
    with pytest.raises(UpvitError, match="needs a classifier's logits and labels"):
        upvit.score(model, images, method="taylor", labels=[0, 1, 0, 1])
    with pytest.raises(UpvitError, match="global_pool='token' or 'avg'"):
        get_adapter(tiny_vit(num_classes=0, global_pool=""))  # per-token output: no one embedding


def _zero_hidden(model: torch.nn.Module, block: torch.nn.Module, kind: str, j: int) -> torch.nn.Module:
    """A copy of ``model`` in which ``block``'s FFN hidden unit j (its fc1 row and bias: GELU(0) = 0) or
    attention dim j (its q, k and v rows and biases) is zeroed by hand."""
    new = copy.deepcopy(model)
    name = next(n for n, m in model.named_modules() if m is block)
    blk = new.get_submodule(name)
    with torch.no_grad():
        if kind == "ffn":
            blk.mlp.fc1.weight[j] = 0
            blk.mlp.fc1.bias[j] = 0
        else:
            a = blk.attn.qkv.out_features // 3
            for r in (j, a + j, 2 * a + j):
                blk.attn.qkv.weight[r] = 0
                blk.attn.qkv.bias[r] = 0
    return new


def test_headless_swin_is_scored_by_one_minus_cos_too():
    """Same rule for timm Swin: exact scores == 1 - cos of the model's own forward with the unit's weights
    zeroed by hand."""
    model = tiny_swin(num_classes=0)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert get_adapter(model).divergence == "cosine"
    scores = upvit.score(model, images, method="kl")
    blocks = [blk for layer in model.layers for blk in layer.blocks]
    with torch.no_grad():
        e = model(images).double()
        for key, j in (("ffn.0", 3), ("ffn.2", 10), ("attn.1", 2), ("attn.3", 5)):
            kind, b = key.split(".")
            e1 = _zero_hidden(model, blocks[int(b)], kind, j)(images).double()
            ref = float((1 - F.cosine_similarity(e, e1, dim=-1)).sum())
            assert ref > 1e-6
            assert float(scores[key][j]) == pytest.approx(ref, rel=1e-3, abs=1e-8), key


# ---------------------------------------------------------------------------------- label-free distillation
def _teacher_student(seed: int = 0):
    teacher = tiny_vit(num_classes=0, seed=seed)
    plan = upvit.make_plan(teacher, random_scores(teacher), embed_dim=16, num_heads=4, mlp_hidden=32)
    return teacher, upvit.prune(teacher, plan, compensate="none"), plan


def test_label_free_feature_loss_equals_a_hand_computation():
    from upvit.distill import EmbeddingFeatureDistillation, feature_channels_from_plan

    teacher, student, plan = _teacher_student()
    channels = feature_channels_from_plan(student, teacher)
    assert channels == plan.keep["res.0"] and len(channels) == 16
    crit = EmbeddingFeatureDistillation(teacher, student, channels, alpha=3.0)
    x = tiny_images(4, seed=5)
    emb = student(x)
    loss, parts = crit(emb, x, torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        s = emb.detach().double().numpy()
        t = teacher(x).double().numpy()[:, channels]  # the teacher's embedding at the kept channels
    mse = np.mean((s - t) ** 2)
    assert mse > 1e-3
    assert parts["mse"] == pytest.approx(mse, rel=1e-5) and loss.item() == pytest.approx(3.0 * mse, rel=1e-5)
    for labels in (torch.tensor([3, 2, 1, 0]), torch.tensor([999, -5, 7, 0]), None):  # labels are never read
        assert crit(emb, x, labels)[0].item() == loss.item()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(UpvitError, match="matches 3 teacher channels"):
        EmbeddingFeatureDistillation(teacher, student, [0, 1, 2])
    with pytest.raises(UpvitError, match="needs a headless student and teacher"):
        EmbeddingFeatureDistillation(tiny_vit(), tiny_vit())


def _unlabelled(labels, n: int = 12, augment: bool = False):
    from upvit.data import ImageTensorDataset

    rng = np.random.default_rng(0)
    return ImageTensorDataset(rng.integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8), np.asarray(labels),
                              [0.5] * 3, [0.5] * 3, augment=augment, seed=0)


def test_finetune_a_headless_student_label_free(tmp_path):
    """Two steps of ``distill='features'`` on a pruned headless ViT: the loss is alpha x MSE only, the student
    changes, its embedding moves towards the teacher's, and the data's labels do not matter (two runs with
    different labels give the same loss and weights). The teacher cache (deterministic data) gives the same."""
    from upvit.train import TrainConfig

    teacher, student0, plan = _teacher_student()
    cfg = TrainConfig(epochs=1, batch_size=6, lr=2e-3, warmup_epochs=0, ema_decay=None, amp="off", seed=0)  # 2 steps
    x = torch.stack([_unlabelled(np.zeros(12, dtype=int))[i][0] for i in range(12)])
    keep = plan.keep["res.0"]

    def gap(model):
        with torch.no_grad():
            return float(F.mse_loss(model(x), teacher(x)[:, keep]))

    runs = []
    for name, labels, cache in (("a", np.zeros(12, dtype=int), "auto"), ("b", np.arange(12) * 37, False)):
        student = copy.deepcopy(student0)
        record = upvit.finetune(student, teacher, _unlabelled(labels), cfg, str(tmp_path / name), alpha=20.0,
                                distill="features", cache_teacher=cache)
        runs.append((record, student))
    (rec_a, st_a), (rec_b, st_b) = runs
    assert "train_ce" not in rec_a and rec_a["train_loss"] == pytest.approx(20.0 * rec_a["train_mse"], rel=1e-5)
    assert rec_a["train_loss"] == rec_b["train_loss"]
    assert all(torch.equal(a, b) for a, b in zip(st_a.state_dict().values(), st_b.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(st_a.state_dict().values(), student0.state_dict().values()))
    assert gap(st_a) < gap(student0)
    saved = upvit.load(str(tmp_path / "a")).upvit_config.extra["distillation"]
    assert saved["criterion"] == "feature_distillation" and saved["channels"] == keep and saved["teacher_cache"]
    assert upvit.load(str(tmp_path / "b")).upvit_config.extra["distillation"]["teacher_cache"] is False


def test_headless_finetune_refuses_logits_and_validation(tmp_path):
    from upvit.train import TrainConfig

    teacher, student, _ = _teacher_student()
    cfg = TrainConfig(epochs=1, batch_size=6, amp="off")
    data = _unlabelled(np.zeros(12, dtype=int))
    with pytest.raises(UpvitError, match="use --distill features"):
        upvit.finetune(student, teacher, data, cfg, str(tmp_path / "a"))
    with pytest.raises(UpvitError, match="knn-train"):
        upvit.finetune(student, teacher, data, cfg, str(tmp_path / "b"), distill="features", val_data=data)


def test_certificate_divergence_of_a_pruned_headless_model():
    """The defect: prune's report compared a 24-wide source embedding with a 16-wide pruned one (a crash). The
    pruned embedding is placed at the channels its plan kept: the sum of 1 - cos equals a hand computation and
    the masked source's (the model that scoring compared)."""
    from plan_helpers import plan_masks
    from upvit.certificate import proxy_divergence

    teacher, student, plan = _teacher_student()
    x = tiny_images(5, seed=3)
    got = proxy_divergence(teacher, student, x)
    assert got["criterion"] == "1 - cos" and got["samples"] == 5
    with torch.no_grad():
        e, placed = teacher(x).double(), torch.zeros(5, 24, dtype=torch.float64)
        placed[:, plan.keep["res.0"]] = student(x).double()
        masked = get_adapter(teacher).forward(x, plan_masks(teacher, plan)).double()
    want = float((1 - F.cosine_similarity(e, placed, dim=-1)).sum())
    assert want > 1e-3 and got["sum"] == pytest.approx(want, rel=1e-5)
    assert got["sum"] == pytest.approx(float((1 - F.cosine_similarity(e, masked, dim=-1)).sum()), rel=1e-4)


# ---------------------------------------------------------------------------------- kNN evaluation, the CLI path
def naive_knn_top1(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, k: int) -> float:
    """kNN top-1 (%) written out: cosine similarity, the k most similar training images vote, ties in the vote go
    to the lowest label."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    right = 0
    for x, y in zip(val_x, val_y):
        sims = a @ (x / np.linalg.norm(x))
        votes = np.bincount(train_y[np.argsort(-sims)[:k]], minlength=int(train_y.max()) + 1)
        right += int(np.argmax(votes) == y)
    return 100.0 * right / len(val_y)


def _folders(tmp_path):
    from helpers import write_image_folder

    train, val = tmp_path / "train", tmp_path / "val"
    write_image_folder(train, classes=("a", "b", "c"), per_class=4, size=16, seed=0)
    write_image_folder(val, classes=("a", "b", "c"), per_class=3, size=16, seed=1)
    return str(train), str(val)


def test_knn_eval_of_a_pruned_headless_backbone_equals_a_naive_knn(tmp_path):
    from helpers import assert_one_line_error, run_main
    from upvit.data import load_data

    _, student, _ = _teacher_student()
    upvit.save(student, str(tmp_path / "s"))
    train, val = _folders(tmp_path)
    out = tmp_path / "knn.json"
    r = run_main("eval", str(tmp_path / "s"), "--data", val, "--knn-train", train, "--knn-k", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    cfg = student.upvit_config.data_config
    (tr, _), (va, _) = load_data(train, data_config=cfg), load_data(val, data_config=cfg)

    def embed(ds):  # the model's own forward: a headless model returns its embedding
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            return student(x).double().numpy(), np.array([ds[i][1] for i in range(len(ds))])

    (xtr, ytr), (xva, yva) = embed(tr), embed(va)
    assert xtr.shape[1] == 16  # narrower than the teacher's 24
    assert got["knn_top1"] == pytest.approx(naive_knn_top1(xtr, ytr, xva, yva, 3), abs=1e-9)
    assert got["k"] == 3 and got["n"] == 9 and got["train_images"] == 12 and got["feature_dim"] == 16
    assert f"kNN@3 top-1 {got['knn_top1']:.2f}%" in r.stdout
    assert_one_line_error(run_main("eval", str(tmp_path / "s"), "--data", val), "--knn-train TRAIN_DATA")
    assert_one_line_error(run_main("eval", str(tmp_path / "s"), "--data", val, "--knn-train", train, "--knn-k", "13"),
                          "larger than the 12 images")
    from helpers import write_image_folder

    write_image_folder(tmp_path / "other", classes=("a", "z"), per_class=2, size=16)
    assert_one_line_error(run_main("eval", str(tmp_path / "s"), "--data", val, "--knn-train", str(tmp_path / "other")),
                          "have different classes")


def test_the_cli_path_score_prune_finetune_knn(tmp_path):
    """score (exact 1 - cos) -> prune (--compensate lsq on the --data proxy) -> finetune --distill features (labels
    of the folder unused) -> eval --knn-train, on a tiny headless ViT; the pruned model reloads with the same
    embedding, and the finetuned one differs from it."""
    from helpers import run_main
    from upvit.data import load_data

    train, val = _folders(tmp_path)
    teacher = tiny_vit(num_classes=0)
    t, s, ft = str(tmp_path / "t"), str(tmp_path / "s"), str(tmp_path / "ft")
    upvit.save(teacher, t)
    scores = str(tmp_path / "scores.safetensors")
    r = run_main("score", t, "--data", train, "--proxy-size", "8", "--out", scores)
    assert r.returncode == 0 and "1 - cos" in r.stdout, r.stdout + r.stderr
    r = run_main("prune", t, "--scores", scores, "--embed-dim", "16", "--num-heads", "4", "--mlp-hidden", "32",
                 "--compensate", "lsq", "--data", train, "--proxy-size", "8", "--out", s)
    assert r.returncode == 0, r.stderr
    student = upvit.load(s)  # and the certificate's fresh-process reload through timm passed (report.json)
    assert student.num_classes == 0 and student.embed_dim == 16
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["proxy_divergence"]["criterion"] == "1 - cos" and report["reload"]
    comp = student.upvit_config.extra["compensation"]  # the attention proj and fc2 layers refitted, none worse
    assert comp["mode"] == "lsq" and {layer["name"].split(".")[-1] for layer in comp["layers"]} == {"proj", "fc2"}
    assert all(layer["error_after"] <= layer["error_before"] for layer in comp["layers"])
    x = torch.stack([load_data(val, data_config=student.upvit_config.data_config)[0][i][0] for i in range(3)])
    r = run_main("finetune", s, "--teacher", t, "--data", train, "--distill", "features", "--epochs", "1",
                 "--batch-size", "6", "--lr", "1e-3", "--out", ft)
    assert r.returncode == 0, r.stderr
    tuned = upvit.load(ft)
    assert tuned.upvit_config.extra["distillation"]["criterion"] == "feature_distillation"
    with torch.no_grad():
        assert not torch.equal(tuned(x), student(x))
    r = run_main("eval", ft, "--data", val, "--knn-train", train)
    assert r.returncode == 0 and "kNN@10 top-1" in r.stdout, r.stderr
