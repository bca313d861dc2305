"""CTWA — Covariance Targeted Weight Adaptation (Lu & Jiang 2026; METHOD §3).

Reward-level linear scalarization whose log-weights grow when an objective's covariance with the *training
signal* falls below a target margin. No per-objective backward pass; one no-grad forward after the update.

    state: u = log λ0, EMA c̄ (unset)
    each step:
      s_b = Σ_j λ_j r_bj → advantages → ordinary policy update
      w_b from the post-update policy (moalign.rl.covariance.training_signal);
          drop non-finite w and |w| > 100·median|w|
      per prompt group with ≥ 2 members: cov_gj = mean_i(r̃_ij w̃_i), corr_gj = cov_gj / (std r̃_j std w̃)
      c_j = mean over groups of cov_gj (corr if use_corr_target; pooled over all centred samples if global_stat)
      c̄_j = c_j on the first step, else (1−τ) c̄_j + τ c_j
      gate_j = 0 if batch-mean r_j ≥ obj_target_j else 1          (when gating)
      δ_j = max(0, c*_j − c̄_j) · gate_j
      u_j ← u_j + η_λ δ_j ; λ_j = exp(u_j)     (used from the next step on; never renormalized)

Departures from the public code (github.com/yining610/ctwa): the statistic is computed on the *whole* batch with
whole prompt groups (the public code uses one data-parallel shard, splitting groups). An objective whose statistic is
undefined this step (no group with two usable samples, or correlation with zero variance everywhere) keeps its EMA.
Missing rewards (NaN) are excluded from the statistic and count as 0 in the score.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from pydantic import Field, field_validator

from moalign.rl.covariance import (
    W_AGGREGATIONS,
    drop_outliers,
    group_covariance,
    training_signal,
)
from moalign.weighting.base import (
    WEIGHTINGS,
    StepStats,
    Weighting,
    WeightingParams,
    fill_missing,
    user_vector,
)


class CTWAParams(WeightingParams):
    init_weights: Optional[list[float]] = Field(None, description="λ0 per objective; default uniform 1/M")
    tau: float = Field(0.1, gt=0, le=1, description="EMA rate of the covariance statistic")
    lambda_lr: float = Field(0.02, ge=0, description="η_λ, step on the log-weights")
    cov_targets: Optional[list[float]] = Field(None, description="c* per objective; default [0.1, 0.05, 0.05, ...]")
    obj_targets: Optional[list[float]] = Field(None, description="gate targets; default [1.0, 0.95, 0.95, ...]")
    use_corr_target: bool = Field(False, description="target the correlation instead of the covariance")
    gating: bool = Field(True, description="stop raising λ_j once batch-mean r_j ≥ obj_target_j")
    w_agg: str = Field("mean", description="aggregation of the training signal: mean | mean_unclipped | sum")
    global_stat: bool = Field(False, description="pool all centred samples instead of averaging over groups")
    outlier_factor: float = Field(100.0, gt=0, description="drop |w| > factor·median|w|")

    @field_validator("w_agg")
    @classmethod
    def _agg(cls, v):
        if v not in W_AGGREGATIONS:
            raise ValueError(f"w_agg must be one of {', '.join(W_AGGREGATIONS)}")
        return v

    @field_validator("init_weights")
    @classmethod
    def _pos(cls, v):
        if v is not None and any(x <= 0 for x in v):
            raise ValueError("init_weights must be positive (CTWA works on log-weights)")
        return v


def _first_then(first: float, rest: float, m: int) -> list[float]:
    return [first] + [rest] * (m - 1)


@WEIGHTINGS.register("ctwa")
class CTWA(Weighting):
    __doc__ = __doc__
    name = "ctwa"
    family = "reward"
    description = "linear weights whose logs grow when an objective's covariance with the training signal is below target"
    cost = "one no-grad forward pass (post-update log-probs) per step"
    needs_post_update_logprobs = True
    Params = CTWAParams

    def __init__(self, objectives, params=None, **kwargs: Any):
        super().__init__(objectives, params, **kwargs)
        p, m = self.params, self.num_objectives
        self.log_weights = user_vector(p.init_weights, m, "weighting.init_weights").log()
        self.cov_targets = user_vector(p.cov_targets or _first_then(0.1, 0.05, m), m, "weighting.cov_targets")
        self.obj_targets = user_vector(p.obj_targets or _first_then(1.0, 0.95, m), m, "weighting.obj_targets")
        self.ema: Optional[torch.Tensor] = None

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp().float()

    def scalarize(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return fill_missing(rewards) @ self.weights.to(rewards.dtype)

    def update(self, stats: StepStats) -> dict[str, float]:
        if stats.new_logprobs is None:
            raise ValueError("CTWA needs the post-update log-probs (StepStats.new_logprobs)")
        p = self.params
        sig = training_signal(stats.advantages, stats.old_logprobs, stats.new_logprobs, stats.response_mask,
                              stats.clip_eps_low, stats.clip_eps_high, p.w_agg)
        valid = drop_outliers(sig.w, p.outlier_factor)
        gc = group_covariance(stats.rewards, sig.w, stats.group_ids, valid=valid, pooled=p.global_stat)
        c = (gc.corr if p.use_corr_target else gc.cov).double()
        defined = (gc.num_groups > 0) & torch.isfinite(c)
        if self.ema is None:
            self.ema = torch.where(defined, c, torch.zeros_like(c))
            self._seen = defined.clone()
        else:
            fresh = defined & ~self._seen  # first defined value of an objective initializes its EMA
            blended = (1 - p.tau) * self.ema + p.tau * torch.nan_to_num(c)
            self.ema = torch.where(fresh, c, torch.where(defined, blended, self.ema))
            self._seen |= defined
        batch_mean = torch.nanmean(stats.rewards.double(), dim=0)
        gate_open = (batch_mean < self.obj_targets).double() if p.gating else torch.ones_like(c)
        deficit = (self.cov_targets - self.ema).clamp(min=0) * gate_open * self._seen.double()
        self.log_weights = self.log_weights + p.lambda_lr * deficit
        out = {"ctwa/num_valid_w": float(valid.sum()), "ctwa/unclipped_fraction": float(sig.unclipped_fraction),
               "ctwa/clip_distortion": float(sig.distortion)}
        for j, o in enumerate(self.objectives):
            out[f"ctwa/cov/{o}"] = float(gc.cov[j])
            out[f"ctwa/corr/{o}"] = float(gc.corr[j]) if math.isfinite(float(gc.corr[j])) else float("nan")
            out[f"ctwa/ema/{o}"] = float(self.ema[j])
            out[f"ctwa/deficit/{o}"] = float(deficit[j])
            out[f"ctwa/gate/{o}"] = float(gate_open[j])
        out.update(self.metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"log_weights": self.log_weights.clone(),
                "ema": None if self.ema is None else self.ema.clone(),
                "seen": None if self.ema is None else self._seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_weights = state["log_weights"].clone().double()
        self.ema = None if state["ema"] is None else state["ema"].clone().double()
        if state.get("seen") is not None:
            self._seen = state["seen"].clone()
