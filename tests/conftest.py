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
