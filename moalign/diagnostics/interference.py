"""Cross-objective interference, measured on held-out per-objective curves (METHOD §1).

Training *interferes* when it raises the scalarized training score while at least one objective degrades. The
objectives are judged on evaluation curves, never on the scalar reward (algorithms scale it differently).

For one objective evaluated T times, with m_t the mean score over the evaluation prompts at evaluation t:

    change                   Δ      = m_{T−1} − m_0
    best change              Δ_best = max_t m_t − m_0
    area under degradation   A      = Σ_t max(0, m_0 − m_t)
    degrades                 ⇔  the upper end of the 95% confidence interval of Δ is < 0

Confidence intervals
    one run      paired percentile bootstrap over evaluation prompts: draw N prompt indices with replacement
                 (2000 resamples, seeded) and recompute every m_t on the same draw, so Δ = mean(end_i − start_i)
                 keeps each prompt's pairing; Δ_best re-selects the best evaluation inside each resample, so its
                 interval accounts for taking a maximum.
    seeds        runs whose configs differ only in the seed form one group. The group's values are means over seeds
                 and the interval is Student's t over the per-seed values, x̄ ± t_{(1+c)/2, S−1}·s/√S. A bootstrap
                 over 3–5 seeds has too few distinct resamples (10 for S = 3) and covers too little; the t-interval
                 is exact when seed noise is normal. It covers training randomness on the fixed evaluation set.

For a run (or a group):

    score gain    mean of the last k minus mean of the first k logged ``train/score/mean`` values,
                  k = max(1, ⌊n/10⌋) for n logged steps (10% of training at each end); the score rises iff gain > 0
    interference  ⇔ the score rises and at least one objective degrades
    worst change  min_j Δ_j
                  (for a group: score gain is the mean over seeds; worst change and hypervolume use the mean points)
    hypervolume   HV of the final point m_{T−1} with the start point m_0 as reference: the volume of the box between
                  them, Π_j (end_j − start_j), when the final point improves every objective, and 0 otherwise (a point
                  that does not dominate the reference encloses no volume). Computed with pymoo, which minimizes, on
                  negated scores.

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

from moalign.diagnostics.runs import Run, choose_split, group_by_config, load_run
from moalign.errors import UserError

Interval = tuple[float, float]


@dataclass(frozen=True)
class IntervalSettings:
    confidence: float = 0.95
    n_resamples: int = 2000  # bootstrap resamples over prompts
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


def bootstrap_changes(per_prompt: np.ndarray, settings: IntervalSettings) -> tuple[Interval, Interval]:
    """Paired bootstrap over prompts of (Δ, Δ_best) for per-prompt scores [T, N]; percentile intervals."""
    num_prompts = per_prompt.shape[1]
    rng = np.random.default_rng(settings.seed)
    # Drawing N prompt indices with replacement is drawing how often each prompt is picked; with the counts as an
    # [R, N] matrix every resample's per-evaluation mean is one matrix product (no [R, T, N] gather).
    counts = rng.multinomial(num_prompts, np.full(num_prompts, 1.0 / num_prompts), size=settings.n_resamples)
    present = ~np.isnan(per_prompt)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of only missing prompts gives NaN, skipped
        means = (counts @ np.where(present, per_prompt, 0.0).T) / (counts @ present.T)  # [R, T]
    change = means[:, -1] - means[:, 0]
    best_change = np.nanmax(means, axis=1) - means[:, 0]
    return percentile_interval(change, settings.confidence), percentile_interval(best_change, settings.confidence)


def t_interval(values: np.ndarray, confidence: float) -> Interval:
    """Student's t-interval for the mean of S ≥ 2 values: x̄ ± t_{(1+c)/2, S−1} · s/√S (s with ddof = 1)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        raise ValueError("a t-interval needs at least two values")
    half_width = stats.t.ppf((1.0 + confidence) / 2.0, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    mean = values.mean()
    return float(mean - half_width), float(mean + half_width)


@dataclass(frozen=True)
class ObjectiveChange:
    """How one objective moved between the first and the last evaluation, with confidence intervals."""

    objective: str
    start: float
    end: float
    best: float
    change_ci: Interval
    best_change_ci: Interval
    area_under_degradation: float

    @property
    def change(self) -> float:
        return self.end - self.start

    @property
    def best_change(self) -> float:
        return self.best - self.start

    @property
    def degrades(self) -> bool:
        return self.change_ci[1] < 0

    @classmethod
    def from_prompts(cls, objective: str, per_prompt: np.ndarray, settings: IntervalSettings) -> "ObjectiveChange":
        """One run: per-prompt scores [T, N] of T ≥ 2 evaluations; intervals from the bootstrap over prompts."""
        means = curve_means(per_prompt)
        change_ci, best_change_ci = bootstrap_changes(per_prompt, settings)
        return cls(objective, float(means[0]), float(means[-1]), float(means.max()), change_ci, best_change_ci,
                   area_under_degradation(means))

    @classmethod
    def over_seeds(cls, per_seed: Sequence["ObjectiveChange"], settings: IntervalSettings) -> "ObjectiveChange":
        """Several seeds of one configuration: means over seeds, t-intervals over the per-seed changes."""
        def mean_of(attribute: str) -> float:
            return float(np.mean([getattr(c, attribute) for c in per_seed]))

        def interval_of(attribute: str) -> Interval:
            return t_interval(np.array([getattr(c, attribute) for c in per_seed]), settings.confidence)

        return cls(per_seed[0].objective, mean_of("start"), mean_of("end"), mean_of("best"), interval_of("change"),
                   interval_of("best_change"), mean_of("area_under_degradation"))

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "best": self.best,
                "change": self.change, "change_ci": list(self.change_ci),
                "best_change": self.best_change, "best_change_ci": list(self.best_change_ci),
                "area_under_degradation": self.area_under_degradation, "degrades": self.degrades}


