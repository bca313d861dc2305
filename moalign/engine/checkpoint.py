"""Atomic checkpoints: ``run_dir/checkpoints/step_<N>/state.pt`` written to a temporary file, fsync'ed, renamed.

A checkpoint holds everything needed to continue a run exactly: trainable weights, optimizer, weighting and
objective state, RNG states, data position and the byte offset of ``metrics.jsonl`` at that step (lines written
later are dropped on resume, so the file never holds a duplicated step).

Fault injection (crash tests only): ``MOALIGN_FAULT=<label>`` makes the process SIGKILL itself when it reaches the
``fault_point`` of that label: ``sample:<step>``, ``update:<step>`` and ``export:<step>`` in the trainer, and
``write:<file name>`` here, between writing a temporary file and renaming it (``write:step_0000002.pt``). Unset,
the hook does nothing.

Reading runs no code: ``load_checkpoint`` uses ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers only, with numpy's array reconstruction allow-listed (the numpy RNG state is an array). A checkpoint that
names any other Python object is refused (``UnsafeCheckpoint``) without running it; one that cannot be read
(``UnreadableCheckpoint``: empty, truncated, corrupt) is moved aside by ``load_latest_intact``, which resumes from
the newest intact one."""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

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


class UnsafeCheckpoint(UserError):
    """A checkpoint that names Python objects loading would have to run."""


class UnreadableCheckpoint(UserError):
    """A checkpoint that is empty, truncated or corrupt (or not a checkpoint)."""


def _numpy_array_globals() -> list:
    """What unpickling a numpy array calls: its reconstruction function, ndarray and the dtypes."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)}
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


def load_checkpoint(path: Path, required: Iterable[str] = ()) -> dict[str, Any]:
    """The state saved in ``path``, read without running code (module docstring); ``required``: keys it must hold."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports a torn file as EOFError, OSError, KeyError, struct.error, RuntimeError…
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsupported:
            raise UnsafeCheckpoint(
                f"checkpoint {path} refers to {unsupported.group(1)}, which loading it would have to run (nothing "
                f"was run): moalign's checkpoints hold only tensors and plain values, so another program wrote it or "
                f"it was altered; delete it to resume from the checkpoint before it, or start the run again with "
                f"--overwrite (if you trust it, resume it with the moalign version that wrote it)") from None
        detail = (f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}" if str(exc).strip() else
                  "the file is empty" if path.stat().st_size == 0 else type(exc).__name__)
        raise UnreadableCheckpoint(f"checkpoint {path} cannot be read ({detail})") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise UnreadableCheckpoint(f"checkpoint {path} is not a moalign checkpoint (it lacks {', '.join(missing)})")
    return state


def load_latest_intact(run_dir: Path, required: Iterable[str] = (), warn: Callable[[str], None] = print
                       ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, and its state; None when there is none. Unreadable newer ones are renamed
    ``<name>.unreadable`` (out of the checkpoint sequence, so they are neither resumed nor kept in place of an intact
    one) and ``warn`` is told; when none can be read, nothing is moved and the error says so. An unsafe one stops
    here (UnsafeCheckpoint): a run directory holding one was tampered with, and no older checkpoint of it is trusted
    silently."""
    found = sorted(checkpoint_dir(run_dir).glob("step_*.pt"))
    unreadable = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path, required)
        except UnreadableCheckpoint as exc:
            unreadable.append((path, exc))
            continue
        for bad, exc in unreadable:
            aside = bad.with_name(bad.name + ".unreadable")
            os.replace(bad, aside)
            warn(f"warning: {exc}; moved aside as {aside.name}, resuming from {path.name}")
        return path, state
    if found:
        raise UserError(f"no checkpoint in {checkpoint_dir(run_dir)} can be read ({unreadable[0][1]}); start the "
                        f"run again with --overwrite")
    return None
