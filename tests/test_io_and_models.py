import os

import pytest
import torch

from helpers import tiny_images, tiny_vit
from upvit.errors import UpvitError
from upvit.io import load, save
from upvit.models import load_model, parse_timm_spec


@pytest.mark.parametrize("distilled", [False, True])
def test_model_directory_round_trip_is_exact(tmp_path, distilled):
    model = tiny_vit(distilled=distilled)
    save(model, str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    again = load(str(tmp_path / "m"))
    x = tiny_images()
    assert torch.equal(model(x), again(x))
    assert again.upvit_config.timm_kwargs == model.upvit_config.timm_kwargs


def test_timm_spec_parsing():
    name, kwargs = parse_timm_spec("timm:vit_base_patch16_224,img_size=28,mlp_ratio=4.0,global_pool=token,"
                                   "qkv_bias=false")
    assert name == "vit_base_patch16_224"
    assert kwargs == {"img_size": 28, "mlp_ratio": 4.0, "global_pool": "token", "qkv_bias": False}


def test_timm_spec_keeps_list_values_whole():
    name, kwargs = parse_timm_spec("timm:swin_tiny_patch4_window7_224,depths=[2,2,2,2],num_heads=[2, 4],embed_dim=32")
    assert name == "swin_tiny_patch4_window7_224"
    assert kwargs == {"depths": [2, 2, 2, 2], "num_heads": [2, 4], "embed_dim": 32}


def test_timm_spec_builds_the_requested_shape():
    m = load_model("timm:vit_base_patch16_224,img_size=28,patch_size=4,in_chans=1,num_classes=10,embed_dim=48,"
                   "depth=2,num_heads=3")
    assert m.embed_dim == 48 and len(m.blocks) == 2 and m.upvit_config.data_config["input_size"] == [1, 28, 28]
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(UpvitError, match="unknown timm model 'vit_nonexistent_9'"):
        load_model("timm:vit_nonexistent_9")


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(UpvitError, match="not found"):
        load_model(str(tmp_path / "absent"))


def test_corrupt_weights_are_a_clear_error(tmp_path):
    save(tiny_vit(), str(tmp_path / "m"))
    with open(tmp_path / "m" / "model.safetensors", "r+b") as f:
        f.write(b"\x00garbage\xff" * 4)
    with pytest.raises(UpvitError, match="not a readable safetensors file"):
        load(str(tmp_path / "m"))


def test_weights_of_another_shape_are_a_clear_error(tmp_path):
    save(tiny_vit(), str(tmp_path / "m"))
    other = tiny_vit(embed_dim=32)
    save(other, str(tmp_path / "o"))
    os.replace(tmp_path / "o" / "model.safetensors", tmp_path / "m" / "model.safetensors")
    with pytest.raises(UpvitError, match="do not fit the model"):
        load(str(tmp_path / "m"))


def test_timm_spec_input_size_is_upvits_own_key():
    m = load_model("timm:pvt_v2_b0,in_chans=1,num_classes=10,depths=[1,1,1,1],sr_ratios=[4,2,1,1],input_size=[1,28,28]")
    assert m.upvit_config.data_config["input_size"] == [1, 28, 28] and "input_size" not in m.upvit_config.timm_kwargs
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(UpvitError, match=r"write input_size=\[C,H,W\]"):
        load_model("timm:pvt_v2_b0,input_size=28")
