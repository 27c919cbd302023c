"""The machine a benchmark ran on, written into every bench/results/*.json (shared by the bench scripts)."""

from __future__ import annotations

import os
import platform
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def environment(**extra: Any) -> dict[str, Any]:
    """Python, platform, CPU model and count, torch/numpy versions and threads, thread variables, plus ``extra``."""
    import numpy as np
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        **extra,
        "thread_env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
    }
