"""Make timm importable on CPU-only hosts with the PyPI torchvision wheel.

The torchvision wheel on PyPI is a CUDA build. On a host without the CUDA libraries its compiled
extension (``torchvision/_C.so``) fails to load, and ``import torchvision`` then dies in
``torchvision/_meta_registrations.py`` with ``operator torchvision::nms does not exist`` because it
registers fake kernels for ``nms`` and ``qnms`` unconditionally. timm imports torchvision, so timm
dies too.

The cure is to declare those two operator schemas (no kernels) before torchvision is imported,
and only when the compiled extension cannot load: where it loads, it defines them itself and
nothing here changes anything. Everything in upvit that imports timm goes through
:func:`import_timm`. For everything else (a plain ``import timm``), the Makefile installs a start-up
shim into the venv (tools/_upvit_torchvision_shim.py) that declares the same schemas while
torchvision imports, once torchvision itself reports that its compiled ops did not load.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: the definitions die with it


def torchvision_extension_loads() -> bool:
    """True when torchvision's compiled extension loads (or torchvision is absent/already imported)."""
    if "torchvision" in sys.modules:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to patch; the import error will say so
    package_dir = list(spec.submodule_search_locations)[0]
    candidates = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, ImportError, RuntimeError):
        return False
    return True


def declare_missing_torchvision_ops() -> bool:
    """Declare ``torchvision::nms``/``qnms`` when the extension cannot load. Returns True if it did."""
    global _library
    if _library is not None or torchvision_extension_loads():
        return False
    if all(hasattr(torch.ops.torchvision, name) for name in _SCHEMAS):
        return False  # declared already (by another copy of this module, or the venv's start-up shim)
    lib = torch.library.Library("torchvision", "FRAGMENT")  # FRAGMENT: coexists with such declarations
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            lib.define(schema)
    _library = lib
    return True


def import_timm():
    """Import and return timm, patching torchvision first where its compiled ops cannot load."""
    declare_missing_torchvision_ops()
    import timm

    return timm
