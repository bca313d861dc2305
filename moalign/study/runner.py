"""``moalign study``: run every configuration of a study grid, one after another, resumably.

Study directory layout::

    <study_dir>/study.yaml            the resolved study (after command-line overrides) and its run names
    <study_dir>/runs/<run>/           one engine run directory each (config.yaml, metrics.jsonl, checkpoints/, ...)
    <study_dir>/runs.csv              status and wall time of every run, rewritten after each run
    <study_dir>/results.parquet|csv   tidy results: run × split × evaluation step × objective (``findings``)

Resuming is running the same command again. Each run is planned from what its directory holds:

    summary.json present        -> done: skipped
    a checkpoint, no summary    -> resume from the checkpoint (``Trainer(cfg, run_dir, resume=True)``)
    anything else               -> start from scratch (the same call: without a checkpoint the trainer starts over)

One ``moalign study`` at a time holds a study directory (``.moalign-study.lock``), and a run's directory is locked while
it trains (``engine.run_dir.RunLock``). A resumed run reads its checkpoint without running code (``engine.checkpoint``).
A run directory whose config.yaml differs from the study's config for it (apart from the run directory, threads and
logging) stops the study before anything runs: continuing would mix two studies under one name. Finished runs are never
touched. A run that fails is recorded (``error.txt`` in its directory, ``failed`` in runs.csv) and the study goes on;
the failures are reported at the end.

The training function is injectable (``train_fn``) so that the planning and resuming logic can be tested without a
model; the default is ``train_run`` (the config's engine, native or TRL). Runs go one after another on this machine,
each with the config's ``threads`` and ``device``; with ``jobs: N`` in the study file (or ``jobs=N`` on the command
line) N runs go at a time, each in a worker process (started once, by ``spawn``, and reused; a run whose config
leaves ``threads`` unset gets cores/N threads). Small models gain the most: on 2 cores two ``tiny`` runs at one
thread each take the time of one (docs/reproducing.md). The parallel path needs a ``train_fn`` that pickles (a
module-level function). Ctrl-C reaches the workers too: each running run checkpoints and stops, as alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol

import yaml

from moalign.config import TrainConfig
from moalign.engine.checkpoint import latest_checkpoint
from moalign.engine.run_dir import WARNINGS_FILE, RunLock, write_atomically, write_config, write_summary
from moalign.errors import UserError
from moalign.study.findings import SUMMARY_FILE, results_table
from moalign.study.findings import load_study as load_finished_runs
from moalign.study.grid import PlannedRun, StudySpec, load_study

Plan = Literal["done", "resume", "start"]
STUDY_LOCK_FILE = ".moalign-study.lock"
# Config keys that may differ between a run directory and the study without changing what the run computes.
INCIDENTAL_KEYS = ("run_dir", "threads", "log")


class TrainFn(Protocol):
    def __call__(self, cfg: TrainConfig, run_dir: Path, resume: bool,
                 on_step: Callable[[int], None]) -> dict[str, Any]:
        """Train (or continue) one run in ``run_dir``, calling ``on_step(step)`` after every step; write
        ``summary.json`` last and return the summary."""


# ------------------------------------------------------------------------------------------------ one run


def train_run(cfg: TrainConfig, run_dir: Path, resume: bool, on_step: Callable[[int], None]) -> dict[str, Any]:
    """One run on the config's engine, with the summary written as ``moalign train`` writes it. TRL reports no
    steps on the way (its run directory resumes from its own checkpoints)."""
    with RunLock(run_dir):  # a `moalign train --resume` on the same run directory is refused, and vice versa
        if cfg.engine == "trl":
            from moalign.integrations.trl import train_with_trl

            summary = train_with_trl(cfg, run_dir)
            on_step(cfg.steps)
            return summary
        from moalign.engine.trainer import Trainer

        trainer = Trainer(cfg, run_dir, resume=resume, on_warning=_warnings_log(run_dir))
        summary = trainer.run(lambda step, total, record: on_step(step))
        write_summary(run_dir, summary)
        return summary


def _warnings_log(run_dir: Path) -> Callable[[str], None]:
    """A run's warnings appended to ``warnings.log`` in its directory: under one study bar, lines from many runs
    without their run's name would only be noise."""
    def write(message: str) -> None:
        with (run_dir / WARNINGS_FILE).open("a", encoding="utf-8") as f:
            f.write(message + "\n")
    return write


