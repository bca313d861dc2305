"""What a study's runs show, as numbers and plain sentences: the data behind ``moalign report``.

Inputs are run directories as the engine writes them (``metrics.jsonl``, ``config.yaml``, ``summary.json``); a study
directory holds them under ``runs/``. Every number here is computed from those files:

* tidy results: one row per run × split × evaluation mode × evaluation step × objective, the mean score over the
  evaluation prompts;
* per configuration (runs that differ only in their seed): per-objective change with a 95% interval over seeds and
  prompts, degradation flags, the change of the fixed scalarization λ0, the verdict (interference, degradation,
  improvement, no effect detected) (``moalign.diagnostics.interference``), on the held-out expected reward (sampled
  evaluations; greedy scores for runs without them), on the validation split and, when every run evaluated it at
  its start and end, the test split;
* interference rate: the fraction of runs (each seed counted once) that interfere on their own;
* hypervolume: of each configuration's start and end points (means over seeds) and of the set of end points, all
  against one reference point per comparison, ``hypervolume_reference``: below every start and end point, so that
  a configuration that degrades an objective still has a positive volume; as a fraction of the box between that
  reference and the ideal point (``ParetoSet``);
* cost: mean seconds per training step (``perf/step_s``) and per phase (``time/<phase>_s``), any logged
  ``perf/*pass*`` counter, and the held-out evaluations' seconds and tokens against training's;
* covariance-law agreement, when runs log the law monitor's metrics: ``moalign.study.agreement``.

Selection uses the validation split, reported numbers the test split (``Findings.report_split``). The sentences
(``Finding``) are generated from the verdicts and intervals; nothing in them is written by hand.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import yaml
from pymoo.indicators.hv import HV

from moalign import bounded_yaml
from moalign.diagnostics.interference import (
    SCORE,
    VERDICTS,
    Contrast,
    InterferenceReport,
    ObjectiveChange,
    contrast,
    curve_means,
    interference_report,
)
from moalign.diagnostics.runs import (
    SPLITS,
    Run,
    eval_cost,
    group_by_config,
    load_run,
    read_metrics,
)
from moalign.errors import UserError
from moalign.study.agreement import LawEvidence, law_evidence

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


# ------------------------------------------------------------------------------------------------ Pareto


def front_hypervolume(reference: np.ndarray, points: np.ndarray) -> float:
    """Hypervolume dominated by ``points`` [K, M] above ``reference`` [M] (scores maximized; pymoo minimizes, hence
    the negation). A point below the reference in any objective adds nothing."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    return float(HV(ref_point=-np.asarray(reference, dtype=float))(-points))


HV_MARGIN = 0.1  # the reference point lies this fraction of each objective's range below its lowest value
HV_MIN_MARGIN = 0.01  # ... and at least this far (an objective every point scores alike)


def hypervolume_reference(points: np.ndarray) -> np.ndarray:
    """The reference point of a comparison's hypervolumes: per objective, the lowest value among ``points`` [K, M]
    (every configuration's start and end point) minus ``HV_MARGIN`` of the objective's range over them (at least
    ``HV_MIN_MARGIN``). Every point then dominates it strictly, so no volume is 0 because an objective fell; the
    volumes compare configurations within one comparison (the reference moves with the set)."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    low, high = points.min(axis=0), points.max(axis=0)
    return low - np.maximum(HV_MARGIN * (high - low), HV_MIN_MARGIN)


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` [K, M] (maximization)."""
    points = np.asarray(points, dtype=float)
    dominated = [any(np.all(q >= p) and np.any(q > p) for q in points) for p in points]
    return ~np.array(dominated, dtype=bool)


