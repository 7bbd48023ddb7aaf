"""Start-up shim: makes ``import torchvision`` (hence ``import timm``) work on CPU-only hosts.

Installed into the virtual environment's site-packages by ``make`` (tools/install_shim.py), next to
``upvit-torchvision-shim.pth``, whose one line imports this module when an interpreter of the
environment starts. Why: the PyPI torchvision wheel is a CUDA build; without the CUDA libraries its
compiled ops do not load, and ``torchvision/_meta_registrations.py`` then dies on
``operator torchvision::nms does not exist`` (upvit/_compat.py explains the same cure for upvit's
own imports).

Start-up cost: one finder on ``sys.meta_path`` that never finds anything. While torchvision's own
``__init__`` imports its submodules, right after ``torchvision.extension`` has tried to load the
compiled ops, the finder asks that module whether they loaded; only if they did not does it declare
the two schemas (no kernels) that the meta registrations need, and then it steps aside. It needs
neither upvit nor a guess of its own: torchvision's verdict decides. Any failure is swallowed, since
a start-up file must never break the interpreter.
"""
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class _DeclareTorchvisionOps:
    done = False
    library = None  # kept alive: the declarations die with it

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if cls.done or not name.startswith("torchvision."):
            return None
        has_ops = getattr(sys.modules.get("torchvision.extension"), "_has_ops", None)
        if has_ops is None:
            return None  # torchvision.extension has not run yet
        cls.done = True
        try:
            if not has_ops():
                import torch

                missing = {n: s for n, s in _SCHEMAS.items() if not hasattr(torch.ops.torchvision, n)}
                if missing:
                    cls.library = torch.library.Library("torchvision", "FRAGMENT")
                    for schema in missing.values():
                        cls.library.define(schema)
        except Exception:
            pass
        return None  # the normal finders import the submodule


try:
    if not any(getattr(f, "__name__", "") == _DeclareTorchvisionOps.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _DeclareTorchvisionOps)
except Exception:
    pass
