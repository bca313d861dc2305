"""The run directory: how ``moalign train`` (either engine) and ``moalign study`` prepare it, lock it, write its
config and summary, and print the summary.

A run directory holds ``config.yaml`` (the resolved config: ``moalign train --config run_dir/config.yaml`` reproduces
the run), ``metrics.jsonl``, ``checkpoints/``, ``model/``, once finished ``summary.json``, and ``.moalign.lock``.

Safety rules (docs/reliability.md):

* **One process per run directory.** ``RunLock`` holds ``fcntl.flock`` on ``.moalign.lock`` while a process
  prepares or trains the run; the file names the holder (pid, host, start time), which a second process is told.
* **Only a run directory is ever deleted.** ``--overwrite`` empties a directory only if it is recognisably a
  moalign run (``is_run_dir``: its lock file, or a ``config.yaml`` holding a run's config), it holds nothing but
  what runs write (``RUN_ENTRIES``), and it is not the working directory, one of its ancestors, the home directory
  or a file-system root. Anything else is a one-line refusal. ``remove_run_entry`` is the one way the engines
  delete inside a run directory.
* **A start that fails on its input removes only what it made**: its own files and the directories it created
  (``PreparedRunDir.abandon``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from moalign.errors import UserError

LOCK_FILE = ".moalign.lock"
# what the engines and the study runner write in a run directory (names starting with "." and ending in ".tmp" are
# their temporary files: .config.yaml.tmp, .summary.json.tmp, .model.tmp)
WARNINGS_FILE = "warnings.log"  # a study run's warnings (study.runner), which `moalign train` prints instead
RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "model", "tensorboard",
                         "error.txt", WARNINGS_FILE, "report", LOCK_FILE})  # report: `moalign report RUN_DIR`'s place


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a crash leaves the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ what a run dir is


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or (name.startswith(".") and name.endswith(".tmp"))


def _holds_a_run_config(path: Path) -> bool:
    from moalign import bounded_yaml

    try:
        config = bounded_yaml.load(path.read_text(encoding="utf-8"), str(path))
    except Exception:  # unreadable, not YAML, too large: not a run's config
        return False
    return isinstance(config, dict) and {"objectives", "weighting", "model"} <= set(config)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` was made by a moalign run: it has the run lock file, or a config.yaml with a run's config."""
    config = path / "config.yaml"
    return (path / LOCK_FILE).is_file() or (config.is_file() and _holds_a_run_config(config))


def _contents(path: Path) -> list[str]:
    """The entries of ``path`` other than the lock file (which an abandoned start may leave)."""
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)


def _protected(run_dir: Path) -> str | None:
    """Why ``run_dir`` must never be emptied, or None."""
    resolved, cwd, home = (Path(os.path.realpath(p)) for p in (run_dir, Path.cwd(), Path.home()))
    if resolved == cwd or resolved in cwd.parents:
        return f"it is the working directory {cwd} or contains it"
    if resolved == home or resolved in home.parents:
        return f"it is the home directory {home} or contains it"
    if resolved.parent == resolved or os.path.ismount(resolved):
        return "it is the root of a file system"
    return None


def check_removable(run_dir: Path) -> None:
    """UserError unless ``run_dir`` may be emptied (the rules of the module docstring)."""
    why = _protected(run_dir)
    if why is None and not is_run_dir(run_dir):
        why = "it is not a moalign run directory (no config.yaml of a run, no .moalign.lock)"
    if why is None:
        foreign = [name for name in _contents(run_dir) if not _is_run_entry(name)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            why = f"it holds files a run does not write ({shown})"
    if why is not None:
        raise UserError(f"--overwrite refuses to empty {run_dir}: {why}; choose another run_dir, or remove it "
                        f"yourself if that is really meant")


def remove_run_entry(run_dir: Path, name: str) -> None:
    """Delete ``run_dir/name``, one of the entries runs write (a link is removed, never followed)."""
    if not _is_run_entry(name) or name == LOCK_FILE:
        raise ValueError(f"{name!r} is not an entry a run writes")  # a bug in the caller, never user input
    path = run_dir / name
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # guarded: a fixed entry name inside a run directory


def clear_run_dir(run_dir: Path) -> None:
    """Empty a run directory (``--overwrite``) after ``check_removable``, keeping the lock file that this process
    holds."""
    check_removable(run_dir)
    for name in _contents(run_dir):
        remove_run_entry(run_dir, name)


# ------------------------------------------------------------------------------------------------ the lock


class RunLock:
    """An exclusive ``fcntl.flock`` on ``run_dir/.moalign.lock``; the file records the holder. Released by
    ``release`` or when the process ends, however it ends (the kernel drops the lock with the file descriptor).
    Where ``fcntl`` does not exist (Windows) it locks nothing."""

    def __init__(self, run_dir: Path, file_name: str = LOCK_FILE):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / file_name
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows)
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write in {self.run_dir}: {exc.strerror or exc}; choose a writable directory"
                            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            raise UserError(f"{self.run_dir} is in use by {describe_holder(holder)}; wait for it to finish or stop "
                            f"it, or choose another directory") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"process {int(info['pid'])} on {info['host']} (started {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


