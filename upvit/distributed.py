"""torch.distributed plumbing shared by scoring and training (gloo on CPU, nccl on GPU).

Started by ``torchrun``, which sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; with none set, every
helper here degrades to the single-process case.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_if_needed() -> bool:
    """Initialise the default process group when launched by torchrun. Returns True if distributed."""
    if env_world_size() <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly at the end of a successful command: a barrier first, so no
    rank tears its gloo/nccl connections down while another still writes or communicates (a rank
    that exits early, or without destroying the group, can abort its peers with "terminate called
    without an active exception"). Not called after an error: the other ranks may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place where distributed); returns it."""
    if is_distributed():
        if dist.get_backend() == "nccl" and t.device.type == "cpu":
            moved = t.to(default_device())
            dist.all_reduce(moved)
            t.copy_(moved.cpu())
        else:
            dist.all_reduce(t)
    return t
