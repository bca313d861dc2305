"""Cross-objective interference, measured on held-out per-objective curves (METHOD §1).

Training *interferes* when it raises a scalarized score while at least one objective degrades. Both are judged on
held-out evaluations — the sampled evaluation's expected rewards when the run has them, else greedy scores
(``diagnostics.runs``) — never on the training score ``train/score/mean``, whose scale moves with the weights
(CTWA's unnormalised λ, Lagrangian duals, Nash-MTL's α): a training score can rise from weight growth alone.

For one objective evaluated T times, with m_t the mean score over the evaluation prompts at evaluation t:

    change                   Δ      = m_{T−1} − m_0
    best change              Δ_best = max_t m_t − m_0
    area under degradation   A      = Σ_t max(0, m_0 − m_t)
    degrades / rises         ⇔  the confidence interval of Δ lies below / above 0

**The fixed scalarization.** "The scalarized score" is the linear scalarization with the weighting's initial
weights λ0 normalised to sum 1 (``scalarization/<objective>`` in the run's metrics; uniform when absent), scored per
prompt on the same evaluations, s_i = Σ_j λ0_j · score_ij, the same at every evaluation and for every algorithm
whose λ0 is the same. Its change has the same interval as an objective's.

Intervals of Δ (``diagnostics.crossed``, docs/statistics.md): for one run the paired t-interval over prompts (the
change of that run's policy over the prompt distribution); for the seeds of one configuration the crossed seeds ×
prompts interval (the change over the prompt distribution and the training randomness). Δ_best's interval: for
one run a paired percentile bootstrap over prompts that re-selects the best evaluation inside each resample; for
seeds Student's t over the per-seed best changes.

For a run (or a group of seeds):

    interference  ⇔ the fixed-scalarization score rises (interval above 0) and at least one objective degrades
                  (interval below 0). Both parts must be detected: a score whose interval contains 0 has not been
                  shown to rise.
    verdict       "interference"; else "degradation" when an objective degrades or the score falls; else
                  "improvement" when an objective or the score rises; else "no effect detected"
    worst change  min_j Δ_j
    hypervolume   HV of the final point m_{T−1} with the start point m_0 as reference: Π_j (end_j − start_j) when the
                  final point improves every objective, else 0. Computed with pymoo, which minimizes, on negated scores.
    train score gain  mean of the last k minus mean of the first k logged ``train/score/mean``, k = max(1, ⌊n/10⌋):
                  reported as a training curve's summary, never used in a verdict

Split: test when every run evaluated test at its first and last evaluation step, otherwise val (or the one asked for).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pymoo.indicators.hv import HV
from rich.console import Console
from rich.table import Table
from scipy import stats

from moalign.diagnostics.crossed import ChangeEstimate, change_interval
from moalign.diagnostics.runs import MODES, Run, choose_split, group_by_config, load_run
from moalign.errors import UserError

Interval = tuple[float, float]
SCORE = "score"  # the name of the fixed-scalarization score among the changes
VERDICTS = ("interference", "degradation", "improvement", "no effect detected")


@dataclass(frozen=True)
class IntervalSettings:
    confidence: float = 0.95
    n_resamples: int = 2000  # bootstrap resamples over prompts (Δ_best of one run)
    seed: int = 0  # the bootstrap's random seed: the same inputs always give the same interval


# ---------------------------------------------------------------------------------------------------------------
# Pure functions on arrays
# ---------------------------------------------------------------------------------------------------------------


def curve_means(per_prompt: np.ndarray) -> np.ndarray:
    """m_t: the mean over prompts of each evaluation ([T, N] -> [T]); missing (NaN) scores are left out."""
    return np.nanmean(per_prompt, axis=1)


def area_under_degradation(means: np.ndarray) -> float:
    """A = Σ_t max(0, m_0 − m_t): how far, summed over evaluations, the curve sat below its start."""
    return float(np.maximum(0.0, means[0] - means).sum())


def score_gain(train_score: np.ndarray) -> float:
    """Mean of the last k minus mean of the first k training scores, k = max(1, ⌊n/10⌋)."""
    k = max(1, len(train_score) // 10)
    return float(np.mean(train_score[-k:]) - np.mean(train_score[:k]))


def hypervolume(start: np.ndarray, end: np.ndarray) -> float:
    """HV({end}) with ``start`` as reference point (scores are maximized; pymoo minimizes, hence the negation)."""
    start, end = np.asarray(start, dtype=float), np.asarray(end, dtype=float)
    return float(HV(ref_point=-start)(-end[None, :]))


def percentile_interval(samples: np.ndarray, confidence: float) -> Interval:
    tail = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_best_change(per_prompt: np.ndarray, settings: IntervalSettings) -> Interval:
    """Paired bootstrap over prompts of Δ_best for per-prompt scores [T, N]; percentile interval."""
    num_prompts = per_prompt.shape[1]
    rng = np.random.default_rng(settings.seed)
    # Drawing N prompt indices with replacement is drawing how often each prompt is picked; with the counts as an
    # [R, N] matrix every resample's per-evaluation mean is one matrix product (no [R, T, N] gather).
    counts = rng.multinomial(num_prompts, np.full(num_prompts, 1.0 / num_prompts), size=settings.n_resamples)
    present = ~np.isnan(per_prompt)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of only missing prompts gives NaN, skipped
        means = (counts @ np.where(present, per_prompt, 0.0).T) / (counts @ present.T)  # [R, T]
    return percentile_interval(np.nanmax(means, axis=1) - means[:, 0], settings.confidence)


def t_interval(values: np.ndarray, confidence: float) -> Interval:
    """Student's t-interval for the mean of S ≥ 2 values: x̄ ± t_{(1+c)/2, S−1} · s/√S (s with ddof = 1)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        raise ValueError("a t-interval needs at least two values")
    half_width = stats.t.ppf((1.0 + confidence) / 2.0, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    mean = values.mean()
    return float(mean - half_width), float(mean + half_width)


class _Estimated:
    """A change with its interval (``estimate``, a ``ChangeEstimate``)."""

    estimate: ChangeEstimate

    @property
    def change(self) -> float:
        return self.estimate.mean

    @property
    def change_ci(self) -> Interval:
        return self.estimate.interval


@dataclass(frozen=True)
class ObjectiveChange(_Estimated):
    """How one objective (or the fixed-scalarization score) moved between the first and the last evaluation of one
    run or of the seeds of one configuration, with confidence intervals."""

    objective: str
    start: float  # m_0 (mean over seeds)
    end: float  # m_{T−1} (mean over seeds)
    best: float  # max_t m_t (mean over seeds)
    estimate: ChangeEstimate  # Δ and its interval
    best_change_ci: Interval
    area_under_degradation: float  # mean over seeds

    @property
    def best_change(self) -> float:
        return self.best - self.start

    @property
    def degrades(self) -> bool:
        return self.estimate.falls

    @property
    def rises(self) -> bool:
        return self.estimate.rises

    @classmethod
    def from_runs(cls, objective: str, per_prompt: Sequence[np.ndarray], settings: IntervalSettings
                  ) -> "ObjectiveChange":
        """Per-prompt scores [T_s, N] of each of S runs (T_s ≥ 2 evaluations each, the same N prompts in every run)."""
        means = [curve_means(p) for p in per_prompt]
        changes = np.stack([p[-1] - p[0] for p in per_prompt])
        try:
            estimate = change_interval(changes, settings.confidence)
        except ValueError as exc:
            raise UserError(f"{objective}: {exc}; evaluate more prompts (eval.num_prompts)") from None
        best_changes = np.array([m.max() - m[0] for m in means])
        best_ci = (bootstrap_best_change(per_prompt[0], settings) if len(per_prompt) == 1
                   else t_interval(best_changes, settings.confidence))
        return cls(objective, float(np.mean([m[0] for m in means])), float(np.mean([m[-1] for m in means])),
                   float(np.mean([m.max() for m in means])), estimate, best_ci,
                   float(np.mean([area_under_degradation(m) for m in means])))

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "best": self.best,
                "change": self.change, "change_ci": list(self.change_ci), "standard_error": self.estimate.standard_error,
                "df": self.estimate.df, "prompts": self.estimate.prompts,
                "best_change": self.best_change, "best_change_ci": list(self.best_change_ci),
                "area_under_degradation": self.area_under_degradation, "degrades": self.degrades, "rises": self.rises}


