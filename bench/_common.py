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


def time_alternately(fns: dict[str, Callable[[int], T]], repeats: int, min_seconds: float = 0.0
                     ) -> dict[str, list[tuple[T, float]]]:
    """``(result, seconds)`` of ``fn(round)`` for every function and round. The functions take turns, in reversed
    order every other round, so drifts in a shared machine's load hit all of them alike; rounds continue past
    ``repeats`` until each function has run ``min_seconds`` in total (short runs are mostly timer noise)."""
    runs: dict[str, list[tuple[T, float]]] = {name: [] for name in fns}
    total = lambda name: sum(seconds for _, seconds in runs[name])  # noqa: E731
    rounds = 0
    while rounds < repeats or min(total(name) for name in fns) < min_seconds:
        for name in (list(fns) if rounds % 2 == 0 else list(fns)[::-1]):
            runs[name].append(timed(lambda: fns[name](rounds)))
        rounds += 1
    return runs


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