# ------------------------------------------------------------------------------------------------ preparing


class PreparedRunDir:
    """A run directory locked for this process; ``created``: the directories this start made, outermost first."""

    def __init__(self, path: Path, lock: RunLock, created: list[Path]):
        self.path, self.lock, self.created = path, lock, created

    def release(self) -> None:
        self.lock.release()

    def abandon(self) -> None:
        """A start that failed on its input: remove the files it wrote and the directories it created (each only if
        nothing else is in it), then release the lock."""
        for name in ("config.yaml", "metrics.jsonl", LOCK_FILE):
            (self.path / name).unlink(missing_ok=True)
        self.release()
        for folder in reversed(self.created):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break

    def __enter__(self) -> "PreparedRunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _make_dirs(run_dir: Path) -> list[Path]:
    """``mkdir -p run_dir``; the directories it created, outermost first."""
    missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()][::-1]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run directory {run_dir}: {exc.strerror or exc}; choose a writable "
                        f"run_dir") from None
    return missing


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> PreparedRunDir:
    """Create and lock ``run_dir`` for a new run (refusing a directory that has contents, unless ``overwrite``) or
    for resuming one. Nothing is written before every check has passed."""
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: pass only one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir={run_dir} is an existing file, not a directory; choose a directory path")
    occupied = run_dir.is_dir() and bool(_contents(run_dir))
    if occupied and overwrite:
        check_removable(run_dir)
    elif occupied and not resume:
        raise UserError(f"run directory {run_dir} already exists; pass --resume to continue it or --overwrite "
                        f"to replace it (or choose another run_dir=...)")
    created = _make_dirs(run_dir)
    prepared = PreparedRunDir(run_dir, RunLock(run_dir), created)
    try:
        prepared.lock.acquire()
        if overwrite and _contents(run_dir):  # checked again under the lock: another process may have started
            clear_run_dir(run_dir)
        elif not resume and _contents(run_dir):
            raise UserError(f"run directory {run_dir} was just filled by another process; choose another run_dir")
    except UserError:
        if prepared.lock.fd is None:  # not ours: leave the directory as it is, only undo the folders we made
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    break
        else:
            prepared.release()
        raise
    return prepared


def write_config(run_dir: Path, cfg) -> None:
    from moalign.config import dump_config  # on use: the command line starts without importing torch

    write_atomically(run_dir / "config.yaml", dump_config(cfg))


def write_summary(run_dir: Path, summary: dict) -> None:
    try:
        from moalign.diagnostics.interference import interference_summary

        summary["interference"] = interference_summary(run_dir)
    except (ImportError, UserError) as exc:
        summary["interference"] = {"error": str(exc)}
    write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))


def print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    interference = summary.get("interference", {})
    for split, by_mode in summary.get("eval", {}).items():
        for mode, rows in by_mode.items():
            with_ci = (interference.get("objectives", {}) if (interference.get("split"), interference.get("mode"))
                       == (split, mode) else {})
            table = Table(title=f"held-out {split} split ({mode}): per-objective change")
            for col in ("objective", "start", "end", "change") + (("95% CI",) if with_ci else ()):
                table.add_column(col, justify="right" if col != "objective" else "left")
            for name, r in rows.items():
                ch = r["change"]
                color = "green" if ch > 0 else "red" if ch < 0 else "white"
                ci = [f"[{with_ci[name]['change_ci'][0]:+.3f}, {with_ci[name]['change_ci'][1]:+.3f}]"] \
                    if name in with_ci else []
                table.add_row(name, f"{r['start']:.3f}", f"{r['end']:.3f}", f"[{color}]{ch:+.3f}[/]", *ci)
            console.print(table)
    w = summary.get("final_weights", {})
    if w:
        console.print("final weights: " + ", ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in w.items()))
    if interference.get("verdict") is not None:
        degraded = ", ".join(interference["degraded_objectives"]) or "none"
        ci = interference["score_change_ci"]
        console.print(f"verdict ({interference['split']}, {interference['mode']}): {interference['verdict']}; degraded "
                      f"objectives (CI below 0): {degraded}; fixed-scalarization score change "
                      f"{interference['score_change']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]", highlight=False)
    cost = summary.get("eval_cost") or {}
    if cost:
        console.print("held-out evaluation cost: " + "; ".join(
            f"{mode} {c['seconds']:.1f} s for {c['evaluations']} evaluations ({c['completions']} completions, "
            f"{c['tokens']} tokens)" for mode, c in cost.items()), highlight=False)
    law = summary.get("law") or {}
    if law.get("law/batch_num_pairs"):
        console.print(f"covariance law: predicted vs next-batch sign agreement {law['law/batch_sign_agreement']:.2f}"
                      + (f", vs probe set {law['law/sign_agreement']:.2f}" if law.get("law/num_pairs") else ""),
                      highlight=False)
    console.print(f"done in {summary.get('wall_seconds', 0):.0f}s; run directory: {run_dir}")
