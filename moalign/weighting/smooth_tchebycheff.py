"""Smooth Tchebycheff scalarization (reward-level), as the authors run it."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
from pydantic import Field

from moalign.weighting._solvers import (
    StatefulWeighting,
    objective_maxima,
    objective_means,
)
from moalign.weighting.base import (
    WEIGHTINGS,
    StepStats,
    WeightingParams,
    fill_missing,
    user_vector,
)


@WEIGHTINGS.register("smooth_tchebycheff")
class SmoothTchebycheff(StatefulWeighting):
    """Smooth Tchebycheff (Lin et al. 2024, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization")
    in the mirror-descent form of the authors' code (METHOD §4):

        state   ℓ ∈ R^M, ℓ_0 = log p                      (p = preference, normalized to sum 1)
        score   ω = softmax(ℓ / T),   s_b = Σ_j ω_j r_bj
        update  ℓ_j ← ℓ_j + η p_j (z_j − mean_b r_bj)     (after the policy step, on the step's batch)

    The smooth max μ·log Σ_j exp(λ_j (z_j − J_j)/μ) has gradient Σ_j ω_j ∇(λ_j (z_j − J_j)) with softmax weights
    ω, so training on the ω-weighted reward descends it; the multiplicative (mirror) update on ℓ moves ω toward
    objectives far from their ideal value.

    This is the authors' *run* form, not Lin et al.'s STCH: ℓ accumulates the gaps of every step so far,
    ω ∝ p^{1/T}·exp(η Σ_t p ⊙ gap_t / T), so an objective that lagged long ago keeps weight after it has caught up.
    Lin et al.'s smooth Tchebycheff weights each step by its *current* gap alone, ω = softmax(p ⊙ (z − J)/μ).

    Defaults: T = 1, η = 0.3 (the authors' launch script; their config says 1.0), p uniform, and z as in the
    authors' code: the running maximum of every completion's reward, the current batch included (for {0,1}
    rewards, 1 once one completion has reached it). ``ideal_point`` fixes z (e.g. [1, 1, 1], the best value of
    {0,1} rewards, from the first step). Missing rewards count as 0 in s and are left out of the batch statistics;
    an objective with no observed reward in the batch keeps its ℓ_j.
    """

    name = "smooth_tchebycheff"
    family = "reward"
    description = ("s = Σ softmax(ℓ/T)_j r_j with mirror-descent ℓ_j += η p_j (z_j − mean r_j), z = running max of "
                   "every completion's reward")
    cost = "none"
    state_fields = ("log_weights", "running_ideal")

    class Params(WeightingParams):
        preference: Optional[list[Annotated[float, Field(gt=0)]]] = Field(
            None, description="p, one positive value per objective (normalized to sum 1); default uniform"
        )
        temperature: float = Field(1.0, gt=0, description="T in ω = softmax(ℓ/T)")
        lr: float = Field(0.3, gt=0, description="η, mirror-descent step on the log-weights")
        ideal_point: Optional[list[float]] = Field(
            None, description="fixed z, one value per objective; default: running max of every completion's reward "
            "(the authors')"
        )

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        p = user_vector(self.params.preference, self.num_objectives, "weighting.preference")
        self.preference = p / p.sum()
        self.fixed_ideal = (None if self.params.ideal_point is None
                            else user_vector(self.params.ideal_point, self.num_objectives, "weighting.ideal_point"))
        self.running_ideal = torch.full((self.num_objectives,), float("nan"), dtype=torch.float64)  # NaN = unseen
        self.log_weights = self.preference.log()

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.log_weights / self.params.temperature, dim=0)

    def scalarize(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        self._check_rewards(rewards)
        return (fill_missing(rewards).double() @ self.weights.to(rewards.device)).to(rewards.dtype)

    def update(self, stats: StepStats) -> dict[str, float]:
        self._check_rewards(stats.rewards)
        self.running_ideal = torch.fmax(self.running_ideal, objective_maxima(stats.rewards))  # fmax skips NaN
        ideal = self.running_ideal if self.fixed_ideal is None else self.fixed_ideal
        gap = ideal - objective_means(stats.rewards)
        step = self.params.lr * self.preference * torch.nan_to_num(gap, nan=0.0)  # unobserved objective: no step
        self.log_weights = self._finite(self.log_weights + step, self.log_weights)
        return {**self.metrics(), **self._per_objective(gap, "gap")}