@dataclass(frozen=True)
class ParetoSet:
    """The final points of one comparison (same model, estimator and objectives), one per configuration, and their
    hypervolumes against the comparison's reference point, as a fraction of the box between the reference point and
    the ideal point (each objective's best start or end value): 1 would be one point best in every objective."""

    configs: list[ConfigResult]
    objectives: list[str]
    starts: np.ndarray  # [K, M] start points (means over each configuration's seeds)
    points: np.ndarray  # [K, M] end points (means over seeds)
    on_front: np.ndarray  # [K] bool
    reference: np.ndarray  # [M] hypervolume_reference of starts and points

    @property
    def start(self) -> np.ndarray:
        """[M] the mean start point over configurations."""
        return self.starts.mean(axis=0)

    @property
    def ideal(self) -> np.ndarray:
        return np.concatenate([self.starts, self.points]).max(axis=0)

    def volume(self, points: np.ndarray) -> float:
        """The normalized hypervolume of ``points`` ([M] or [K, M])."""
        return front_hypervolume(self.reference, points) / float(np.prod(self.ideal - self.reference))

    @property
    def hypervolume(self) -> float:
        """Of the set of end points."""
        return self.volume(self.points)

    @property
    def start_hypervolume(self) -> float:
        """Of the mean start point: what the set's volume is compared with."""
        return self.volume(self.start)

    def end_hypervolumes(self) -> list[float]:
        return [self.volume(p) for p in self.points]

    def of(self, config: ConfigResult) -> tuple[float, float]:
        """(start, end) hypervolume of one of the set's configurations."""
        k = next(i for i, c in enumerate(self.configs) if c is config)
        return self.volume(self.starts[k]), self.volume(self.points[k])


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
        out[key] = ParetoSet(members, objectives, starts, points, pareto_front(points),
                             hypervolume_reference(np.concatenate([starts, points])))
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


def evaluation_cost_rows(runs: Sequence[StudyRun]) -> list[dict[str, Any]]:
    """Per (algorithm, model), summed over its runs: training seconds (Σ ``perf/step_s``; of them the end-of-step
    diagnostics, law monitor and probe, Σ ``time/diagnostics_s`` + ``time/probe_s``) and generated tokens
    (Σ ``train/length/mean`` × completions per step), and each evaluation mode's seconds, completions and tokens
    (``diagnostics.runs.eval_cost``); NaN where the runs did not log it."""
    grouped: dict[tuple[str, str], list[StudyRun]] = defaultdict(list)
    for r in runs:
        grouped[(r.algorithm, r.model)].append(r)
    rows = []
    for (algorithm, model), members in grouped.items():
        row: dict[str, Any] = {"algorithm": algorithm, "model": model, "runs": len(members),
                               "train_s": _total(members, lambda r: r.series("perf/step_s")[1]),
                               "diagnostics_s": _total(members, lambda r: np.concatenate(
                                   [r.series("time/diagnostics_s")[1], r.series("time/probe_s")[1]])),
                               "train_tokens": _total(members, _training_tokens)}
        for r in members:
            for mode, cost in eval_cost(r.records).items():
                for key in ("seconds", "completions", "tokens"):
                    row[f"{mode}_{key}"] = row.get(f"{mode}_{key}", 0.0) + float(cost[key])
        rows.append(row)
    return rows


def _total(runs: Sequence[StudyRun], values) -> float:
    """Σ over runs of Σ values(run); NaN when a run has none."""
    total = 0.0
    for r in runs:
        v = values(r)
        total += float(np.sum(v)) if len(v) else math.nan
    return total


def _training_tokens(run: StudyRun) -> np.ndarray:
    """Tokens generated for training at each logged step: mean completion length × completions per step."""
    rollout = run.run.config.get("rollout") or {}
    per_step = rollout.get("prompts_per_step", 0) * rollout.get("group_size", 0)
    return run.series("train/length/mean")[1] * per_step if per_step else np.array([])


# ------------------------------------------------------------------------------------------------ sentences


def signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def with_interval(change: ObjectiveChange | Contrast) -> str:
    """"−0.186 [−0.219, −0.154]": the change and its 95% interval."""
    low, high = change.change_ci
    return f"{signed(change.change)} [{signed(low)}, {signed(high)}]"


