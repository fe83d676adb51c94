"""One line describing the machine a benchmark or training run measured (no side effects on import)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_line() -> str:
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = info
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
    except OSError:
        pass
    amx = " (AMX)" if "amx_bf16" in flags else ""
    n = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} cores{amx}, torch {torch.__version__}, {n} thread{'s' if n > 1 else ''}, "
            f"Python {platform.python_version()}")
