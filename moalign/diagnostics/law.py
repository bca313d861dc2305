"""The local covariance law, live on any run (METHOD §2).

Each step, per objective j and within prompt groups, the monitor measures

    Cov(r_j, s)   with the scalarized score s            (the law for a KL-proximal / natural-gradient step)
    Cov(r_j, w)   with the clipped training signal w      (the law under the PPO/GRPO clipped surrogate)

together with the unclipped token fraction and the clipping distortion E|w_clip − w_unclip|. The *predicted*
change of objective j is sign(Cov(r_j, w)) with first-order size ∝ Cov(r_j, w). The *realised* change is measured on
a fixed probe set of prompts re-sampled after the update (common random numbers: completion k of a probe prompt
draws its tokens from the same uniforms every time, so the difference reflects the policy, not the dice). With the
probe's per-completion rewards the monitor also logs the realised change's standard error (``law/realised_se/<j>``,
the standard deviation of the completions' paired changes over √n): the probe's resolution, below which a realised
change cannot be told from sampling noise. The monitor keeps the running sign-agreement rate and the correlation
between predicted and realised changes, and warns when an objective's covariance stays negative for ``warn_after``
consecutive steps — the early sign of interference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import stats

from moalign.rl.covariance import (
    drop_outliers,
    group_covariance,
    training_signal,
)
from moalign.weighting.base import StepStats


@dataclass
class Agreement:
    """Predicted vs realised changes of every (step, objective) pair seen so far."""

    predicted: list[float] = field(default_factory=list)
    realised: list[float] = field(default_factory=list)

    def add(self, predicted: torch.Tensor, realised: torch.Tensor) -> None:
        for p, r in zip(predicted.tolist(), realised.tolist()):
            if math.isfinite(p) and math.isfinite(r):
                self.predicted.append(p)
                self.realised.append(r)

    def summary(self, prefix: str) -> dict[str, float]:
        """The share of pairs whose predicted and realised changes have the same strict sign (pairs where either is
        0 are left out), and their Pearson correlation."""
        pairs = [(p, r) for p, r in zip(self.predicted, self.realised) if p != 0 and r != 0]
        agree = sum((p > 0) == (r > 0) for p, r in pairs) / len(pairs) if pairs else math.nan
        return {f"{prefix}sign_agreement": agree, f"{prefix}correlation": pearson(self.predicted, self.realised),
                f"{prefix}num_pairs": float(len(pairs))}


@dataclass
class LawMonitor:
    """Two realised changes are compared with each prediction: the probe set's (``realise``, exact up to sampling
    noise with common random numbers) and, for free on every run, the next training batch's per-objective means
    (``batch_``-prefixed metrics; other prompts, so noisier)."""

    objectives: Sequence[str]
    warn_after: int = 3
    probe: Agreement = field(default_factory=Agreement)
    batch: Agreement = field(default_factory=Agreement)
    _pending: torch.Tensor | None = None  # prediction awaiting the probe's realised change
    _pending_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (prediction, batch means) of the last step
    _streak: list[int] = field(default_factory=list)

    def __post_init__(self):
        self._streak = self._streak or [0] * len(self.objectives)

    def observe_step(self, stats: StepStats) -> dict[str, float]:
        """Covariances of this step (Cov(r, w) needs ``stats.new_logprobs``); the previous step's prediction is
        checked against this batch's means, and this step's prediction waits for ``realise``/the next batch."""
        out: dict[str, float] = {}
        means = torch.nanmean(stats.rewards.double(), dim=0)
        if self._pending_batch is not None:
            self.batch.add(self._pending_batch[0], means - self._pending_batch[1])
            out.update(self.batch.summary("law/batch_"))
        cov_s = group_covariance(stats.rewards, stats.scores, stats.group_ids).cov
        if stats.new_logprobs is None:
            cov_w = None
        else:
            sig = training_signal(stats.advantages, stats.old_logprobs, stats.new_logprobs, stats.response_mask,
                                  stats.clip_eps_low, stats.clip_eps_high)
            cov_w = group_covariance(stats.rewards, sig.w, stats.group_ids, valid=drop_outliers(sig.w)).cov
            out["law/unclipped_fraction"] = float(sig.unclipped_fraction)
            out["law/clip_distortion"] = float(sig.distortion)
        pred = (cov_w if cov_w is not None else cov_s).double()
        self._pending = pred.clone()
        self._pending_batch = (pred.clone(), means)
        for j, name in enumerate(self.objectives):
            out[f"law/cov_s/{name}"] = float(cov_s[j])
            if cov_w is not None:
                out[f"law/cov_w/{name}"] = float(cov_w[j])
            self._streak[j] = self._streak[j] + 1 if float(pred[j]) < 0 else 0
            out[f"law/negative_streak/{name}"] = self._streak[j]
        return out

    def warnings(self) -> list[str]:
        return [f"covariance of {name} with the training signal has been negative for {k} steps: it is likely to "
                f"degrade (cross-objective interference)" for name, k in zip(self.objectives, self._streak)
                if k >= self.warn_after and k % self.warn_after == 0]

    def realise(self, before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
        """Record the realised per-objective change on the probe set for the last observed step. ``before`` and
        ``after`` are the probe's per-objective means [M] (exact values: no standard error), or its per-completion
        rewards [n, M] with completion i drawn on the same random numbers in both (NaN = missing): then the change is
        the mean of the paired differences and ``law/realised_se/<j>`` their standard error."""
        if self._pending is None:
            return {}
        delta, se = realised_change(before, after)
        self.probe.add(self._pending, delta)
        self._pending = None
        out = {f"law/realised/{name}": float(delta[j]) for j, name in enumerate(self.objectives)}
        if se is not None:
            out.update({f"law/realised_se/{name}": float(se[j]) for j, name in enumerate(self.objectives)})
            out["law/probe_completions"] = int(before.shape[0])
        out.update(self.probe.summary("law/"))
        return out

    def summary(self) -> dict[str, float]:
        return {**self.probe.summary("law/"), **self.batch.summary("law/batch_")}

    def state_dict(self) -> dict:
        return {"probe": (self.probe.predicted, self.probe.realised), "batch": (self.batch.predicted,
                self.batch.realised), "pending_batch": self._pending_batch, "streak": list(self._streak)}

    def load_state_dict(self, state: dict) -> None:
        self.probe = Agreement(*map(list, state["probe"]))
        self.batch = Agreement(*map(list, state["batch"]))
        self._pending_batch = state["pending_batch"]
        self._streak = list(state["streak"])


def realised_change(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(change [M], its standard error [M] or None) from probe means [M] or paired per-completion rewards [n, M].

    The standard error is sd(d)/√n over the completions' paired differences d (NaN where either reward is missing;
    NaN with fewer than two pairs). It treats the completions as independent draws, which holds given the probe
    prompts (the estimand is the change on those prompts); differences between the prompts' changes only widen it."""
    paired = (after - before).double()
    if paired.dim() == 1:
        return paired, None
    valid = ~torch.isnan(paired)
    count = valid.sum(0)
    change = torch.where(count > 0, torch.nan_to_num(paired).sum(0) / count.clamp(min=1), math.nan)
    centred = torch.where(valid, paired - change, 0.0)
    variance = (centred ** 2).sum(0) / (count - 1).clamp(min=1)
    se = torch.where(count > 1, (variance / count.clamp(min=1)).sqrt(), math.nan)
    return change, se


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return math.nan
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Agreement where it is measurable: pairs binned by the size of the prediction
# ---------------------------------------------------------------------------------------------------------------

