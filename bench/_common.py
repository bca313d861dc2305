"""Small helpers shared by the benchmarks: thread setup, timing, the machine's matmul peak, ``name: value`` output."""

from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads (and tell OpenMP/MKL children the same)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), wall-clock seconds)``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def matmul_peak_gflops(size: int = 1024, repeats: int = 10) -> float:
    """Best observed fp32 GFLOP/s of a ``size``³ matmul (2·size³ flops): what a compute-bound forward can reach
    on this machine with the current thread count. The best of ``repeats`` discounts other users' load."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up (allocator, kernel selection)
    best = min(timed(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def report(name: str, value: object) -> None:
    """One ``name: value`` line (floats to 3 significant digits), flushed at once so partial runs still tell."""
    text = f"{value:.3g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else value
    print(f"{name}: {text}", flush=True)
