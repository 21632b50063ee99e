"""The machine a measurement ran on, and how busy other processes kept it: shared by the bench and the rehearsal."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Instruction sets that decide fp32 GEMM and int8 speed on x86 (/proc/cpuinfo names): without VNNI (AVX-512 or
# AVX-VNNI) int8 GEMM gains little over fp32; AMX adds int8 and bf16 tile units.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def machine_info() -> dict:
    """CPU model, cores, memory, library versions, load average."""
    # Imported here so that a record can name the versions of what the measured processes ran.
    import onnxruntime
    import psutil
    import torch
    import transformers

    cpu, flags = platform.processor() or "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not flags:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "pillow": Image.__version__,
        "load_average_start": list(os.getloadavg()),
    }


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall time, busy CPU seconds of the whole machine, CPU seconds of this process and its waited children)."""
    import psutil

    c = psutil.cpu_times()
    me = psutil.Process().cpu_times()
    busy = c.user + c.system + c.nice + getattr(c, "irq", 0.0) + getattr(c, "softirq", 0.0)
    return time.time(), busy, me.user + me.system + me.children_user + me.children_system


def others_percent(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Share of the machine's CPU (percent of all cores) used by other processes between two snapshots."""
    wall = max(after[0] - before[0], 1e-9)
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, 100.0 * others / wall / (os.cpu_count() or 1))
