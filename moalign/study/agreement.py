"""The covariance law against what runs realised, where the realised change can be told from noise.

The law (METHOD §2) predicts objective j's first-order change from Cov(r_j, w) of each step's training batch
(``law/cov_w/<j>``; ``law/cov_s/<j>`` when the clipped signal was not measured). A study checks it at two scales:

* **per step**, against the probe prompts re-sampled after every update (``law/realised/<j>``, with its standard
  error ``law/realised_se/<j>`` from the probe's paired completions; ``diagnostics.probe_prompts`` ×
  ``diagnostics.probe_group_size`` completions);
* **per evaluation interval**, against the held-out evaluation: the change of the sampled validation evaluation
  between two consecutive evaluations (common random numbers, so paired), with its standard error over prompts
  (``diagnostics.crossed.change_interval`` on the run's per-prompt changes), against the sum of the per-step
  predictions over the interval's steps (the first-order law summed: each step's size a common multiple of its
  covariance). ``eval.num_prompts`` × ``eval.samples`` completions.

Pairs are binned by |predicted| (``diagnostics.law.agreement_bins``); a bin is *resolved* when its realised changes
carry at least as much policy change as sampling noise, and only there does sign agreement measure the law.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import numpy as np

from moalign.diagnostics.crossed import change_interval
from moalign.diagnostics.law import AgreementBin, agreement_bin, bin_parts

PROBE = "step"  # the per-step probe
EVALUATION = "interval"  # the held-out evaluation, per interval between evaluations


@dataclass(frozen=True)
class LawPairs:
    """One run's (predicted, realised, standard error) triples at one scale, pooled over objectives."""

    algorithm: str
    predicted: list[float]
    realised: list[float]
    se: list[float]  # NaN where the run did not log it
    completions: Optional[int]  # the probe's completions (probe size) behind each realised change, when known


def _prediction(record: dict, objective: str) -> Optional[float]:
    value = record.get(f"law/cov_w/{objective}", record.get(f"law/cov_s/{objective}"))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def step_pairs(run) -> LawPairs:
    """Every (step, objective) whose record holds a prediction and the probe's realised change."""
    predicted, realised, se, sizes = [], [], [], set()
    for record in run.records:
        for objective in run.run.objectives:
            p, r = _prediction(record, objective), _number(record.get(f"law/realised/{objective}"))
            if p is None or r is None:
                continue
            s = _number(record.get(f"law/realised_se/{objective}"))
            predicted.append(p)
            realised.append(r)
            se.append(math.nan if s is None else s)
            if isinstance(record.get("law/probe_completions"), int):
                sizes.add(record["law/probe_completions"])
    return LawPairs(run.algorithm, predicted, realised, se, sizes.pop() if len(sizes) == 1 else None)


def interval_pairs(run, split: str = "val") -> LawPairs:
    """Every (evaluation interval, objective) of the run's sampled ``split`` evaluations whose steps all logged a
    prediction: Σ predictions over the interval's steps against the evaluation's change and its standard error."""
    evaluations = run.run.evaluations_by_mode.get("sampled", {}).get(split)
    predicted, realised, se = [], [], []
    if evaluations is None or len(evaluations.steps) < 2:
        return LawPairs(run.algorithm, predicted, realised, se, None)
    by_step = {record["step"]: record for record in run.records}
    for k in range(len(evaluations.steps) - 1):
        first, last = int(evaluations.steps[k]), int(evaluations.steps[k + 1])
        for objective in run.run.objectives:
            steps = [_prediction(by_step.get(step, {}), objective) for step in range(first + 1, last + 1)]
            if not steps or None in steps:
                continue
            per_prompt = evaluations.per_prompt[objective]
            try:
                estimate = change_interval(per_prompt[k + 1] - per_prompt[k])
            except ValueError:  # fewer than two prompts with a score at both evaluations
                continue
            predicted.append(float(sum(steps)))
            realised.append(estimate.mean)
            se.append(estimate.standard_error)
    first_samples = next(iter(evaluations.per_sample.values()), None)
    completions = None if first_samples is None else int(first_samples.shape[1] * first_samples.shape[2])
    return LawPairs(run.algorithm, predicted, realised, se, completions)


@dataclass(frozen=True)
class LawScale:
    """The law's agreement at one scale over a set of runs: the pooled pairs, their bins by |predicted| and each
    algorithm's pairs."""

    scale: str  # PROBE or EVALUATION
    predicted: np.ndarray  # pooled over runs and objectives
    realised: np.ndarray
    se: np.ndarray
    parts: list[np.ndarray]  # indices of each bin's pairs, smallest |predicted| first
    algorithms: dict[str, AgreementBin]  # all pairs of each algorithm
    completions: Optional[int]  # behind each realised change (when every run used the same number)

    def _of(self, index: np.ndarray) -> AgreementBin:
        return agreement_bin(self.predicted[index], self.realised[index], self.se[index])

    @cached_property
    def bins(self) -> list[AgreementBin]:
        return [self._of(part) for part in self.parts]

    @property
    def pooled(self) -> AgreementBin:
        """Every pair together."""
        return self._of(np.arange(len(self.predicted)))

    @property
    def resolved_bins(self) -> list[AgreementBin]:
        return [b for b in self.bins if b.resolved]

    def resolved(self) -> Optional[AgreementBin]:
        """The pairs of every resolved bin together (None when no bin is)."""
        index = [part for part, b in zip(self.parts, self.bins) if b.resolved]
        return self._of(np.concatenate(index)) if index else None

    def completions_to_resolve(self) -> Optional[float]:
        """Completions per realised change at which the bin of the largest predictions would be resolved (noise
        ∝ 1/√n): n · (noise / signal)²; None without a size, a noise or any signal beyond it."""
        top = self.bins[-1] if self.bins else None
        if top is None or self.completions is None or not math.isfinite(top.noise) or not top.signal > 0:
            return None
        return self.completions * (top.noise / top.signal) ** 2