def plan_run(run_dir: Path) -> Plan:
    if (run_dir / SUMMARY_FILE).is_file():
        return "done"
    if latest_checkpoint(run_dir) is not None:
        return "resume"
    return "start"


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's latest checkpoint (its file is ``step_<N>.pt``), 0 without one."""
    path = latest_checkpoint(run_dir)
    return int(path.stem.split("_")[-1]) if path is not None else 0


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in INCIDENTAL_KEYS}


def check_run_dir_matches(run: PlannedRun) -> None:
    """A run directory written by an earlier invocation must hold the same config (see the module docstring)."""
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return
    from moalign.config import load_yaml

    old = _comparable(load_yaml(saved))
    new = _comparable(run.config.model_dump(mode="json"))
    if old != new:
        differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserError(f"{run.run_dir} was made with a different config (differs in: {', '.join(differing)}); "
                        f"use another study directory (--out) or remove that run directory")


# ------------------------------------------------------------------------------------------------ bookkeeping


@dataclass
class RunRecord:
    """One line of runs.csv."""

    run: str
    status: str  # pending | done | failed | interrupted
    wall_s: float
    steps_done: int
    factors: dict[str, str]
    error: str = ""

    def row(self) -> dict[str, Any]:
        return {"run": self.run, "status": self.status, "wall_s": round(self.wall_s, 1),
                "steps_done": self.steps_done, **self.factors, "error": self.error}


def previous_wall_times(study_dir: Path) -> dict[str, float]:
    """Wall seconds already spent per run in earlier invocations (from runs.csv), so resumed runs add up."""
    path = study_dir / "runs.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["run"]: float(row["wall_s"] or 0) for row in csv.DictReader(f)}


def write_runs_csv(study_dir: Path, records: list[RunRecord]) -> None:
    rows = [r.row() for r in records]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(study_dir / "runs.csv", buffer.getvalue())


def write_study_file(study_dir: Path, spec: StudySpec, runs: list[PlannedRun]) -> None:
    resolved = spec.model_dump(mode="json") | {"runs": [{"name": r.name, **r.factors} for r in runs]}
    write_atomically(study_dir / "study.yaml", yaml.safe_dump(resolved, sort_keys=False))


def write_results(study_dir: Path, study: str) -> Optional[Path]:
    """results.parquet and results.csv from every finished run; None when no run has finished yet."""
    try:
        loaded = load_finished_runs(study_dir)
    except UserError:
        return None
    table = results_table(loaded.runs, study)
    table.to_parquet(study_dir / "results.parquet", index=False)
    table.to_csv(study_dir / "results.csv", index=False)
    return study_dir / "results.parquet"


# ------------------------------------------------------------------------------------------------ dry run


def validate_runs(runs: list[PlannedRun]) -> list[str]:
    """Everything that can be checked without loading a model: data (loaded once per distinct data config),
    objectives, weighting parameters against the objectives, estimators and local model paths. Returns notes."""
    from moalign.data import load_data
    from moalign.engine.trainer import load_objectives_and_weighting
    from moalign.rl.estimators import get_estimator

    notes: list[str] = []
    data_sizes: dict[str, dict[str, int]] = {}
    for run in runs:
        cfg = run.config
        data_key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
        if data_key not in data_sizes:
            splits = load_data(cfg.data)
            data_sizes[data_key] = {name: len(examples) for name, examples in splits.items()}
            if not data_sizes[data_key]["train"]:
                raise UserError(f"run {run.name}: the training split is empty; check data.path / data.num_train")
            notes.append(f"data {cfg.data.source}: " + ", ".join(f"{k} {v}" for k, v in data_sizes[data_key].items()))
        try:
            load_objectives_and_weighting(cfg)
        except (UserError, ValueError) as exc:
            raise UserError(f"run {run.name}: {exc}") from None
        get_estimator(cfg.estimator.name)
        notes.extend(_model_note(cfg.model.name))
    return list(dict.fromkeys(notes))


def _model_note(name: str) -> list[str]:
    from moalign.models.sft import SFT_MODEL_NAME
    from moalign.models.smollm2 import SMOLLM2_NAMES

    if name == "tiny" or name.lower() in SMOLLM2_NAMES or name == SFT_MODEL_NAME:
        return []
    if Path(name).exists():
        return [f"model {name}: local folder"]
    if name.startswith((".", "/", "~")):
        raise UserError(f"model {name!r} looks like a local path but does not exist")
    return [f"model {name}: a Hugging Face id, read from the Hugging Face cache (or downloaded) when its runs start"]


# ------------------------------------------------------------------------------------------------ the study