Interval = tuple[float, float]


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> Interval:
    """Wilson's score interval for a proportion (NaN, NaN without trials)."""
    if trials == 0:
        return math.nan, math.nan
    ci = stats.binomtest(successes, trials).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def fisher_interval(r: float, pairs: int, confidence: float = 0.95) -> Interval:
    """The Fisher-z interval of a Pearson correlation from ``pairs`` independent pairs (NaN below 4 pairs)."""
    if pairs < 4 or not math.isfinite(r):
        return math.nan, math.nan
    z = float(stats.norm.ppf((1.0 + confidence) / 2.0))
    centre, half = math.atanh(max(-0.999999, min(0.999999, r))), z / math.sqrt(pairs - 3)
    return math.tanh(centre - half), math.tanh(centre + half)


@dataclass(frozen=True)
class AgreementBin:
    """Predicted vs realised changes whose |predicted| lies in [low, high], with the realised changes' noise.

    ``noise`` is the root mean square of the realised changes' standard errors, ``signal`` the root mean square of
    the true changes beyond it, √max(0, mean r² − mean se²) (E[r²] = δ² + se² for an unbiased r). The bin is
    *resolved* when signal ≥ noise: its realised changes carry at least as much policy change as sampling noise.
    Where signal < noise a true law and a false one score alike (agreement near ½), so agreement is not measured
    there. Intervals treat the pairs as independent."""

    low: float
    high: float
    pairs: int
    signed: int  # pairs whose predicted and realised changes are both non-zero (the sign agreement's trials)
    agree: int
    correlation: float
    noise: float  # NaN when the standard errors were not logged
    signal: float
    confidence: float = 0.95

    @property
    def sign_agreement(self) -> float:
        return self.agree / self.signed if self.signed else math.nan

    @property
    def sign_agreement_ci(self) -> Interval:
        return wilson_interval(self.agree, self.signed, self.confidence)

    @property
    def correlation_ci(self) -> Interval:
        return fisher_interval(self.correlation, self.pairs, self.confidence)

    @property
    def resolved(self) -> Optional[bool]:
        """signal ≥ noise (and some signal); None when the noise is unknown."""
        if not math.isfinite(self.noise):
            return None
        return self.signal > 0 and self.signal >= self.noise


