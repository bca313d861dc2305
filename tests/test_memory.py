"""``trim_heap`` gives the heap's freed holes back to the system (what keeps a training step's resident set low)."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from moalign.engine.memory import trim_heap

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    big = torch.ones(16 << 20, dtype=torch.uint8)
    del big  # glibc raises its mmap threshold past 16 MB: the blocks below now come from the heap
    blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(50)]  # 200 MB, every page touched
    before = rss()
    del blocks[::2]  # 100 MB freed in holes between live blocks
    freed = rss()
    trimmed = trim_heap() if sys.argv[1] == "trim" else None
    print(trimmed, (before - freed) / 2**20, (before - rss()) / 2**20)
""")


def released_mib(mode: str) -> tuple[str, float, float]:
    """(trim_heap's result, MiB returned by the frees alone, MiB returned after trim_heap) in a fresh process."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    result, freed, trimmed = out.stdout.split()
    return result, float(freed), float(trimmed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_trim_heap_returns_holes_between_live_blocks():
    result, freed, trimmed = released_mib("trim")
    assert freed < 30  # the problem: glibc keeps the holes resident
    assert result == "True" and trimmed > 90  # the 100 MB of holes are back with the system


def test_small_processes_are_not_trimmed(monkeypatch):
    import moalign.engine.memory as memory

    calls = []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append(1) or True)
    assert memory.resident_bytes() > 0
    assert memory.trim_heap_if_large(threshold=1 << 50) is False and calls == []
    assert memory.trim_heap_if_large(threshold=0) is True and calls == [1]


def test_phase_timer_trims_only_where_asked(monkeypatch):
    """The step trims after sampling and at its end; the passes between reuse each other's freed pages."""
    import moalign.engine.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "trim_heap_if_large", lambda: calls.append(1) or True)
    timer = trainer.PhaseTimer()
    with timer("update"):
        pass
    assert calls == []
    with timer("sample", trim=True):
        pass
    assert calls == [1]
    with timer("update"):
        pass
    assert set(timer.seconds) == {"update", "sample"} and calls == [1]
