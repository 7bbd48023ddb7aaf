"""Overwrite protection: nothing a command did not create is replaced unless the user says so.

Every command that writes a model directory (train, finetune, prune, demo) or a scores file (score)
checks its ``--out`` before it loads anything:

* an output that overlaps an input (the model directory, a checkpoint, the data directory, the
  teacher) is always refused: ``prune MODEL --out MODEL`` would destroy the model it reads;
* a non-empty output directory or an existing scores file is refused unless ``--force`` (or, where
  the command can continue a run, ``--resume``).

The checks compare real paths, so ``./m``, ``m/`` and a symlink to ``m`` are the same directory.

A command that fails removes what it created and cannot resume from (:func:`new_paths` before it
starts, :func:`remove_unfinished` after the failure): a full disk leaves no empty output directory
behind, while a training checkpoint or a partial scoring state is kept for ``--resume``.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterable

from .errors import UpvitError

CHECKPOINT_FILE = "checkpoint.pt"  # the training loop's per-epoch checkpoint (upvit.train)
# what a failed run leaves for --resume: training checkpoints, depth pruning's run record, KL scoring state
RESUMABLE_FILES = (CHECKPOINT_FILE, "run.json")
RESUMABLE_SUFFIX = ".partial"


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(child: str, parent: str) -> bool:
    """True when real path ``child`` is ``parent`` or lies under it."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _existing(inputs: Iterable[str | None]) -> list[str]:
    """The inputs that are paths on disk (``timm:NAME`` and ``animal-mnist:SPLIT`` are not)."""
    return [p for p in inputs if p and os.path.exists(p)]


def check_no_overlap(out: str, inputs: Iterable[str | None], flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of the (existing) inputs."""
    target = _real(out)
    for given in _existing(inputs):
        source = _real(given)
        if _inside(target, source) or (os.path.isdir(target) and _inside(source, target)):
            where = "is" if target == source else ("lies inside" if _inside(target, source) else "contains")
            raise UpvitError(f"{flag} {out} {where} the input {given}: writing there would overwrite what "
                             f"this command reads; choose another {flag}")


def check_output_dir(out: str, force: bool = False, resume: bool = False,
                     inputs: Iterable[str | None] = ()) -> None:
    """Refuse to write a model directory over inputs or over a non-empty directory.

    ``resume``: the command continues a run in ``out`` (train, finetune), so its files are expected.
    ``force``: the user accepts that files in ``out`` are replaced.
    """
    check_no_overlap(out, inputs)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UpvitError(f"--out {out} is a file: give a directory path")
    if resume or force or not os.path.isdir(out) or not os.listdir(out):
        return
    if os.path.isfile(os.path.join(out, CHECKPOINT_FILE)):
        raise UpvitError(f"{out} already holds a training checkpoint: add --resume to continue it, --force to "
                         "start over, or choose a new --out")
    raise UpvitError(f"--out {out} is not empty: choose a new --out, or add --force to overwrite it")


def check_output_file(out: str, force: bool = False, resume: bool = False,
                      inputs: Iterable[str | None] = (), partial_suffix: str | None = ".partial") -> None:
    """Refuse to write a file (scores) over inputs, a directory or an existing file.

    ``resume``: the command continues or verifies the run that wrote ``out``.
    ``partial_suffix``: an interrupted run's state file next to ``out`` also needs --resume or --force.
    """
    check_no_overlap(out, inputs)
    if os.path.isdir(out):
        raise UpvitError(f"--out {out} is a directory: give a file name such as "
                         f"{os.path.join(out, 'scores.safetensors')}")
    if resume or force:
        return
    if os.path.exists(out):
        raise UpvitError(f"{out} already exists: choose another --out, add --resume to continue or verify the "
                         "run that wrote it, or --force to overwrite it")
    if partial_suffix and os.path.exists(out + partial_suffix):
        raise UpvitError(f"an interrupted run left {out + partial_suffix}: add --resume to continue it, or "
                         "--force to start over")


def check_json_path(path: str | None, flag: str = "--json") -> None:
    """A JSON report path must be writable as a file (its folder is created when missing)."""
    if not path:
        return
    if os.path.isdir(path):
        raise UpvitError(f"{flag} {path} is a directory: give a file name such as {os.path.join(path, 'metrics.json')}")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise UpvitError(f"{flag} {path}: {parent} is a file, not a folder")


def discard_stale_checkpoint(out: str) -> None:
    """``--force`` without ``--resume``: the earlier run's checkpoint would make training refuse to
    start, and the user asked to start over."""
    path = os.path.join(out, CHECKPOINT_FILE)
    if os.path.isfile(path):
        os.unlink(path)


def new_paths(outputs: Iterable[str | None]) -> list[str]:
    """For each output path that does not exist yet, the outermost missing folder on its way (or the path
    itself): what the command will create. Call before the command writes anything."""
    created = []
    for path in outputs:
        if not path or os.path.lexists(path):
            continue
        top = os.path.abspath(path)
        while not os.path.lexists(os.path.dirname(top)) and os.path.dirname(top) != top:
            top = os.path.dirname(top)
        if top not in created:
            created.append(top)
    return created


def _resumable(path: str) -> bool:
    """True when ``path`` is or holds state a rerun with ``--resume`` continues from."""
    if os.path.isfile(path):
        return os.path.basename(path) in RESUMABLE_FILES or path.endswith(RESUMABLE_SUFFIX)
    for _, _, files in os.walk(path):
        if any(name in RESUMABLE_FILES or name.endswith(RESUMABLE_SUFFIX) for name in files):
            return True
    return False


def remove_unfinished(created: Iterable[str]) -> list[str]:
    """After a failure: remove each path of ``created`` (from :func:`new_paths`) that exists and holds
    nothing to resume from. Returns the removed paths; a path that cannot be removed is left alone."""
    removed = []
    for path in created:
        if not os.path.lexists(path) or _resumable(path):
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError:
            pass  # the error being reported matters more than this leftover
    return removed
