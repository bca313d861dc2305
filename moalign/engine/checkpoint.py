"""Atomic checkpoints: ``run_dir/checkpoints/step_<N>/state.pt`` written to a temporary file, fsync'ed, renamed.

A checkpoint holds everything needed to continue a run exactly: trainable weights, optimizer, weighting and
objective state, RNG states, data position and the byte offset of ``metrics.jsonl`` at that step (lines written
later are dropped on resume, so the file never holds a duplicated step)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

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


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write checkpoint {path}: {exc.strerror or exc} (free disk space and resume with "
                        f"`moalign train --resume {path.parent.parent.parent}`)") from None


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
