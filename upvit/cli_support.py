"""What keeps the CLI's contract: one line per error, validated numbers, deferred warnings, devices.

* :class:`OneLineParser` reports an argument error as ``upvit CMD: error: ...`` (one line, exit 2)
  instead of argparse's usage block; :class:`DefaultsFormatter` shows every real default in ``--help``.
* ``positive_int`` and friends are argparse ``type=`` callables, so a bad number is refused before
  any model or data is loaded.
* :func:`warn` queues a one-line warning; the queue is printed when a command commits to its long
  work (:func:`flush_warnings`) or succeeds, and dropped when it fails, so an error case prints only
  the error.
* :func:`check_device` turns ``--device cuda`` on a machine without CUDA into one clear line.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from .errors import UpvitError

# ------------------------------------------------------------------------------------- parsing


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]):
        # CPython's argparse drops a lone "--" value (`--batch-size=--`) and stores an empty list
        # without calling the option's type; refuse it like any missing value.
        if action.option_strings and arg_strings == ["--"] and action.nargs in (None, argparse.ONE_OR_MORE):
            self.error(f"argument {'/'.join(action.option_strings)}: expected a value, got '--'")
        return super()._get_values(action, arg_strings)


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to options that have a real default (not None, not a False flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False or default is argparse.SUPPRESS
                or not action.option_strings or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _number(kind: type, text: str) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(kind: type, test: Callable[[float], bool], words: str) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = _number(kind, text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}")
        return value

    parse.__name__ = words.replace(" ", "_")  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer of at least 1")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer of at least 0")
positive_float = _checked(float, lambda v: v > 0, "a positive number")
nonneg_float = _checked(float, lambda v: v >= 0, "a number of at least 0")
fraction = _checked(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
rate = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_unit = _checked(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def one_line(text: str) -> str:
    """A message as one line. A DataLoader worker re-raises an error with the worker's traceback
    in its message; only the original error's own last line is kept."""
    text = str(text)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and "Error" in head else last
    return " ".join(text.split())


# ------------------------------------------------------------------------------------- warnings
_PENDING: list[str] = []
_PRINTED: set[str] = set()  # lines this command already printed: a warning is said once


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK; warnings come from rank 0 only


def warn(message: str) -> None:
    """Queue a one-line warning (printed by :func:`flush_warnings`, dropped if the command fails)."""
    line = one_line(message)
    if line not in _PENDING and line not in _PRINTED:
        _PENDING.append(line)


def flush_warnings() -> None:
    """Print the queued warnings now (call it where a command starts its long work)."""
    while _PENDING:
        line = _PENDING.pop(0)
        _PRINTED.add(line)
        if _main_rank():
            print(f"upvit: warning: {line}", file=sys.stderr, flush=True)


def drop_warnings() -> None:
    _PENDING.clear()


def start_command() -> None:
    """Forget the warnings of an earlier command run in this process (tests call ``main`` repeatedly)."""
    _PENDING.clear()
    _PRINTED.clear()
    _RANDOM.clear()


# ------------------------------------------------------------------------------------- devices
def check_device(spec: str | None) -> None:
    """Refuse a device this machine does not have, in one line (None means: the default device)."""
    if spec is None:
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UpvitError(f"--device {spec!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UpvitError(f"--device {spec}: this machine has no usable CUDA device: use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UpvitError(f"--device {spec}: this machine has {count} CUDA device(s), numbered from 0")
        return
    if device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UpvitError(f"--device {spec}: MPS is not available on this machine: use --device cpu")
        return
    raise UpvitError(f"--device {spec}: upvit runs on cpu, cuda or mps devices")


_RANDOM: set[str] = set()  # specs already warned about


def random_weights_warning(spec: str, checkpoint: str | None, flag: str = "--checkpoint") -> None:
    """A ``timm:NAME`` model without a checkpoint has random weights: say so (queued, one line)."""
    if spec.startswith("timm:") and not checkpoint:
        name = spec.split(",", 1)[0]
        if spec in _RANDOM:  # the same spec as another model of the command (a student and its teacher)
            return
        _RANDOM.add(spec)
        warn(f"{name} has random weights (no {flag} given): pass {flag} FILE for trained weights")
