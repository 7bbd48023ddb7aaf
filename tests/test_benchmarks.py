"""Every benchmark script runs end to end in its ``--smoke`` mode (tiny stand-in models, seconds each).

A benchmark that calls an API the package no longer has fails here instead of months later. A new script
in ``benchmarks/`` needs a row in ``SMOKE`` (the test below refuses one without); one-off investigations
retire to ``benchmarks/archive/`` and are not run.
"""
from __future__ import annotations

import glob
import os
import runpy
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
# script -> (arguments, files its smoke run must write under $UPVIT_BENCH_SMOKE_DIR)
SMOKE = {
    "scoring.py": (["--smoke"], ["scoring/scoring.json", "scoring/scoring.md"]),
    "fast_scoring.py": (["--smoke"], ["fast_scoring/fast_scoring.json", "fast_scoring/fast_scoring.md"]),
    "depth.py": (["--smoke"], ["depth/depth.json", "depth/depth.md"]),
    "swin.py": (["--smoke"], ["swin/swin.json", "swin/swin.md"]),
    "pvtv2.py": (["--smoke"], ["pvtv2/pvtv2.json", "pvtv2/pvtv2.md"]),
    "nlp.py lm": (["lm", "--smoke"], ["nlp/nlp.json", "nlp/nlp.md"]),
    "nlp.py minilm": (["minilm", "--smoke"], ["nlp/nlp.json", "nlp/nlp.md"]),
    "compensation.py": (["--smoke"], ["compensation/compensation.json", "compensation/compensation.md"]),
    "quality.py": (["run", "--smoke", "--shape", "S", "--method", "kl", "kl-whole-lsq", "--budget", "2", "--seed", "0"],
                   ["quality/results/cells/S-kl-ep2-seed0.json",
                    "quality/results/cells/S-kl-whole-lsq-ep2-seed0.json"]),
    "budget_quality.py": (["--smoke"], ["budget_quality/deploy_budget.json", "budget_quality/budget_quality.md"]),
    "deploy.py": (["--smoke"], ["deploy/deploy.json", "deploy/deploy.md"]),
    "real_vit.py": (["run", "--smoke"], ["real_vit/real_vit.json", "real_vit/real_vit.md",
                                         "real_vit/runs/magnitude_ti/eval.json",
                                         "real_vit/runs/magnitude_ti_ft1_s0/log.jsonl"]),
    "real_vit.py agnostic": (["agnostic", "--smoke"], ["real_vit/real_vit_agnostic.json",
                                                       "real_vit/agnostic/knn_kl_after_animal-mnist.json",
                                                       "real_vit/agnostic/knn_magnitude_after_animal-mnist.json"]),
}


# scripts whose --smoke runs live in their own test file (tests/test_scale_benchmarks.py: their smoke modes take
# an --out folder and check the numbers they derive), not in the SMOKE table above
PENDING = {
    "gpu.py": "tests/test_scale_benchmarks.py runs gpu.py --smoke --out DIR",
    "scale.py": "tests/test_scale_benchmarks.py runs scale.py --smoke and checks its derived numbers",
}


def _scripts() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(BENCH, "*.py"))
                  if not os.path.basename(p).startswith("_"))


def test_every_benchmark_has_a_smoke_row():
    covered = {name.split()[0] for name in SMOKE}
    assert not covered & set(PENDING)
    assert sorted(covered | set(PENDING)) == _scripts(), "give every script in benchmarks/ a --smoke row in SMOKE"


class _WriteWatch:
    """Paths under ``folder`` that *this process* opens for writing or renames onto while ``on`` (a Python audit
    hook: ``open`` and ``os.rename``/``os.replace`` events). Unlike comparing modification times, other
    processes (a benchmark running beside the tests) do not count, only the smoke run itself."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def __init__(self) -> None:
        self.on, self.folder, self.hits = False, "", []
        sys.addaudithook(self._hook)  # cannot be removed: it stays idle while ``on`` is False

    def _hook(self, event: str, args: tuple) -> None:
        if not self.on:
            return
        if event == "open":
            path, mode, flags = args
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else bool(isinstance(flags, int) and flags & self.WRITE_FLAGS))
            paths = [path] if writing else []
        elif event == "os.rename":
            paths = [args[1]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                full = os.path.abspath(os.fsdecode(path))
                if full == self.folder or full.startswith(self.folder + os.sep):
                    self.hits.append(full)

    def watching(self, folder: str):
        import contextlib

        @contextlib.contextmanager
        def scope():
            self.on, self.folder, self.hits = True, os.path.abspath(folder), []
            try:
                yield self.hits
            finally:
                self.on = False
        return scope()


WATCH = _WriteWatch()


def test_the_write_watch_sees_this_process_only(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    with WATCH.watching(str(folder)) as hits:
        (folder / "a.json").write_text("{}")
        (tmp_path / "b.tmp").write_text("{}")
        os.replace(tmp_path / "b.tmp", folder / "b.json")
        (tmp_path / "c.json").write_text("{}")  # outside the folder
        (folder / "a.json").read_text()  # reading is not writing
    assert [os.path.basename(h) for h in hits] == ["a.json", "b.json"]


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_smoke_run(name, tmp_path, monkeypatch):
    """The script runs as ``__main__`` in this interpreter (runpy: no start-up importing torch, timm and
    transformers again per script), with its own argv, this checkout's upvit, and sys.path and the thread count
    restored afterwards."""
    args, outputs = SMOKE[name]
    script = os.path.join(BENCH, name.split()[0])
    monkeypatch.setenv("UPVIT_BENCH_SMOKE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "path", [BENCH, *sys.path])  # as `python benchmarks/X.py` puts its folder first
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    with WATCH.watching(os.path.join(BENCH, "results")) as written:
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            assert e.code in (None, 0), f"{name} exited with {e.code}"
        finally:
            torch.set_num_threads(threads)
    for rel in outputs:
        assert os.path.getsize(tmp_path / rel) > 0, rel
    assert not written, f"a smoke run wrote into benchmarks/results/: {written[:3]}"
