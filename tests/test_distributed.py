"""Leaving the process group: after a successful command every rank meets at a barrier and destroys
the group (a rank that exits without it can abort its peers); after a failure the group is left
alone, since the other ranks may never reach the barrier."""
from __future__ import annotations

import torch.distributed as dist

from helpers import tiny_vit
from upvit import distributed, save
from upvit.cli import main


def _init_single(tmp_path) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def test_shutdown_destroys_the_group_and_is_idempotent(tmp_path):
    _init_single(tmp_path)
    assert dist.is_initialized()
    distributed.shutdown()
    assert not dist.is_initialized()
    distributed.shutdown()  # nothing to leave: no error
    assert not dist.is_initialized()


def test_main_leaves_the_group_only_after_success(tmp_path, capsys):
    _init_single(tmp_path)
    try:
        assert main(["eval", str(tmp_path / "missing-model"), "--data", "animal-mnist:val"]) == 2
        assert dist.is_initialized(), "a failed command must not wait at a barrier the other ranks may never reach"
        assert "missing-model" in capsys.readouterr().err
        save(tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10), str(tmp_path / "m"))
        assert main(["eval", str(tmp_path / "m"), "--data", "animal-mnist:val", "--batch-size", "500"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
