"""Give freed tensor memory back to the system after sampling and at the end of each step.

An RL step allocates and frees many tensors of a few to a few hundred megabytes (activations, logits, gradients).
glibc's ``malloc`` serves blocks above its mmap threshold with ``mmap`` and unmaps them on ``free``, but it *raises*
that threshold (up to 32 MB) each time such a block is freed. After the first step most activations therefore live
in the heap, which only shrinks from its top: the freed space between live blocks stays resident. On the default job
(SmolLM2-135M) that was ≈ 1.7 GB of the 4.6 GB resident between phases, and a 6.3 GB peak.

``trim_heap`` (glibc's ``malloc_trim(0)``, which also releases whole free pages in the middle of the heap) after
sampling and at the end of each step (``trainer.PhaseTimer``) brings the resident set back to ≈ 2.6 GB. The passes
between (reference, update, post-update) reuse each other's freed pages; trimming after every phase made them fault
those pages in again (1.03 M vs 0.80 M minor faults per default step, the same peak). Released pages are faulted
back in when they are used again; for a small process that is time spent on memory nobody misses, so the trainer
trims only while the process holds more than ``TRIM_ABOVE_BYTES``. The alternative, a fixed 1 MB mmap threshold,
saved a little more memory but made every large allocation fault in fresh pages: 2.5× the system time and ≈ 15 %
slower updates (``python bench/step.py``, docs/performance.md). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Callable

TRIM_ABOVE_BYTES = 1 << 30


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Return the heap's free pages to the system; ``True`` if any were returned."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


def resident_bytes() -> int | None:
    """The process's resident set size now (Linux), ``None`` where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def trim_heap_if_large(threshold: int = TRIM_ABOVE_BYTES) -> bool:
    """``trim_heap`` when the process holds more than ``threshold`` bytes; ``True`` if pages were returned."""
    resident = resident_bytes()
    return resident is not None and resident > threshold and trim_heap()