def _pooled(pairs: Sequence[LawPairs]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.array([v for x in pairs for v in getattr(x, f)], dtype=float)
                 for f in ("predicted", "realised", "se"))


def law_scale(pairs: Sequence[LawPairs], scale: str, num_bins: int = 4) -> Optional[LawScale]:
    """Binned and per-algorithm agreement of ``pairs`` (None when no run has a pair at this scale)."""
    pairs = [x for x in pairs if x.predicted]
    if not pairs:
        return None
    predicted, realised, se = _pooled(pairs)
    by_algorithm: dict[str, list[LawPairs]] = {}
    for x in pairs:
        by_algorithm.setdefault(x.algorithm, []).append(x)
    algorithms = {a: agreement_bin(*_pooled(members)) for a, members in by_algorithm.items()}
    sizes = {x.completions for x in pairs}
    return LawScale(scale, predicted, realised, se, bin_parts(predicted, num_bins), algorithms,
                    sizes.pop() if len(sizes) == 1 else None)


@dataclass(frozen=True)
class LawEvidence:
    """The law at both scales for the runs of a study (None where no run has a pair at that scale)."""

    step: Optional[LawScale]
    interval: Optional[LawScale]


def law_evidence(runs: Sequence, num_bins: int = 4) -> Optional[LawEvidence]:
    """None when no run logged a prediction (the law monitor was off)."""
    evidence = LawEvidence(law_scale([step_pairs(r) for r in runs], PROBE, num_bins),
                           law_scale([interval_pairs(r) for r in runs], EVALUATION, num_bins))
    return evidence if evidence.step or evidence.interval else None


# ------------------------------------------------------------------------------------------------ sentences

WHERE = {PROBE: "Per step (the probe prompts re-sampled after each update)",
         EVALUATION: "Per evaluation interval (the held-out val evaluation)"}
SIZE_KNOB = {PROBE: "diagnostics.probe_prompts × diagnostics.probe_group_size",
             EVALUATION: "eval.num_prompts × eval.samples"}


def _ratio(value: float, interval: tuple[float, float], digits: int = 2) -> str:
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def _correlation(b: AgreementBin) -> str:
    low, high = b.correlation_ci
    return f"{b.correlation:+.2f} [{low:+.2f}, {high:+.2f}]".replace("-", "−")


def join_ranges(bins: Sequence[AgreementBin]) -> str:
    return ", ".join(f"{b.low:.3g}–{b.high:.3g}" for b in bins)


def describe_scale(scale: LawScale) -> str:
    """One generated sentence: where the law's agreement is measurable at this scale and what it is, or why it is
    not measurable and what probe size would resolve it."""
    where = WHERE[scale.scale]
    size = f"{scale.completions} completions per measurement" if scale.completions else "measurement size not logged"
    bins = scale.bins
    if not all(math.isfinite(b.noise) for b in bins):
        total = scale.pooled
        return (f"{where}: sign agreement {_ratio(total.sign_agreement, total.sign_agreement_ci)} over {total.signed} "
                f"pairs, correlation {_correlation(total)}; the realised changes' standard errors were not logged, so "
                f"whether they resolve the predicted changes is unknown.")
    resolved = scale.resolved_bins
    if resolved:
        pooled = scale.resolved()
        span = (f"|predicted| ≥ {resolved[0].low:.3g}" if resolved == bins[len(bins) - len(resolved):] else
                "|predicted| in " + join_ranges(resolved))
        text = (f"{where}, {size}: the realised changes exceed their noise in {len(resolved)} of {len(bins)} bins "
                f"({span}); there the predicted change's sign agrees with the realised one in "
                f"{_ratio(pooled.sign_agreement, pooled.sign_agreement_ci)} of {pooled.signed} pairs (correlation "
                f"{_correlation(pooled)})")
        unresolved = [b for b in bins if not b.resolved]
        if unresolved:
            ratios = [b.signal / b.noise for b in unresolved if b.noise > 0]
            span = ("" if not ratios else f" (signal/noise {ratios[0]:.2f})" if len(ratios) == 1 else
                    f" (signal/noise {min(ratios):.2f}–{max(ratios):.2f})")
            where_not = "the other bin" if len(unresolved) == 1 else "the other bins"
            text += f"; in {where_not} the changes are within the noise{span}, where agreement does not measure the law"
        return text + "."
    top = bins[-1]
    text = (f"{where}, {size}: no bin's realised changes exceed their noise (largest predictions: signal "
            f"{top.signal:.2g} against noise {top.noise:.2g}), so the law's agreement is not measurable here")
    needed = scale.completions_to_resolve()
    if needed is not None:
        text += (f"; resolving the largest predicted changes takes ≈ {float(f'{needed:.2g}'):,.0f} completions per "
                 f"measurement ({SIZE_KNOB[scale.scale]}, now {scale.completions})")
    else:
        text += (f"; the largest predictions show no change beyond the noise, so the size of "
                 f"{SIZE_KNOB[scale.scale]} that would resolve them is unknown")
    return text + "."