def run_study(config: str | Path, out_dir: str | Path | None = None, dry_run: bool = False,
              overrides: list[str] | None = None, train_fn: TrainFn = train_run) -> Path:
    """Run (or, with ``dry_run``, only validate) the study ``config`` (a YAML file or a preset name); return its
    directory."""
    from rich.console import Console

    console = Console()
    spec, study_dir, runs = load_study(config, out_dir, overrides)
    for run in runs:
        check_run_dir_matches(run)
    plans = {run.name: plan_run(run.run_dir) for run in runs}
    total_steps = sum(run.config.steps - checkpoint_step(run.run_dir) for run in runs if plans[run.name] != "done")
    counts = {p: sum(v == p for v in plans.values()) for p in ("done", "resume", "start")}
    console.print(f"[bold]study {spec.name}[/]: {len(runs)} runs ({counts['done']} done, {counts['resume']} to "
                  f"resume, {counts['start']} to start), {total_steps} training steps → {study_dir}")
    if dry_run:
        for note in validate_runs(runs):
            console.print(f"  {note}")
        for run in runs:
            console.print(f"  {plans[run.name]:>6}  {run.name}  ({run.config.steps} steps)")
        console.print("dry run: every config, data set, objective and weighting validated; no model was loaded")
        return study_dir

    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create study directory {study_dir}: {exc.strerror or exc}; choose a writable --out"
                        ) from None
    with RunLock(study_dir, STUDY_LOCK_FILE):  # one `moalign study` per study directory at a time
        return _run_locked(spec, study_dir, runs, plans, total_steps, train_fn, console)


def _run_locked(spec: StudySpec, study_dir: Path, runs: list[PlannedRun], plans: dict[str, Plan], total_steps: int,
                train_fn: TrainFn, console) -> Path:
    write_study_file(study_dir, spec, runs)
    earlier = previous_wall_times(study_dir)
    records = [RunRecord(r.name, "done" if plans[r.name] == "done" else "pending", earlier.get(r.name, 0.0),
                         r.config.steps if plans[r.name] == "done" else checkpoint_step(r.run_dir), r.factors)
               for r in runs]
    write_runs_csv(study_dir, records)
    run_all = _run_all if spec.jobs == 1 else partial(_run_parallel, jobs=spec.jobs)
    failures = run_all(runs, records, plans, study_dir, train_fn, total_steps, spec.name)
    results = write_results(study_dir, spec.name)
    console.print(f"study {spec.name}: {sum(r.status == 'done' for r in records)}/{len(runs)} runs done; "
                  f"runs.csv{', results.parquet' if results else ''} in {study_dir}; "
                  f"report: moalign report {study_dir}")
    if failures:
        raise UserError(f"{len(failures)} run(s) failed: {', '.join(failures)} (see error.txt in each run directory "
                        f"and {study_dir / 'runs.csv'}); rerun the same command to retry them")
    return study_dir


def _run_all(runs: list[PlannedRun], records: list[RunRecord], plans: dict[str, Plan], study_dir: Path,
             train_fn: TrainFn, total_steps: int, study: str) -> list[str]:
    """Train every run not done yet under one progress bar (steps over the whole study, with ETA)."""
    from tqdm.auto import tqdm

    failures = []
    bar = tqdm(total=total_steps, desc=f"study {study}", unit="step", dynamic_ncols=True)
    try:
        for run, record in zip(runs, records):
            if plans[run.name] == "done":
                continue
            bar.set_postfix_str(run.name)
            try:
                if _run_one(run, record, plans[run.name], train_fn, bar):
                    failures.append(run.name)
            finally:  # also when interrupted: runs.csv says which run stopped and how long it had run
                write_runs_csv(study_dir, records)
    finally:
        bar.close()
    return failures


def prepare_run_dir(run: PlannedRun) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run.run_dir, run.config)  # first: a run killed at any later moment can be resumed
    (run.run_dir / "error.txt").unlink(missing_ok=True)


def train_once(train_fn: TrainFn, cfg: TrainConfig, run_dir: Path, resume: bool,
               on_step: Callable[[int], None]) -> tuple[str, str, float]:
    """Train one run: (status, error, wall seconds), status done | failed | interrupted. A failure's traceback goes
    to ``error.txt``: one broken run must not cost the rest of a long study."""
    t0 = time.perf_counter()
    try:
        train_fn(cfg, run_dir, resume, on_step)
        return "done", "", time.perf_counter() - t0
    except KeyboardInterrupt:
        return "interrupted", "", time.perf_counter() - t0
    except Exception as exc:
        (run_dir / "error.txt").write_text(traceback.format_exc())
        error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return "failed", error, time.perf_counter() - t0