def agreement_bin(predicted: np.ndarray, realised: np.ndarray, se: np.ndarray, confidence: float = 0.95
                  ) -> AgreementBin:
    """The statistics of one bin of pairs (``se`` NaN where unknown)."""
    p, r, se = (np.asarray(x, dtype=float) for x in (predicted, realised, se))
    signed = (p != 0) & (r != 0)
    agree = int(np.sum((p[signed] > 0) == (r[signed] > 0)))
    noise = float(np.sqrt(np.mean(se ** 2))) if len(se) and not np.isnan(se).any() else math.nan
    signal = math.sqrt(max(0.0, float(np.mean(r ** 2)) - noise ** 2)) if math.isfinite(noise) else math.nan
    magnitude = np.abs(p)
    return AgreementBin(float(magnitude.min()), float(magnitude.max()), len(p), int(signed.sum()), agree,
                        pearson(p.tolist(), r.tolist()), noise, signal, confidence)


def bin_parts(predicted: Sequence[float], num_bins: int = 4, min_pairs: int = 25) -> list[np.ndarray]:
    """Indices of the pairs in each bin: bins of equal count by |predicted| (smallest first), at most ``num_bins``,
    each with at least ``min_pairs`` pairs (one bin when there are fewer). Predictions of exactly 0 (a batch whose
    rewards for the objective did not vary) form a bin of their own when there are ``min_pairs`` of them, so that
    equal counts do not cut them into several bins with the same edges."""
    p = np.abs(np.asarray(predicted, dtype=float))
    if not len(p):
        return []
    order = np.argsort(p, kind="stable")
    zeros = int(np.sum(p == 0))
    if zeros >= min_pairs and len(p) - zeros >= min_pairs and num_bins > 1:
        rest = order[zeros:]
        return [order[:zeros], *np.array_split(rest, max(1, min(num_bins - 1, len(rest) // min_pairs)))]
    return np.array_split(order, max(1, min(num_bins, len(p) // min_pairs)))


def agreement_bins(predicted: Sequence[float], realised: Sequence[float], se: Sequence[float], num_bins: int = 4,
                   min_pairs: int = 25, confidence: float = 0.95) -> list[AgreementBin]:
    """``agreement_bin`` of each of ``bin_parts``."""
    p, r, se = (np.asarray(x, dtype=float) for x in (predicted, realised, se))
    return [agreement_bin(p[part], r[part], se[part], confidence) for part in bin_parts(p, num_bins, min_pairs)]
