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

from moalign.diagnostics.covariance import drop_outliers, group_covariance, training_signal
from moalign.weighting.base import StepStats


@dataclass
class LawMonitor:
    objectives: Sequence[str]
    warn_after: int = 3
    predicted: list[float] = field(default_factory=list)  # Cov(r_j, w) of every (step, objective) with a realised change
    realised: list[float] = field(default_factory=list)
    _pending: torch.Tensor | None = None
    _streak: list[int] = field(default_factory=list)

    def __post_init__(self):
        self._streak = [0] * len(self.objectives)

    def observe_step(self, stats: StepStats) -> dict[str, float]:
        """Covariances of this step (needs ``stats.new_logprobs``); remembers the prediction for ``realise``."""
        out: dict[str, float] = {}
        cov_s = group_covariance(stats.rewards, stats.scores, stats.group_ids).cov
        if stats.new_logprobs is None:
            cov_w = None
        else:
            sig = training_signal(stats.advantages, stats.old_logprobs, stats.new_logprobs, stats.response_mask,
                                  stats.clip_eps_low, stats.clip_eps_high)
            cov_w = group_covariance(stats.rewards, sig.w, stats.group_ids, valid=drop_outliers(sig.w)).cov
            out["law/unclipped_fraction"] = float(sig.unclipped_fraction)
            out["law/clip_distortion"] = float(sig.distortion)
        pred = cov_w if cov_w is not None else cov_s
        self._pending = pred.clone()
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
        out: dict[str, float] = {}
        for j, name in enumerate(self.objectives):
            p, r = float(self._pending[j]), float(delta[j])
            out[f"law/realised/{name}"] = r
            if math.isfinite(p) and math.isfinite(r):
                self.predicted.append(p)
                self.realised.append(r)
        self._pending = None
        out.update(self.summary())
        return out

    def summary(self) -> dict[str, float]:
        """Running agreement: the share of (step, objective) pairs whose predicted and realised changes have the same
        strict sign (pairs where either is 0 are left out), and their Pearson correlation."""
        pairs = [(p, r) for p, r in zip(self.predicted, self.realised) if p != 0 and r != 0]
        agree = sum((p > 0) == (r > 0) for p, r in pairs) / len(pairs) if pairs else math.nan
        return {"law/sign_agreement": agree, "law/correlation": pearson(self.predicted, self.realised),
                "law/num_pairs": float(len(pairs))}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return math.nan
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else math.nan
