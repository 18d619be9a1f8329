"""What the GPU benchmarks record: the run itself (date, GPU, command, torch), and where a call's
GPU time goes, kernel by kernel (``torch.profiler``, CUDA activity). Imported by the benchmark
scripts, which run as ``python benchmarks/<script>.py`` (this folder is then on sys.path)."""

from __future__ import annotations

import datetime
import sys
from typing import Callable

import torch


def run_meta() -> dict:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(),
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__}


def cuda_kernels(fn: Callable[[], object], calls: int = 1, width: int = 90) -> list[tuple[str, float, int]]:
    """``fn()`` run ``calls`` times under the profiler: one row per kernel, (name cut to ``width``,
    GPU microseconds, launches) summed over the calls, the most time first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key[:width], e.device_time_total, e.count) for e in prof.key_averages() if (e.device_time_total or 0) > 0]
    return sorted(rows, key=lambda r: -r[1])
