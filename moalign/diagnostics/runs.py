"""Reading the run directories written by the training engine.

A run directory holds

    metrics.jsonl   one JSON object per line, each with an integer ``step``. Training lines carry
                    ``train/score/mean`` (the scalarized training score), ``train/<objective>/mean`` and
                    ``weight/<objective>``; evaluation lines carry, per evaluation mode (sampled, greedy),
                    ``eval/<split>/<mode>/<objective>/per_prompt`` (one score per evaluation prompt, in the same
                    prompt order at every evaluation; ``null``/NaN = a prompt whose scoring failed) and, sampled,
                    ``.../per_sample`` (each completion's reward); the start evaluation's line carries the fixed
                    scalarization ``scalarization/<objective>`` (``engine.evaluation``); each evaluation's cost is
                    ``eval/<split>/<mode>/{completions,tokens,seconds}`` (``eval_cost``). Lines written without a mode
                    in the key (``eval/<split>/<objective>/per_prompt``) are greedy evaluations. Other keys are
                    ignored.
    config.yaml     the resolved config (``objectives``: the objectives' specs, ``seed``, ...)
    summary.json    written by the engine (not read here)

A run's verdicts use its sampled evaluations when it has them (the held-out expected reward), else its greedy ones
(``Run.evaluations``; every mode is in ``Run.evaluations_by_mode``).

Lines that share a step are merged, later keys winning: an evaluation may be logged on its own line, and a resumed
run logs again the steps after its checkpoint. A torn last line (a run still writing, or killed mid-write) is skipped;
an unparseable line anywhere else is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import yaml

from moalign import bounded_yaml
from moalign.errors import UserError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
SPLITS = ("val", "test")
MODES = ("sampled", "greedy")  # in order of preference for the verdicts
TRAIN_SCORE_KEY = "train/score/mean"
SCALARIZATION_PREFIX = "scalarization/"
# Config keys that differ between the seeds of one configuration and so are left out when grouping runs.
RUN_SPECIFIC_CONFIG_KEYS = ("seed", "output_dir", "run_dir", "run_name")


def eval_key(split: str, mode: str, objective: str, field: str) -> str:
    return f"eval/{split}/{mode}/{objective}/{field}"


def _legacy_greedy_key(split: str, objective: str, field: str) -> str:
    return f"eval/{split}/{objective}/{field}"


@dataclass(frozen=True)
class Evaluations:
    """One split's held-out results in one mode: ``per_prompt[objective][t, i]`` is prompt i's score at evaluation
    ``steps[t]``; sampled evaluations also hold ``per_sample[objective][t, i, k]``, completion k's reward (completion
    k of a prompt drew from the same random stream at every evaluation)."""

    split: str
    steps: np.ndarray  # [T] int, increasing
    per_prompt: dict[str, np.ndarray]  # objective -> [T, N] float, NaN = missing
    mode: str = "greedy"
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)  # objective -> [T, N, K]; empty when greedy

    def scalarized(self, weights: dict[str, float]) -> np.ndarray:
        """Per-prompt fixed-scalarization scores [T, N]: Σ_j λ_j · per_prompt_j (NaN where any objective is)."""
        return sum(weight * self.per_prompt[objective] for objective, weight in weights.items())


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]
    objectives: list[str]
    train_score: np.ndarray  # [n] train/score/mean at every logged training step, in step order
    evaluations_by_mode: dict[str, dict[str, Evaluations]]  # mode -> split -> evaluations (evaluated ones only)
    scalarization: dict[str, float]  # objective -> λ0 of the fixed scalarization (sums to 1)

    @property
    def mode(self) -> str:
        """The evaluation mode of the verdicts: sampled when the run has sampled evaluations, else greedy."""
        return next(m for m in MODES if m in self.evaluations_by_mode)

    @property
    def evaluations(self) -> dict[str, Evaluations]:
        """split -> the evaluations of ``mode``."""
        return self.evaluations_by_mode[self.mode]

    @property
    def seed(self) -> Optional[int]:
        return self.config.get("seed")

    def evaluations_for(self, split: str) -> Evaluations:
        """The split's evaluations; a start and an end are needed to measure a change."""
        if split not in self.evaluations:
            available = ", ".join(self.evaluations) or "none"
            raise UserError(f"run {self.path} has no {split!r} evaluations (evaluated splits: {available}); "
                            f"choose another split")
        evaluations = self.evaluations[split]
        if len(evaluations.steps) < 2:
            raise UserError(f"run {self.path} has one {split!r} evaluation (step {evaluations.steps[0]}); measuring "
                            f"a change needs at least two (evaluate at the start and the end of training)")
        return evaluations

    def evaluated_at_start_and_end(self, split: str) -> bool:
        """Whether ``split`` was evaluated at the run's first and last evaluation steps (over all splits)."""
        if split not in self.evaluations or len(self.evaluations[split].steps) < 2:
            return False
        all_steps = np.concatenate([e.steps for e in self.evaluations.values()])
        steps = self.evaluations[split].steps
        return steps[0] == all_steps.min() and steps[-1] == all_steps.max()

    def grouping_key(self) -> str:
        """Equal for runs whose configs differ only in run-specific keys (seed, output directory)."""
        if not self.config:  # without a config nothing says two runs share a configuration
            return str(self.path.resolve())
        shared = {k: v for k, v in self.config.items() if k not in RUN_SPECIFIC_CONFIG_KEYS}
        return json.dumps(shared, sort_keys=True, default=str)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, one per step (lines of one step merged, later keys winning), by step."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); the "
                        f"metrics file is corrupt") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    by_step: dict[int, dict[str, Any]] = {}
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if position == len(lines) - 1:  # torn final write
                continue
            raise UserError(f"{path}:{number} is not valid JSON; the metrics file is corrupt (only the last line "
                            f"may be incomplete)") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{number} has no integer 'step'; every metrics line needs one")
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def load_run(run_dir: Path | str) -> Run:
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise UserError(f"{run_dir} is not a run directory: it has no {METRICS_FILE}; pass the directory a "
                        f"training run wrote")
    records = read_metrics(metrics_path)
    config = _read_config(run_dir / CONFIG_FILE)
    objectives = _objective_names(config, records, run_dir)
    by_mode = {}
    for mode in MODES:
        evaluations = {split: e for split in SPLITS if (e := _evaluations(records, objectives, split, mode, run_dir))}
        if evaluations:
            by_mode[mode] = evaluations
    if not by_mode:
        raise UserError(f"run {run_dir} has no evaluation lines (no eval/<split>/<mode>/<objective>/per_prompt in "
                        f"{METRICS_FILE}); train with periodic evaluation enabled")
    train_score = np.array([r[TRAIN_SCORE_KEY] for r in records if TRAIN_SCORE_KEY in r], dtype=float)
    return Run(run_dir, config, objectives, train_score, by_mode, _scalarization(records, objectives, run_dir))


