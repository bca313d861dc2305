"""The heap settings of ``moalign.engine.memory``: freed tensor memory goes back to the system."""

import subprocess
import sys
import textwrap

import pytest

from moalign.engine.memory import limit_heap_growth

PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from moalign.engine.memory import limit_heap_growth

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    applied = limit_heap_growth() if sys.argv[1] == "tuned" else False
    big = torch.ones(16 << 20, dtype=torch.uint8)
    del big  # untuned glibc now serves blocks below 16 MB from the heap
    blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(50)]  # 200 MB, every page touched
    before = rss()
    del blocks[::2]  # 100 MB freed in holes between live blocks
    print(applied, (before - rss()) / 2**20)
""")


def released_mib(mode: str) -> tuple[bool, float]:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    applied, mib = out.stdout.split()
    return applied == "True", float(mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_between_live_ones_return_to_the_system():
    applied, tuned = released_mib("tuned")
    assert applied
    assert tuned > 90  # the 100 MB of holes
    _, untuned = released_mib("untuned")
    assert untuned < 30  # what the settings fix: glibc keeps the holes resident


def test_user_malloc_settings_are_respected(monkeypatch):
    import moalign.engine.memory as memory

    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_heap_growth() is False
