"""Helpers shared by the benchmarks: hardware description and robust timing."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable

import torch
import torch.utils.benchmark as benchmark


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, measured by ``torch.utils.benchmark.Timer``
    (which synchronises CUDA around each call and keeps torch's thread count fixed)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(1).median if repeats == 1 else statistics.median(timer.timeit(1).median for _ in range(repeats))
