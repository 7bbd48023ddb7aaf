"""Progress bars (tqdm) that stay quiet on non-zero ranks and when UPVIT_NO_PROGRESS is set."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    from . import distributed as dist_utils

    disable = kwargs.pop("disable", False) or not dist_utils.is_main() or bool(os.environ.get("UPVIT_NO_PROGRESS"))
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=disable, **kwargs)