def _finish(record: RunRecord, status: str, error: str, seconds: float, bar) -> None:
    record.status, record.error = status, error
    record.wall_s += seconds
    if status == "done":
        bar.write(f"✓ {record.run} ({record.wall_s:.0f} s)")
    elif status == "failed":
        bar.write(f"✗ {record.run} failed: {error}")


def _interrupted(names: list[str]) -> KeyboardInterrupt:
    return KeyboardInterrupt(f"study interrupted during {', '.join(names)}; run the same `moalign study` command "
                             f"again to resume")


def _run_one(run: PlannedRun, record: RunRecord, plan: Plan, train_fn: TrainFn, bar) -> bool:
    """Train one run, keeping ``record`` and the bar current; True when it failed."""
    prepare_run_dir(run)

    def on_step(step: int) -> None:
        bar.update(max(0, step - record.steps_done))
        record.steps_done = step

    _finish(record, *train_once(train_fn, run.config, run.run_dir, plan == "resume", on_step), bar)
    if record.status == "interrupted":
        raise _interrupted([run.name])
    return record.status == "failed"


# ------------------------------------------------------------------------------------------------ parallel runs

_progress = None  # in a worker process: the queue its runs report their steps on


def _start_worker(progress, threads: int) -> None:
    import torch

    global _progress
    _progress = progress
    torch.set_num_threads(threads)  # a run's own ``threads`` overrides it


def _train_in_worker(train_fn: TrainFn, config: dict[str, Any], run_dir: str, resume: bool, name: str
                     ) -> tuple[str, str, float]:
    return train_once(train_fn, TrainConfig.model_validate(config), Path(run_dir), resume,
                      lambda step: _progress.put((name, step)))


def _run_parallel(runs: list[PlannedRun], records: list[RunRecord], plans: dict[str, Plan], study_dir: Path,
                  train_fn: TrainFn, total_steps: int, study: str, jobs: int) -> list[str]:
    """``_run_all`` with ``jobs`` runs at a time in worker processes (module docstring)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from queue import Empty

    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    by_name = {record.run: record for record in records}
    bar = tqdm(total=total_steps, desc=f"study {study} ({jobs} jobs)", unit="step", dynamic_ncols=True)

    def report_steps() -> None:
        while True:
            try:
                name, step = progress.get_nowait()
            except Empty:
                return
            record = by_name[name]
            bar.update(max(0, step - record.steps_done))
            record.steps_done = step

    executor = ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                                   initargs=(progress, max(1, (os.cpu_count() or 1) // jobs)))
    queued = [run for run in runs if plans[run.name] != "done"]
    futures: dict[Any, str] = {}

    def submit_next():  # one run per free worker: nothing waits in a queue when Ctrl-C comes
        run = queued.pop(0)
        prepare_run_dir(run)
        future = executor.submit(_train_in_worker, train_fn, run.config.model_dump(mode="json"), str(run.run_dir),
                                 plans[run.name] == "resume", run.name)
        futures[future] = run.name
        return future

    try:
        waiting = {submit_next() for _ in range(min(jobs, len(queued)))}
        while waiting:
            finished, waiting = wait(waiting, timeout=0.25, return_when=FIRST_COMPLETED)
            report_steps()
            for future in finished:
                _finish(by_name[futures[future]], *future.result(), bar)
                write_runs_csv(study_dir, records)
                if queued and not any(r.status == "interrupted" for r in records):
                    waiting.add(submit_next())
        interrupted = [r.run for r in records if r.status == "interrupted"]
        if interrupted:
            raise _interrupted(interrupted)
    except KeyboardInterrupt as exc:
        # the workers got the same Ctrl-C: their runs checkpoint and return "interrupted"
        executor.shutdown(wait=True, cancel_futures=True)
        for future, name in futures.items():
            if by_name[name].status == "pending":
                failed = future.cancelled() or future.exception() is not None
                _finish(by_name[name], *(("interrupted", "", 0.0) if failed else future.result()), bar)
        write_runs_csv(study_dir, records)
        names = [r.run for r in records if r.status == "interrupted"] or [str(exc) or "a run"]
        raise _interrupted(names) from None
    finally:
        executor.shutdown(wait=True)
        bar.close()
    return [r.run for r in records if r.status == "failed"]