@dataclass(frozen=True)
class InterferenceReport:
    """The interference verdict of one run, or of one configuration over several seeds."""

    split: str
    mode: str  # the evaluations' mode: sampled or greedy
    changes: list[ObjectiveChange]
    score: ObjectiveChange  # the fixed-scalarization score (objective name "score")
    scalarization: dict[str, float]  # λ0 of the score
    train_score_gain: Optional[float]  # a training curve's summary; None when the run logged no train/score/mean
    seeds: int
    confidence: float

    @property
    def ci_method(self) -> str:
        return self.score.estimate.method

    @property
    def score_rises(self) -> bool:
        return self.score.rises

    @property
    def degraded_objectives(self) -> list[str]:
        return [c.objective for c in self.changes if c.degrades]

    @property
    def improved_objectives(self) -> list[str]:
        return [c.objective for c in self.changes if c.rises]

    @property
    def interference(self) -> bool:
        """True iff the fixed-scalarization score rises while at least one objective degrades (both detected)."""
        return self.score_rises and bool(self.degraded_objectives)

    @property
    def verdict(self) -> str:
        """One of ``VERDICTS`` (see the module docstring)."""
        if self.interference:
            return "interference"
        if self.degraded_objectives or self.score.degrades:
            return "degradation"
        if self.improved_objectives or self.score_rises:
            return "improvement"
        return "no effect detected"

    @property
    def worst(self) -> ObjectiveChange:
        return min(self.changes, key=lambda c: c.change)

    @property
    def hypervolume(self) -> float:
        return hypervolume(np.array([c.start for c in self.changes]), np.array([c.end for c in self.changes]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; this is what goes into summary.json under "interference"."""
        return {"split": self.split, "mode": self.mode, "seeds": self.seeds, "confidence": self.confidence,
                "ci_method": self.ci_method, "verdict": self.verdict, "interference": self.interference,
                "scalarization": dict(self.scalarization), "score": self.score.to_dict(),
                "score_change": self.score.change, "score_change_ci": list(self.score.change_ci),
                "score_rises": self.score_rises, "train_score_gain": self.train_score_gain,
                "degraded_objectives": self.degraded_objectives, "improved_objectives": self.improved_objectives,
                "worst_objective": self.worst.objective, "worst_change": self.worst.change,
                "hypervolume": self.hypervolume,
                "objectives": {c.objective: c.to_dict() for c in self.changes}}


# ---------------------------------------------------------------------------------------------------------------
# Runs -> reports
# ---------------------------------------------------------------------------------------------------------------


def common_mode(runs: Sequence[Run], split: str) -> str:
    """The mode every run evaluated ``split`` in, sampled first (the verdicts' mode)."""
    for mode in MODES:
        if all(split in run.evaluations_by_mode.get(mode, {}) for run in runs):
            return mode
    raise UserError(f"runs {', '.join(str(r.path) for r in runs)} share no evaluation mode on the {split!r} split; "
                    f"compare runs evaluated alike (eval.mode)")


def interference_report(runs: Sequence[Run], split: str, settings: IntervalSettings = IntervalSettings(),
                        mode: Optional[str] = None) -> InterferenceReport:
    """The report of one run or of the seeds of one configuration, on ``split`` in ``mode`` (default: sampled
    when every run has it, else greedy)."""
    mode = mode or common_mode(runs, split)
    evaluations = [run.evaluations_by_mode[mode][split] for run in runs]
    for run, e in zip(runs, evaluations):
        if len(e.steps) < 2:
            run.evaluations_for(split)  # raises the one-evaluation error
    changes = [ObjectiveChange.from_runs(objective, [e.per_prompt[objective] for e in evaluations], settings)
               for objective in runs[0].objectives]
    weights = runs[0].scalarization
    score = ObjectiveChange.from_runs(SCORE, [e.scalarized(weights) for e in evaluations], settings)
    gains = [score_gain(run.train_score) if len(run.train_score) else None for run in runs]
    gain = None if None in gains else float(np.mean(gains))
    return InterferenceReport(split, mode, changes, score, dict(weights), gain, len(runs), settings.confidence)


@dataclass(frozen=True)
class Contrast(_Estimated):
    """How much more one configuration changed an objective than a baseline did, seeds paired by their seed.

    For seed s in both configurations and prompt p, d[s, p] = Δ_other[s, p] − Δ_baseline[s, p] (each the prompt's
    end − start). Runs that share a seed start from the same policy and draw the same evaluation completions
    (common random numbers), so d is the difference of the two end policies; the S pairs are independent
    replicates, and the crossed seeds × prompts interval of ``change_interval`` applies to d unchanged."""

    objective: str
    baseline_change: float  # mean Δ of the baseline over the paired seeds
    other_change: float
    estimate: ChangeEstimate

    @property
    def higher(self) -> bool:
        return self.estimate.rises

    @property
    def lower(self) -> bool:
        return self.estimate.falls


def contrast(baseline: Sequence[Run], other: Sequence[Run], split: str, settings: IntervalSettings = IntervalSettings()
             ) -> Optional[list[Contrast]]:
    """Δ_other − Δ_baseline per objective and for the fixed-scalarization score (last), over the seeds both ran;
    None when they share no seed, no evaluation mode on ``split``, or their evaluations have different prompt
    counts (different prompts cannot be paired)."""
    pairs = [(b, o) for b in baseline for o in other if b.seed is not None and b.seed == o.seed]
    if not pairs:
        return None
    try:
        mode = common_mode([r for pair in pairs for r in pair], split)
    except UserError:
        return None
    evaluations = [(b.evaluations_by_mode[mode][split], o.evaluations_by_mode[mode][split]) for b, o in pairs]
    weights = baseline[0].scalarization
    if weights != other[0].scalarization:
        return None  # different λ0: their scores are different functions

    def table(e, objective: str) -> np.ndarray:
        return e.scalarized(weights) if objective == SCORE else e.per_prompt[objective]

    out = []
    for objective in [*baseline[0].objectives, SCORE]:
        tables = [(table(eb, objective), table(eo, objective)) for eb, eo in evaluations]
        if any(tb.shape[1] != to.shape[1] for tb, to in tables):
            return None
        b_changes = np.stack([tb[-1] - tb[0] for tb, _ in tables])
        o_changes = np.stack([to[-1] - to[0] for _, to in tables])
        try:
            estimate = change_interval(o_changes - b_changes, settings.confidence)
        except ValueError:
            return None
        out.append(Contrast(objective, float(np.nanmean(b_changes)), float(np.nanmean(o_changes)), estimate))
    return out


def interference_summary(run_dir: Path | str, split: Optional[str] = None,
                         settings: IntervalSettings = IntervalSettings()) -> dict[str, Any]:
    """One run's report as a dict, to merge into its summary.json under "interference"."""
    run = load_run(run_dir)
    return interference_report([run], choose_split([run], split), settings).to_dict()


def interference_table(run_dirs: Sequence[Path | str], split: Optional[str] = None,
                       settings: IntervalSettings = IntervalSettings()) -> list[dict[str, Any]]:
    """One row per configuration (runs differing only in seed are grouped), in the order given.

    Each row is ``InterferenceReport.to_dict()`` plus ``name`` and ``runs`` (path, seed, first and last evaluation
    step of each run). One split serves the whole table, so that its rows compare.
    """
    if not run_dirs:
        raise UserError("no run directories given; pass at least one directory a training run wrote")
    unique_dirs = list(dict.fromkeys(Path(os.path.realpath(d)) for d in run_dirs))  # a run passed twice is not two seeds
    runs = [load_run(d) for d in unique_dirs]
    split = choose_split(runs, split)
    rows = []
    for group in group_by_config(runs):
        row = {"name": _group_name(group)}
        row["runs"] = [{"path": str(run.path), "seed": run.seed,
                        "start_step": int(run.evaluations_for(split).steps[0]),
                        "end_step": int(run.evaluations_for(split).steps[-1])} for run in group]
        rows.append(row | interference_report(group, split, settings).to_dict())
    return rows


def _group_name(group: Sequence[Run]) -> str:
    """The run directory's name; for seeds, their names' common prefix as a glob (``lin-s1``, ``lin-s2`` -> ``lin-s*``)."""
    names = [run.path.name for run in group]
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    return f"{prefix}*" if prefix else ",".join(names)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def format_interference_table(rows: Sequence[dict[str, Any]], width: int = 240) -> str:
    """Rows of ``interference_table`` as plain text: one line per objective and one for the fixed-scalarization
    score, run-level cells on the first line."""
    table = Table(title="Cross-objective interference (Δ = last − first evaluation; score = fixed scalarization λ0)")
    for column in ("run", "seeds", "split", "objective", "start", "end", "Δ end [CI]", "Δ best [CI]",
                   "area↓", "flag", "verdict", "worst Δ", "HV"):
        table.add_column(column, justify="left" if column in ("run", "seeds", "split", "objective", "verdict")
                         else "right", no_wrap=True)
    for row in rows:
        run_cells = [row["name"], ",".join(str(r["seed"]) for r in row["runs"]), f"{row['split']} {row['mode']}"]
        verdict_cells = [row["verdict"], f"{_signed(row['worst_change'])} ({row['worst_objective']})",
                         f"{row['hypervolume']:.4f}"]
        lines = list(row["objectives"].items()) + [(SCORE, row["score"])]
        for index, (objective, change) in enumerate(lines):
            first = index == 0
            flag = "degrades" if change["degrades"] else "rises" if change["rises"] else ""
            table.add_row(*(run_cells if first else [""] * 3), objective,
                          f"{change['start']:.3f}", f"{change['end']:.3f}",
                          _with_interval(change["change"], change["change_ci"]),
                          _with_interval(change["best_change"], change["best_change_ci"]),
                          f"{change['area_under_degradation']:.3f}", flag,
                          *(verdict_cells if first else [""] * 3),
                          end_section=index == len(lines) - 1)
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(table)
    return console.file.getvalue()


def _signed(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _with_interval(value: float, interval: Sequence[float]) -> str:
    return f"{value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"
