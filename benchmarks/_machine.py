"""The machine a benchmark ran on, recorded with its results (numbers from a shared 2-core box need it)."""
from __future__ import annotations

import os
import platform

import torch


def machine() -> dict:
    """CPU model, cores, torch's thread count and version, the GPU if any, the load average at the call."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "loadavg_1_5_15": [round(x, 2) for x in load] if load else None, "python": platform.python_version()}
