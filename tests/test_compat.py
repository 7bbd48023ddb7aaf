import subprocess
import sys

import torch

from upvit import _compat


def test_timm_imports_in_a_fresh_interpreter():
    code = "from upvit._compat import import_timm; t = import_timm(); import torchvision; print(t.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]


def test_schemas_declared_only_when_extension_cannot_load(monkeypatch):
    monkeypatch.setattr(_compat, "_library", None)
    monkeypatch.setattr(_compat, "torchvision_extension_loads", lambda: True)
    assert _compat.declare_missing_torchvision_ops() is False
    assert _compat._library is None


def test_declared_ops_exist_where_the_extension_is_missing():
    # declared by the shim on CPU-only hosts, by torchvision's own extension elsewhere
    _compat.import_timm()
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