def _scalarization(records: list[dict[str, Any]], objectives: list[str], run_dir: Path) -> dict[str, float]:
    """λ0 from the first line that logs ``scalarization/<objective>``; uniform weights for a run that logged none."""
    for record in records:
        if any(k.startswith(SCALARIZATION_PREFIX) for k in record):
            try:
                weights = {o: float(record[SCALARIZATION_PREFIX + o]) for o in objectives}
            except (KeyError, TypeError, ValueError):
                raise UserError(f"run {run_dir}: the line of step {record['step']} has scalarization weights but not "
                                f"a number for every objective ({', '.join(objectives)})") from None
            return weights
    return {o: 1.0 / len(objectives) for o in objectives}


def eval_cost(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{mode: {evaluations, seconds, completions, tokens}}``: the held-out evaluations' totals over a run (one
    evaluation = one split in one mode), from its metrics records."""
    cost: dict[str, dict[str, float]] = {}
    for record in records:
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "eval" and parts[2] in MODES and parts[3] == "seconds":
                totals = cost.setdefault(parts[2], {"evaluations": 0, "seconds": 0.0, "completions": 0, "tokens": 0})
                prefix = key.removesuffix("seconds")
                totals["evaluations"] += 1
                totals["seconds"] += value
                totals["completions"] += record.get(prefix + "completions", 0)
                totals["tokens"] += record.get(prefix + "tokens", 0)
    return cost


def choose_split(runs: Sequence[Run], split: Optional[str] = None) -> str:
    """``split`` if given; otherwise test when every run evaluated test at its start and end, else val."""
    if split is None:
        split = "test" if all(run.evaluated_at_start_and_end("test") for run in runs) else "val"
    if split not in SPLITS:
        raise UserError(f"unknown evaluation split {split!r}; valid: {', '.join(SPLITS)}")
    for run in runs:
        run.evaluations_for(split)  # raises when a run cannot be measured on this split
    return split


def group_by_config(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs that share a configuration apart from the seed, in order of first appearance."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.grouping_key(), []).append(run)
    return list(groups.values())


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = bounded_yaml.load(path.read_text(encoding="utf-8"), str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid YAML ({error.__class__.__name__}); restore the resolved config") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a mapping of config keys, got {type(config).__name__}")
    return config


def _objective_names(config: dict[str, Any], records: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """The names the run logged its objectives under: those of its fixed scalarization (``scalarization/<name>``,
    logged by both engines at the start evaluation, in the run's order); else the config's objectives (a spec
    ``name=package.module:function`` or ``package.module:function`` is named ``name`` or ``function``); without a
    config, those seen in evaluations."""
    for record in records:
        logged = [k[len(SCALARIZATION_PREFIX):] for k in record if k.startswith(SCALARIZATION_PREFIX)]
        if logged:
            return logged
    if "objectives" in config:
        entries = config["objectives"]
        names = [_spec_name(e) for e in entries or []] if isinstance(entries, list) else []
        if not names or not all(isinstance(n, str) for n in names):
            raise UserError(f"{run_dir / CONFIG_FILE}: 'objectives' must be a non-empty list of objective names")
        return names
    seen = {key.split("/")[-2] for record in records for key in record
            if key.startswith("eval/") and key.endswith("/per_prompt") and key.count("/") in (3, 4)}
    return sorted(seen)


def _spec_name(entry: Any) -> Any:
    """The name an objective spec of a config logs under (``moalign.objectives.load_objective``'s forms)."""
    if isinstance(entry, dict):
        entry = entry.get("name") or entry.get("function")
    if not isinstance(entry, str):
        return entry
    name, equals, function = entry.strip().rpartition("=")
    return name.strip() if equals else function.rpartition(":")[2].strip()


def _evaluations(records: list[dict[str, Any]], objectives: list[str], split: str, mode: str,
                 run_dir: Path) -> Optional[Evaluations]:
    """The split's evaluations in ``mode``, or None when it was never evaluated so. Every evaluation must score every
    objective."""
    def key_of(objective: str, field: str) -> str:
        key = eval_key(split, mode, objective, field)
        if mode == "greedy" and not any(key in r for r in records):
            return _legacy_greedy_key(split, objective, field)
        return key

    evaluated = [r for r in records if any(key_of(o, f) in r for o in objectives for f in ("per_prompt", "mean"))]
    if not evaluated:
        return None
    per_prompt, per_sample = {}, {}
    for objective in objectives:
        key = key_of(objective, "per_prompt")
        rows = []
        for record in evaluated:
            if key not in record:
                raise UserError(f"run {run_dir}: the {split} evaluation at step {record['step']} has no {key!r}; "
                                f"every evaluation must score every objective of the run "
                                f"({', '.join(objectives)})")
            rows.append(_scores(record[key], f"{run_dir}: {key} at step {record['step']}"))
        if len({len(row) for row in rows}) != 1 or len(rows[0]) == 0:
            raise UserError(f"run {run_dir}: {key} has {sorted({len(r) for r in rows})} prompts across evaluations; "
                            f"every evaluation must score the same non-empty prompt set in the same order")
        per_prompt[objective] = np.array(rows, dtype=float)
        sample_key = key_of(objective, "per_sample")
        if all(sample_key in record for record in evaluated):
            per_sample[objective] = _sample_table(evaluated, sample_key, len(rows[0]), run_dir)
    steps = np.array([r["step"] for r in evaluated], dtype=int)
    return Evaluations(split, steps, per_prompt, mode, per_sample)


def _sample_table(evaluated: list[dict[str, Any]], key: str, prompts: int, run_dir: Path) -> np.ndarray:
    """Per-completion rewards [T, N, K] of every evaluation; the same N × K shape at every one."""
    tables = []
    for record in evaluated:
        where = f"{run_dir}: {key} at step {record['step']}"
        value = record[key]
        if not isinstance(value, list) or len(value) != prompts:
            raise UserError(f"{where} must be a list of {prompts} per-prompt lists of rewards")
        tables.append([_scores(row, where) for row in value])
    if len({len(row) for table in tables for row in table}) != 1:
        raise UserError(f"run {run_dir}: {key} holds different numbers of completions per prompt; every sampled "
                        f"evaluation must draw the same number for every prompt")
    return np.array(tables, dtype=float)


def _scores(values: Any, where: str) -> list[float]:
    """A per-prompt list as floats; ``null`` becomes NaN (missing)."""
    if not isinstance(values, list):
        raise UserError(f"{where} must be a list of per-prompt scores, got {type(values).__name__}")
    try:
        return [math.nan if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"{where} must hold numbers (or null for a missing score)") from None
