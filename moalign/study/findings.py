"""What a study's runs show, as numbers and plain sentences: the data behind ``moalign report``.

Inputs are run directories as the engine writes them (``metrics.jsonl``, ``config.yaml``, ``summary.json``); a study
directory holds them under ``runs/``. Every number here is computed from those files:

* tidy results: one row per run × split × evaluation mode × evaluation step × objective, the mean score over the
  evaluation prompts;
* per configuration (runs that differ only in their seed): per-objective change with a 95% interval over seeds and
  prompts, degradation flags, the change of the fixed scalarization λ0, the verdict (interference, degradation,
  improvement, no effect detected) and hypervolume (``moalign.diagnostics.interference``), on the held-out expected
  reward (sampled evaluations; greedy scores for runs without them), on the validation split and, when every run
  evaluated it at its start and end, the test split;
* interference rate: the fraction of runs (each seed counted once) that interfere;
* cost: mean seconds per training step (``perf/step_s``) and per phase (``time/<phase>_s``), and any logged
  ``perf/*pass*`` counter;
* covariance-law agreement, when runs log the law monitor's metrics (``moalign.diagnostics.law``): the predicted
  change of objective j, Cov(r_j, w) (``law/cov_w/<j>``), against the change realised on the probe prompts
  (``law/realised/<j>``); sign agreement (pairs where either is 0 left out) and correlation, pooled over seeds;
* Pareto front of the final points (mean over seeds) and its hypervolume with the mean start point as reference.

Selection uses the validation split, reported numbers the test split (``Findings.report_split``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import yaml
from pymoo.indicators.hv import HV

from moalign import bounded_yaml
from moalign.diagnostics.interference import (
    InterferenceReport,
    curve_means,
    interference_report,
)
from moalign.diagnostics.runs import (
    SPLITS,
    Run,
    group_by_config,
    load_run,
    read_metrics,
)
from moalign.errors import UserError

SUMMARY_FILE = "summary.json"
STUDY_FILE = "study.yaml"
RESULT_COLUMNS = ["study", "run", "algorithm", "model", "estimator", "seed", "objective_set", "split", "mode",
                  "step", "objective", "value"]


# ------------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class StudyRun:
    """A finished run directory with its factors read from its resolved config."""

    run: Run
    records: list[dict[str, Any]]  # metrics.jsonl, one merged record per step

    @property
    def name(self) -> str:
        return self.run.path.name

    def _section_name(self, section: str) -> str:
        value = self.run.config.get(section)
        return str(value.get("name") if isinstance(value, dict) else value or "?")

    @property
    def algorithm(self) -> str:
        return self._section_name("weighting")

    @property
    def model(self) -> str:
        return self._section_name("model")

    @property
    def estimator(self) -> str:
        return self._section_name("estimator")

    @property
    def seed(self) -> Optional[int]:
        return self.run.seed

    @property
    def objective_set(self) -> str:
        return "+".join(self.run.objectives)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar metric over the logged steps that carry it."""
        pairs = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        steps, values = zip(*pairs) if pairs else ((), ())
        return np.array(steps, dtype=int), np.array(values, dtype=float)

    def curve(self, split: str, objective: str, mode: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """(evaluation steps, mean score over prompts) of one objective on one split, in ``mode`` (default: the
        verdicts' mode, ``Run.mode``)."""
        evaluations = self.run.evaluations_by_mode[mode or self.run.mode][split]
        return evaluations.steps, curve_means(evaluations.per_prompt[objective])


@dataclass(frozen=True)
class LoadedStudy:
    name: str
    path: Path
    runs: list[StudyRun]
    skipped: list[tuple[str, str]]  # (run directory name, why it is not in the report)


def find_run_dirs(path: Path) -> tuple[list[Path], bool]:
    """The run directories under ``path`` and whether ``path`` is a study (runs under ``runs/``) or one run."""
    if (path / "metrics.jsonl").is_file():
        return [path], False
    runs_folder = path / "runs"
    if runs_folder.is_dir():
        return sorted(d for d in runs_folder.iterdir() if d.is_dir()), True
    raise UserError(f"{path} is neither a study directory (with runs/) nor a run directory (with metrics.jsonl)")


def load_study(path: Path | str) -> LoadedStudy:
    """A study's finished runs (those with summary.json), or a single run directory (finished or not)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass a study or run directory")
    run_dirs, is_study = find_run_dirs(path)
    runs, skipped = [], []
    for run_dir in run_dirs:
        if is_study and not (run_dir / SUMMARY_FILE).is_file():
            skipped.append((run_dir.name, "not finished (no summary.json)"))
            continue
        try:
            run = load_run(run_dir)
            if not any(len(e.steps) >= 2 for e in run.evaluations.values()):
                raise UserError("fewer than two evaluations")
        except UserError as exc:
            if not is_study:
                raise
            skipped.append((run_dir.name, str(exc)))
            continue
        runs.append(StudyRun(run, read_metrics(run_dir / "metrics.jsonl")))
    if not runs:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped) or "no run directories under runs/"
        raise UserError(f"{path} holds no finished run to report on ({reasons})")
    return LoadedStudy(_study_name(path, is_study), path, runs, skipped)


def _study_name(path: Path, is_study: bool) -> str:
    study_file = path / STUDY_FILE
    if is_study and study_file.is_file():
        try:  # written by moalign, but a study directory may come from anyone
            tree = bounded_yaml.load(study_file.read_text(encoding="utf-8", errors="replace"), str(study_file))
        except yaml.YAMLError:
            tree = None
        name = tree.get("name") if isinstance(tree, dict) else None
        if name:
            return str(name)
    return path.resolve().name


def results_table(runs: Sequence[StudyRun], study: str) -> pd.DataFrame:
    """Tidy results: one row per run × split × mode × evaluation step × objective (``RESULT_COLUMNS``)."""
    rows = []
    for r in runs:
        for mode, by_split in r.run.evaluations_by_mode.items():
            for split in by_split:
                for objective in r.run.objectives:
                    for step, value in zip(*r.curve(split, objective, mode)):
                        rows.append([study, r.name, r.algorithm, r.model, r.estimator, r.seed, r.objective_set,
                                     split, mode, int(step), objective, float(value)])
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


# ------------------------------------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class ConfigResult:
    """The seeds of one configuration and their interference verdicts per split (intervals over seeds and prompts,
    or over prompts for a single seed)."""

    runs: list[StudyRun]
    reports: dict[str, InterferenceReport]  # split -> report

    @property
    def first(self) -> StudyRun:
        return self.runs[0]

    @property
    def label(self) -> str:
        """The algorithm, plus any other grid values a study put in the run name after the seed (``lr-0.001``)."""
        extras = self.first.name.split("__")[4:]
        return " ".join([self.first.algorithm, *extras])


def configurations(runs: Sequence[StudyRun]) -> list[ConfigResult]:
    """Runs grouped by configuration (everything but the seed), each with its reports on every measurable split."""
    by_path = {r.run.path: r for r in runs}
    out = []
    for group in group_by_config([r.run for r in runs]):
        reports = {split: interference_report(group, split) for split in SPLITS if _measurable(group, split)}
        out.append(ConfigResult([by_path[run.path] for run in group], reports))
    models = list(dict.fromkeys(c.first.model for c in out))
    # The baseline first within each comparison; otherwise the order the runs came in.
    return sorted(out, key=lambda c: (models.index(c.first.model), c.first.estimator, c.first.objective_set,
                                      c.first.algorithm != "linear"))


def _measurable(runs: Sequence[Run], split: str) -> bool:
    """Every run evaluated the split at its first and last evaluation (test: start and end of training)."""
    return all(run.evaluated_at_start_and_end(split) for run in runs)


def report_split(configs: Sequence[ConfigResult]) -> str:
    """The split of the reported numbers: test when every configuration measured it, else val."""
    return "test" if all("test" in c.reports for c in configs) else "val"


def selection_split(configs: Sequence[ConfigResult]) -> str:
    """The split selections are made on: val when every configuration measured it, else the report split."""
    return "val" if all("val" in c.reports for c in configs) else report_split(configs)


def run_interference(run: StudyRun, split: str) -> Optional[bool]:
    """The run's own verdict (its policy over the prompt distribution); None when it cannot be measured."""
    try:
        return interference_report([run.run], split).interference
    except UserError:
        return None


def interference_rates(runs: Sequence[StudyRun], split: str, by: str) -> dict[str, tuple[int, int]]:
    """Per value of the factor ``by`` (e.g. "algorithm"): (runs that interfere, runs with a verdict)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in runs:
        verdict = run_interference(r, split)
        if verdict is not None:
            counts[getattr(r, by)][0] += int(verdict)
            counts[getattr(r, by)][1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


# ------------------------------------------------------------------------------------------------ Pareto


def front_hypervolume(start: np.ndarray, points: np.ndarray) -> float:
    """Hypervolume dominated by ``points`` [K, M] above the reference ``start`` [M] (scores maximized)."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    return float(HV(ref_point=-np.asarray(start, dtype=float))(-points))


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` [K, M] (maximization)."""
    points = np.asarray(points, dtype=float)
    dominated = [any(np.all(q >= p) and np.any(q > p) for q in points) for p in points]
    return ~np.array(dominated, dtype=bool)


@dataclass(frozen=True)
class ParetoSet:
    """The final points of one comparison (same model, estimator and objectives), one per configuration."""

    configs: list[ConfigResult]
    objectives: list[str]
    start: np.ndarray  # [M] mean start point over configurations
    points: np.ndarray  # [K, M] end points (means over seeds)
    on_front: np.ndarray  # [K] bool
    hypervolume: float  # of the whole set, reference = start


def comparison_key(r: StudyRun) -> tuple[str, str, str]:
    """Runs that are compared with each other: same model, estimator and objectives (they differ in algorithm)."""
    return r.model, r.estimator, r.objective_set


def pareto_sets(configs: Sequence[ConfigResult], split: str) -> dict[tuple[str, str, str], ParetoSet]:
    grouped: dict[tuple[str, str, str], list[ConfigResult]] = defaultdict(list)
    for c in configs:
        if split in c.reports:
            grouped[comparison_key(c.first)].append(c)
    out = {}
    for key, members in grouped.items():
        objectives = members[0].first.run.objectives
        starts = np.array([[ch.start for ch in c.reports[split].changes] for c in members])
        points = np.array([[ch.end for ch in c.reports[split].changes] for c in members])
        start = starts.mean(axis=0)
        out[key] = ParetoSet(members, objectives, start, points, pareto_front(points),
                             front_hypervolume(start, points))
    return out


# ------------------------------------------------------------------------------------------------ cost and law


def cost_rows(runs: Sequence[StudyRun]) -> list[dict[str, Any]]:
    """Per (algorithm, model): mean seconds per step, the mean seconds of each timed phase and any pass counters."""
    grouped: dict[tuple[str, str], list[StudyRun]] = defaultdict(list)
    for r in runs:
        grouped[(r.algorithm, r.model)].append(r)
    rows = []
    for (algorithm, model), members in sorted(grouped.items()):
        keys = sorted({k for r in members for rec in r.records for k in rec
                       if k == "perf/step_s" or (k.startswith("time/") and k.endswith("_s"))
                       or (k.startswith("perf/") and "pass" in k)})
        row: dict[str, Any] = {"algorithm": algorithm, "model": model, "runs": len(members)}
        for key in keys:
            values = np.concatenate([r.series(key)[1] for r in members])
            row[key] = float(np.mean(values)) if len(values) else math.nan
        rows.append(row)
    return rows


def law_pairs(run: StudyRun) -> tuple[list[float], list[float]]:
    """(predicted, realised) changes of every (step, objective) the law monitor logged: the prediction is
    ``law/cov_w/<j>`` (``law/cov_s/<j>`` when the clipped signal was not measured), the realised change on the probe
    set ``law/realised/<j>``, both in the same step's record."""
    predicted, realised = [], []
    for record in run.records:
        for objective in run.run.objectives:
            p = record.get(f"law/cov_w/{objective}", record.get(f"law/cov_s/{objective}"))
            r = record.get(f"law/realised/{objective}")
            if isinstance(p, (int, float)) and isinstance(r, (int, float)) and math.isfinite(p) and math.isfinite(r):
                predicted.append(float(p))
                realised.append(float(r))
    return predicted, realised


def law_rows(runs: Sequence[StudyRun]) -> list[dict[str, Any]]:
    """Per algorithm, pooled over its runs: sign agreement and correlation of predicted and realised changes, as the
    law monitor defines them (``moalign.diagnostics.law.Agreement``); empty when no run logged law metrics."""
    from moalign.diagnostics.law import Agreement

    pooled: dict[str, Agreement] = defaultdict(Agreement)
    for r in runs:
        predicted, realised = law_pairs(r)
        pooled[r.algorithm].predicted.extend(predicted)
        pooled[r.algorithm].realised.extend(realised)
    return [{"algorithm": algorithm, **agreement.summary("")} for algorithm, agreement in pooled.items()
            if agreement.predicted]


# ------------------------------------------------------------------------------------------------ sentences


def describe_change(objective: str, change: float, interval: Sequence[float]) -> Optional[str]:
    """"clarity degrades by 0.12 [CI −0.20, −0.05]" when the interval excludes 0, else None (no clear move)."""
    low, high = interval
    ci = f"[CI {_num(low)}, {_num(high)}]"
    if high < 0:
        return f"{objective} degrades by {abs(change):.3f} {ci}"
    if low > 0:
        return f"{objective} rises by {change:.3f} {ci}"
    return None


NO_CLEAR_MOVE = "no effect detected (every interval contains 0)"


SCORE_NAME = "the λ0-scalarized score"  # the fixed scalarization (diagnostics.interference)


def clear_moves(config: ConfigResult, split: str) -> str:
    """The objectives (and the fixed-scalarization score) that moved clearly, degradations first ("clarity degrades
    by … while accuracy rises by …, the λ0-scalarized score rises by …")."""
    report = config.reports[split]
    moves = [m for ch in report.changes if (m := describe_change(ch.objective, ch.change, ch.change_ci))]
    degraded = [m for m in moves if " degrades " in m]
    improved = [m for m in moves if " rises " in m]
    text = f"{', '.join(degraded)} while {', '.join(improved)}" if degraded and improved else ", ".join(moves)
    score = describe_change(SCORE_NAME, report.score.change, report.score.change_ci)
    if score is not None:
        text = f"{text}; {score.replace(' degrades ', ' falls ')}" if text else score.replace(" degrades ", " falls ")
    return text or NO_CLEAR_MOVE


def interference_count(configs: Sequence[ConfigResult], split: str) -> str:
    """"; interference in k of n runs" over the runs of ``configs`` (empty when no run has a verdict), then, for
    configurations with several seeds, the verdict with the seeds pooled — the one the tables show. The two can
    differ: a change every seed repeats can be clear pooled and unclear within each run, and a change one run shows
    on its prompts can fail to generalise over seeds."""
    known = [v for c in configs for r in c.runs if (v := run_interference(r, split)) is not None]
    text = f"; interference in {sum(known)} of {len(known)} run{'s' if len(known) != 1 else ''}" if known else ""
    pooled = [c for c in configs if len(c.runs) > 1 and split in c.reports]
    if not pooled:
        return text
    interfering = [c.label for c in pooled if c.reports[split].interference]
    if len(configs) == 1:
        verdict = "yes" if interfering else "no"
        return f"{text}, {verdict} with its {len(pooled[0].runs)} seeds pooled (the table's verdict)"
    return f"{text}; with each algorithm's seeds pooled (the table's verdict): {', '.join(interfering) or 'none'}"


def describe_configs(configs: Sequence[ConfigResult], split: str) -> list[str]:
    """One clause per algorithm that moved an objective clearly; the algorithms that moved none share one clause."""
    moves = {id(c): clear_moves(c, split) for c in configs}
    still = [c for c in configs if moves[id(c)] == NO_CLEAR_MOVE]
    clauses = []
    for c in configs:
        if moves[id(c)] != NO_CLEAR_MOVE:
            clauses.append(f"under {c.label}, {moves[id(c)]}{interference_count([c], split)}")
        elif c is still[0]:
            labels = ", ".join(s.label for s in still)
            clauses.append(f"under {labels}, {NO_CLEAR_MOVE}{interference_count(still, split)}")
    return clauses


@dataclass(frozen=True)
class Finding:
    """What one comparison (same model, estimator and objectives; different algorithms) shows."""

    head: str  # which comparison, on which split, over how many seeds
    clauses: list[str]  # per algorithm: its clear moves and how often its runs interfered
    summary: str  # the selection on the selection split, its value on the report split, and the Pareto front


def finding_for(pareto: ParetoSet, key: tuple[str, str, str], split: str, selection: Optional[ParetoSet],
                selection_split: str) -> Finding:
    model, estimator, objective_set = key
    seeds = "/".join(str(n) for n in sorted({len(c.runs) for c in pareto.configs}))
    head = f"**{model}** ({estimator}; objectives {objective_set}; {split} split; {seeds} seed(s) per algorithm):"
    clauses = describe_configs(pareto.configs, split)
    summary = ""
    if selection is not None and len(selection.configs) > 1:
        hv = [c.reports[selection_split].hypervolume for c in selection.configs]
        best = selection.configs[int(np.argmax(hv))]
        summary += (f"Chosen on {selection_split} by hypervolume: {best.label} (HV {max(hv):.4f}); on {split} its "
                    f"hypervolume is {best.reports[split].hypervolume:.4f}. " if max(hv) > 0 else
                    f"No algorithm improves every objective on {selection_split} (every hypervolume is 0), so none is "
                    f"chosen. ")
    on_front = [c.label for c, on in zip(pareto.configs, pareto.on_front) if on]
    summary += f"Pareto front on {split}: {', '.join(on_front)} (hypervolume of the set {pareto.hypervolume:.4f})."
    return Finding(head, clauses, summary)


def _num(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


@dataclass
class Findings:
    """Everything the report shows, computed once."""

    study: LoadedStudy
    configs: list[ConfigResult] = field(init=False)
    split: str = field(init=False)
    selection_split: str = field(init=False)
    pareto: dict[tuple[str, str, str], ParetoSet] = field(init=False)

    def __post_init__(self) -> None:
        self.configs = configurations(self.study.runs)
        self.split = report_split(self.configs)
        self.selection_split = selection_split(self.configs)
        self.pareto = pareto_sets(self.configs, self.split)

    @property
    def runs(self) -> list[StudyRun]:
        return self.study.runs

    def findings(self) -> list[Finding]:
        selection = pareto_sets(self.configs, self.selection_split)
        return [finding_for(p, key, self.split, selection.get(key), self.selection_split)
                for key, p in self.pareto.items()]

    def values_of(self, attribute: str) -> list[str]:
        """Distinct values of a run factor, in the order of the configurations (the baseline first)."""
        return list(dict.fromkeys(getattr(r, attribute) for c in self.configs for r in c.runs))