@dataclass(frozen=True)
class InterferenceReport:
    """The interference verdict of one run, or of one configuration over several seeds."""

    split: str
    changes: list[ObjectiveChange]
    score_gain: Optional[float]  # None when the run logged no train/score/mean
    ci_method: str
    confidence: float

    @property
    def score_rises(self) -> Optional[bool]:
        return None if self.score_gain is None else self.score_gain > 0

    @property
    def degraded_objectives(self) -> list[str]:
        return [c.objective for c in self.changes if c.degrades]

    @property
    def interference(self) -> Optional[bool]:
        """True iff the scalarized training score rises while at least one objective degrades (None: no score)."""
        return None if self.score_rises is None else self.score_rises and bool(self.degraded_objectives)

    @property
    def worst(self) -> ObjectiveChange:
        return min(self.changes, key=lambda c: c.change)

    @property
    def hypervolume(self) -> float:
        return hypervolume(np.array([c.start for c in self.changes]), np.array([c.end for c in self.changes]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; this is what goes into summary.json under "interference"."""
        return {"split": self.split, "confidence": self.confidence, "ci_method": self.ci_method,
                "score_gain": self.score_gain, "score_rises": self.score_rises, "interference": self.interference,
                "degraded_objectives": self.degraded_objectives,
                "worst_objective": self.worst.objective, "worst_change": self.worst.change,
                "hypervolume": self.hypervolume,
                "objectives": {c.objective: c.to_dict() for c in self.changes}}


# ---------------------------------------------------------------------------------------------------------------
# Runs -> reports
# ---------------------------------------------------------------------------------------------------------------


def interference_report(runs: Sequence[Run], split: str, settings: IntervalSettings = IntervalSettings()
                        ) -> InterferenceReport:
    """The report of one run (bootstrap over prompts) or of the seeds of one configuration (t over seeds)."""
    per_run = [[ObjectiveChange.from_prompts(objective, run.evaluations_for(split).per_prompt[objective], settings)
                for objective in runs[0].objectives] for run in runs]
    gains = [score_gain(run.train_score) if len(run.train_score) else None for run in runs]
    gain = None if None in gains else float(np.mean(gains))
    if len(runs) == 1:
        num_prompts = runs[0].evaluations_for(split).per_prompt[runs[0].objectives[0]].shape[1]
        method = f"paired bootstrap over {num_prompts} prompts ({settings.n_resamples} resamples, seed {settings.seed})"
        return InterferenceReport(split, per_run[0], gain, method, settings.confidence)
    changes = [ObjectiveChange.over_seeds(same_objective, settings) for same_objective in zip(*per_run)]
    return InterferenceReport(split, changes, gain, f"t-interval over {len(runs)} seeds", settings.confidence)


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
    unique_dirs = list(dict.fromkeys(Path(d).resolve() for d in run_dirs))  # a run passed twice is not two seeds
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
    """Rows of ``interference_table`` as plain text: one line per objective, run-level cells on its first line."""
    table = Table(title="Cross-objective interference (Δ = last − first evaluation)")
    for column in ("run", "seeds", "split", "objective", "start", "end", "Δ end [CI]", "Δ best [CI]",
                   "area↓", "degrades", "score Δ", "interference", "worst Δ", "HV"):
        table.add_column(column, justify="left" if column in ("run", "seeds", "split", "objective") else "right",
                         no_wrap=True)
    for row in rows:
        run_cells = [row["name"], ",".join(str(r["seed"]) for r in row["runs"]), row["split"]]
        verdict_cells = [_signed(row["score_gain"]), _yes_no(row["interference"]),
                         f"{_signed(row['worst_change'])} ({row['worst_objective']})", f"{row['hypervolume']:.4f}"]
        for index, (objective, change) in enumerate(row["objectives"].items()):
            first = index == 0
            table.add_row(*(run_cells if first else [""] * 3), objective,
                          f"{change['start']:.3f}", f"{change['end']:.3f}",
                          _with_interval(change["change"], change["change_ci"]),
                          _with_interval(change["best_change"], change["best_change_ci"]),
                          f"{change['area_under_degradation']:.3f}", _yes_no(change["degrades"]),
                          *(verdict_cells if first else [""] * 4),
                          end_section=index == len(row["objectives"]) - 1)
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(table)
    return console.file.getvalue()


def _signed(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _with_interval(value: float, interval: Sequence[float]) -> str:
    return f"{value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"


def _yes_no(flag: Optional[bool]) -> str:
    return "n/a" if flag is None else ("yes" if flag else "no")
