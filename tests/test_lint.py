"""ruff is clean (the rules in pyproject.toml: unused imports and variables, import order, statement errors, lines
over 120 characters);
`make test` runs the same check before pytest."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    pytest.importorskip("ruff")  # the dev extra (make test installs it)
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("length, fails", [(120, False), (121, True)])
def test_line_length_is_enforced(length, fails):
    """E501 is on at 120 characters (pyproject.toml), for every file."""
    pytest.importorskip("ruff")
    line = "x = 1  # " + "y" * (length - len("x = 1  # "))
    assert len(line) == length
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--stdin-filename",
                           "upvit/_line_length_probe.py", "-"], cwd=REPO, input=line + "\n", capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode != 0) == fails, proc.stdout + proc.stderr
    assert ("E501" in proc.stdout) == fails, proc.stdout
