"""Atomic checkpoints: ``run_dir/checkpoints/step_<N>/state.pt`` written to a temporary file, fsync'ed, renamed.

A checkpoint holds everything needed to continue a run exactly: trainable weights, optimizer, weighting and
objective state, RNG states, data position and the byte offset of ``metrics.jsonl`` at that step (lines written
later are dropped on resume, so the file never holds a duplicated step).

Fault injection (crash tests only): ``MOALIGN_FAULT=<label>`` makes the process SIGKILL itself when it reaches the
``fault_point`` of that label: ``sample:<step>``, ``update:<step>`` and ``export:<step>`` in the trainer, and
``write:<file name>`` here, between writing a temporary file and renaming it (``write:step_0000002.pt``). Unset,
the hook does nothing."""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from moalign.errors import UserError


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FAULT_ENV = "MOALIGN_FAULT"


def fault_point(label: str) -> None:
    """Die here, as a crash would, if ``MOALIGN_FAULT`` names this point (see the module docstring)."""
    if os.environ.get(FAULT_ENV) == label:
        os.kill(os.getpid(), signal.SIGKILL)


class _KeepWriteError:
    """A file wrapper that remembers the OSError of a failed write: torch.save reports a full disk as an opaque
    RuntimeError ("unexpected pos ..."), and the user needs to hear "No space left on device"."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sink = None
    try:
        with open(tmp, "wb") as f:
            sink = _KeepWriteError(f)
            torch.save(obj, sink)
            f.flush()
            fault_point(f"write:{path.name}")
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        cause = sink.error if sink is not None and sink.error is not None else exc
        if not isinstance(cause, OSError):  # not an I/O problem: a bug, show it
            raise
        raise UserError(f"could not write checkpoint {path}: {cause.strerror or cause} (the previous checkpoint is "
                        f"intact; free disk space and resume with `moalign train --resume "
                        f"{path.parent.parent}`)") from None


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` for ``step`` and keep only the newest ``keep`` checkpoints."""
    root = checkpoint_dir(run_dir)
    path = root / f"step_{step:07d}.pt"
    atomic_torch_save(state, path)
    for old in sorted(root.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    for stray in root.glob(".step_*.tmp"):
        stray.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(checkpoint_dir(run_dir).glob("step_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def remove_run_dir(run_dir: Path) -> None:
    shutil.rmtree(run_dir)
