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


# ---- will it fit? -------------------------------------------------------------------------------------------


def sampling_bytes(model_config, rows: int, positions: int, bytes_per_value: int) -> int | None:
    """A lower bound on the memory that sampling ``rows`` sequences of ``positions`` tokens at once holds: the
    key/value cache of every layer and one step's float32 logits (the model, activations and copies come on top).
    None for a model whose config does not give its shape."""
    try:
        layers = int(model_config.num_hidden_layers)
        heads = int(model_config.num_attention_heads)
        kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(model_config, "head_dim", None) or model_config.hidden_size // heads)
        vocab = int(model_config.vocab_size)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    return 2 * layers * kv_heads * head_dim * positions * rows * bytes_per_value + rows * vocab * 4


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """What the process's cgroup (v2) still allows, where it sets a limit."""
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_bytes(device) -> int | None:
    """Memory a run on ``device`` can still take (a GPU's free memory; on a CPU the system's available memory and
    free swap, capped by a cgroup limit); None where it cannot be known."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    system = _meminfo_bytes("MemAvailable")
    if system is None:
        return None
    system += _meminfo_bytes("SwapFree") or 0
    headroom = _cgroup_headroom()
    return system if headroom is None else min(system, headroom)


def check_sampling_fits(model, cfg, shortest_prompt: int, device) -> None:
    """UserError when the training batch's sampling alone needs more memory than there is (``sampling_bytes``, a lower
    bound, against ``available_bytes``): said before the first step instead of a MemoryError minutes later."""
    from moalign.errors import UserError

    r = cfg.rollout
    rows = r.prompts_per_step * r.group_size
    positions = shortest_prompt + r.max_new_tokens - 1
    need = sampling_bytes(model.config, rows, positions, 4 if cfg.precision == "fp32" else 2)
    have = available_bytes(device)
    if need is None or have is None or need <= have:
        return
    raise UserError(f"rollout.prompts_per_step × rollout.group_size = {r.prompts_per_step} × {r.group_size} = {rows} "
                    f"sequences sampled at once need at least {need / 1e9:.1f} GB (key/value cache over {positions} "
                    f"positions, and the logits) but {have / 1e9:.1f} GB is available; lower rollout.group_size, "
                    f"rollout.prompts_per_step or rollout.max_new_tokens")
