"""The local covariance law, live on any run (METHOD §2).

Each step, per objective j and within prompt groups, the monitor measures

    Cov(r_j, s)   with the scalarized score s            (the law for a KL-proximal / natural-gradient step)
    Cov(r_j, w)   with the clipped training signal w      (the law under the PPO/GRPO clipped surrogate)

together with the unclipped token fraction and the clipping distortion E|w_clip − w_unclip|. The *predicted*
change of objective j is sign(Cov(r_j, w)) with first-order size ∝ Cov(r_j, w). The *realised* change is measured on
a fixed probe set of prompts re-sampled after the update (common random numbers: the same sampling seed every
time, so the difference reflects the policy, not the dice). The monitor keeps the running sign-agreement rate and
the correlation between predicted and realised changes, and warns when an objective's covariance stays negative
for ``warn_after`` consecutive steps — the early sign of interference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

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
        """Record the realised per-objective change on the probe set for the last observed step."""
        if self._pending is None:
            return {}
        delta = (after - before).double()
        self.probe.add(self._pending, delta)
        self._pending = None
        out = {f"law/realised/{name}": float(delta[j]) for j, name in enumerate(self.objectives)}
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


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return math.nan
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else math.nan