def join(items: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _named(changes: Sequence[ObjectiveChange]) -> str:
    return join([f"{ch.objective} ({with_interval(ch)})" for ch in changes])


SCORE_NAME = "the λ0-scalarized score"  # the fixed scalarization (diagnostics.interference)
NO_EFFECT = "no effect detected on any objective or on the λ0-scalarized score (every interval contains 0)"


def describe_moves(report: InterferenceReport) -> str:
    """What one verdict rests on, degradations first: "conciseness (−0.186 [−0.219, −0.154]) degrades on held-out
    prompts while accuracy (+0.155 […]) and clarity (+0.268 […]) rise; no effect detected on … ; the λ0-scalarized
    score rises (+0.079 […])". ``NO_EFFECT`` when every interval contains 0."""
    degraded = [ch for ch in report.changes if ch.degrades]
    improved = [ch for ch in report.changes if ch.rises]
    unclear = [ch for ch in report.changes if not ch.degrades and not ch.rises]
    if not degraded and not improved and not report.score.degrades and not report.score.rises:
        return NO_EFFECT
    moves = []
    if degraded:
        moves.append(f"{_named(degraded)} {'degrades' if len(degraded) == 1 else 'degrade'} on held-out prompts")
    if improved:
        verb = "rises" if len(improved) == 1 else "rise"
        moves.append(f"{_named(improved)} {verb}" + ("" if degraded else " on held-out prompts"))
    parts = [" while ".join(moves)] if moves else []
    if unclear:
        parts.append(f"no effect detected on {_named(unclear)}")
    score = report.score
    how = "rises" if score.rises else "falls" if score.degrades else "shows no detected change"
    parts.append(f"{SCORE_NAME} {how} ({with_interval(score)})")
    return "; ".join(parts)


def own_verdicts(configs: Sequence[ConfigResult], split: str) -> Optional[tuple[int, int]]:
    """(runs that interfere on their own, runs with a verdict) over the runs of ``configs``; None when every
    configuration has a single run (its own verdict is the table's)."""
    if all(len(c.runs) == 1 for c in configs):
        return None
    known = [v for c in configs for r in c.runs if (v := run_interference(r, split)) is not None]
    return sum(known), len(known)


def describe_configs(configs: Sequence[ConfigResult], split: str) -> list[str]:
    """One clause per algorithm with a detected effect: its moves and its verdict (seeds pooled), then how many of its
    runs interfere on their own. The two verdicts can differ: a change every seed repeats can be clear pooled and
    unclear within each run, and a change one run shows on its prompts can fail to generalise over seeds. The
    algorithms with no effect detected share one clause."""
    still = [c for c in configs if describe_moves(c.reports[split]) == NO_EFFECT]
    quiet = {id(c) for c in still}
    clauses = []
    for c in configs:
        if id(c) in quiet and c is not still[0]:
            continue
        group = still if id(c) in quiet else [c]
        text = NO_EFFECT if id(c) in quiet else f"{describe_moves(c.reports[split])}: **{c.reports[split].verdict}**"
        count = own_verdicts(group, split)
        runs = "" if count is None else f"; {count[0]} of {count[1]} runs interfere on their own"
        clauses.append(f"Under {join([g.label for g in group])}, {text}{runs}.")
    return clauses


def verdict_overview(configs: Sequence[ConfigResult], split: str) -> str:
    """"Verdicts (seeds pooled): interference under linear; improvement under ctwa and mgda." """
    by_verdict = {v: [c.label for c in configs if c.reports[split].verdict == v] for v in VERDICTS}
    pooled = " (seeds pooled)" if any(len(c.runs) > 1 for c in configs) else ""
    return f"Verdicts{pooled}: " + "; ".join(f"{v} under {join(labels)}" for v, labels in by_verdict.items()
                                             if labels) + "."


BASELINE = "linear"  # the algorithm every other one is compared with


def baseline_contrast(configs: Sequence[ConfigResult], split: str, baseline: str = BASELINE) -> Optional[str]:
    """For each objective that degrades under the baseline, how every other algorithm fares on it: "conciseness,
    which degrades under linear (−0.186 […]): rises under ctwa (+0.113 […]); no effect detected under mgda (…)"."""
    base = next((c for c in configs if c.first.algorithm == baseline and split in c.reports), None)
    others = [c for c in configs if c is not base and split in c.reports]
    if base is None or not others:
        return None
    sentences = []
    for j, change in enumerate(base.reports[split].changes):
        if not change.degrades:
            continue
        fates = {"degrades": [], "rises": [], "no effect detected": []}
        for c in others:
            other = c.reports[split].changes[j]
            fate = "degrades" if other.degrades else "rises" if other.rises else "no effect detected"
            fates[fate].append(f"{c.label} ({with_interval(other)})")
        told = [f"{'also degrades' if fate == 'degrades' else fate} under {join(names)}"
                for fate, names in fates.items() if names]
        sentences.append(f"{change.objective.capitalize()}, which degrades under {base.label} "
                         f"({with_interval(change)}): {'; '.join(told)}.")
    return " ".join(sentences) or None


def contrasts(configs: Sequence[ConfigResult], split: str, baseline: str = BASELINE
              ) -> list[tuple[ConfigResult, list[Contrast]]]:
    """Every non-baseline configuration of one comparison with its paired contrasts against the baseline (empty when
    the comparison has no baseline or a configuration cannot be paired with it)."""
    base = next((c for c in configs if c.first.algorithm == baseline), None)
    if base is None:
        return []
    out = []
    for c in configs:
        if c is base:
            continue
        found = contrast([r.run for r in base.runs], [r.run for r in c.runs], split)
        if found is not None:
            out.append((c, found))
    return out


def contrast_name(objective: str) -> str:
    return "the λ0-scalarized score" if objective == SCORE else objective


def describe_contrast(config: ConfigResult, found: Sequence[Contrast], baseline: str = BASELINE) -> str:
    """"Against linear (Δ − Δ_linear, 4 seeds paired), ctwa: ends lower on accuracy (−0.041 […]); no difference
    detected on conciseness (−0.061 […]), clarity (…) and the λ0-scalarized score (…)." Paired seeds start from the
    same policy, so a difference of changes is a difference of end points."""
    more = [c for c in found if c.higher]
    less = [c for c in found if c.lower]
    same = [c for c in found if not c.higher and not c.lower]

    def named(items: Sequence[Contrast]) -> str:
        return join([f"{contrast_name(c.objective)} ({with_interval(c)})" for c in items])

    parts = [f"ends higher on {named(more)}" if more else "", f"ends lower on {named(less)}" if less else "",
             f"no difference detected on {named(same)}" if same else ""]
    pairs = found[0].estimate.seeds
    return (f"Against {baseline} (Δ − Δ_{baseline}, {pairs} seed{'s' if pairs > 1 else ''} paired), {config.label}: "
            + "; ".join(p for p in parts if p) + ".")


@dataclass(frozen=True)
class Finding:
    """What one comparison (same model, estimator and objectives; different algorithms) shows."""

    head: str  # which comparison, on which split, over how many seeds
    overview: str  # the algorithms grouped by verdict
    clauses: list[str]  # per algorithm: its detected moves, its verdict and how often its runs interfered
    contrast: Optional[str]  # how the others fare on the objectives the baseline degrades
    against_baseline: list[str]  # per other algorithm: its change minus the baseline's, seeds paired
    summary: str  # the selection on the selection split, its value on the report split, and the Pareto front


def finding_for(pareto: ParetoSet, key: tuple[str, str, str], split: str, selection: Optional[ParetoSet],
                selection_split: str, paired: Sequence[tuple[ConfigResult, list[Contrast]]]) -> Finding:
    model, estimator, objective_set = key
    seeds = "/".join(str(n) for n in sorted({len(c.runs) for c in pareto.configs}))
    head = f"**{model}** ({estimator}; objectives {objective_set}; {split} split; {seeds} seed(s) per algorithm):"
    summary = ""
    if selection is not None and len(selection.configs) > 1:
        volumes = selection.end_hypervolumes()
        best = selection.configs[int(np.argmax(volumes))]
        start, end = pareto.of(next(c for c in pareto.configs if c.label == best.label))
        summary += (f"Chosen on {selection_split} by hypervolume: {best.label} ({max(volumes):.3f}); on {split} its "
                    f"hypervolume is {end:.3f} (start {start:.3f}). ")
    on_front = [c.label for c, on in zip(pareto.configs, pareto.on_front) if on]
    summary += (f"Pareto front on {split}: {join(on_front)} (hypervolume of the set {pareto.hypervolume:.3f}, of the "
                f"start {pareto.start_hypervolume:.3f}).")
    return Finding(head, verdict_overview(pareto.configs, split), describe_configs(pareto.configs, split),
                   baseline_contrast(pareto.configs, split),
                   [describe_contrast(c, found) for c, found in paired], summary)


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

    @cached_property
    def contrasts(self) -> dict[tuple[str, str, str], list[tuple[ConfigResult, list[Contrast]]]]:
        """Per comparison: each non-baseline configuration with its paired contrasts against the baseline."""
        return {key: contrasts(p.configs, self.split) for key, p in self.pareto.items()}

    @cached_property
    def law(self) -> Optional[LawEvidence]:
        """The covariance law's agreement at both scales (None when no run logged the law monitor)."""
        return law_evidence(self.runs)

    def findings(self) -> list[Finding]:
        selection = pareto_sets(self.configs, self.selection_split)
        return [finding_for(p, key, self.split, selection.get(key), self.selection_split, self.contrasts[key])
                for key, p in self.pareto.items()]

    def values_of(self, attribute: str) -> list[str]:
        """Distinct values of a run factor, in the order of the configurations (the baseline first)."""
        return list(dict.fromkeys(getattr(r, attribute) for c in self.configs for r in c.runs))
