import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UPVIT_NO_PROGRESS", "1")

import torch  # noqa: E402  (after the environment above)

# The intra-op thread count the suite was started with (OMP_NUM_THREADS). A test module that sets
# another one at import, or a test that does not restore it, silently runs every later test of the
# session with that count: `OMP_NUM_THREADS=2 pytest` would then test one thread only.
THREADS = torch.get_num_threads()


_CHANGED_BY: list[str] = []  # the first collected file after which the count differed


def pytest_collectreport(report):
    if torch.get_num_threads() != THREADS and not _CHANGED_BY:
        _CHANGED_BY.append(report.nodeid)


def pytest_collection_finish(session):
    if torch.get_num_threads() != THREADS:
        raise pytest.UsageError(f"{_CHANGED_BY[0] if _CHANGED_BY else 'a test module'} changed torch's thread count "
                                f"at import ({THREADS} -> {torch.get_num_threads()}): "
                                "set it in a fixture that restores it")


@pytest.fixture(autouse=True)
def thread_count_restored(request):
    """Fail a test that leaves torch's thread count changed (and restore it for the next test)."""
    yield
    now = torch.get_num_threads()
    if now != THREADS:
        torch.set_num_threads(THREADS)
        pytest.fail(f"{request.node.nodeid} left torch's thread count at {now} (the session runs {THREADS}): "
                    "restore it, e.g. in a fixture", pytrace=False)


@pytest.fixture
def one_thread():
    """One intra-op thread for a test of tiny forwards (fastest there, and steady on a loaded machine), restored
    afterwards so the session keeps its count; modules take it with ``pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _ReloadHere:
    """Stands in for the ``subprocess.Popen`` of :class:`upvit.certificate.ReloadCheck`: runs the same child code
    (the stock class's reload, nothing of upvit) in this interpreter when waited for, with the child's exit status
    and last stderr line."""

    def __init__(self, args, **_):
        self.code, self.argv, self.returncode = args[2], list(args[3:]), None

    def communicate(self, timeout=None):
        import sys

        if self.returncode is not None:
            return None, ""
        saved, sys.argv = sys.argv, ["-c", *self.argv]
        stderr = ""
        try:
            exec(compile(self.code, "<reload-check>", "exec"), {"__name__": "__main__"})
            self.returncode = 0
        except SystemExit as e:  # the child's own failure message, as its stderr
            self.returncode = 0 if e.code in (None, 0) else 1
            stderr = "" if isinstance(e.code, int) or e.code is None else str(e.code)
        except Exception as e:  # what a crashing child prints last
            self.returncode, stderr = 1, f"{type(e).__name__}: {e}"
        finally:
            sys.argv = saved
        return None, stderr

    def poll(self):
        return self.returncode

    def kill(self):
        self.returncode = -9 if self.returncode is None else self.returncode


@pytest.fixture(autouse=True)
def reload_check_in_this_process(request, monkeypatch):
    """Every `prune` and `finetune` certifies its output by reloading it through the stock class in a fresh
    interpreter (upvit.certificate), which costs seconds of importing torch, timm and transformers per call. Tests
    outside test_certificate.py (which tests the fresh process itself) run that same reload code in this process."""
    if request.module.__name__.rsplit(".", 1)[-1] != "test_certificate":
        import subprocess
        import types

        import upvit.certificate as certificate

        fake = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in ("PIPE", "DEVNULL", "TimeoutExpired")},
                                     Popen=_ReloadHere)
        monkeypatch.setattr(certificate, "subprocess", fake)
    yield
