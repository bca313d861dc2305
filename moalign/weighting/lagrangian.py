"""Lagrangian primal–dual weighting (advantage-level)."""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from moalign.weighting._solvers import StatefulWeighting, objective_means
from moalign.weighting.base import (
    WEIGHTINGS,
    Estimator,
    StepStats,
    WeightingParams,
    per_objective_advantages,
    user_vector,
)


@WEIGHTINGS.register("lagrangian")
class Lagrangian(StatefulWeighting):
    """Constrained RL by primal–dual ascent (METHOD §4). The first objective is maximized, the others are
    constraints E[r_k] ≥ c_k:

        max_θ min_{λ ≥ 0}  J_1(θ) + Σ_{k≥2} λ_k (J_k(θ) − c_k)

        primal  A_b = A_b1 + Σ_{k≥2} λ_k A_bk       (A_j: the estimator applied to objective j alone)
        dual    λ_k ← max(0, λ_k + η_d (c_k − mean_b r_bk))    (after the policy step, on the step's batch)

    A violated constraint (mean below target) raises its multiplier, a satisfied one lowers it toward 0.
    Defaults (authors): η_d = 0.01, λ_0 = 0, c_k = 0.9 for every constraint (``targets`` has M − 1 entries, in
    the order of the objectives after the first). Missing rewards count as 0 in A and are left out of the means;
    a constraint with no observed reward in the batch keeps its multiplier. ``weights`` is (1, λ_2, …, λ_M).
    """

    name = "lagrangian"
    family = "advantage"
    description = "first objective primary, the rest constraints mean r_k ≥ c_k with projected dual ascent"
    cost = "M advantage computations (no extra forward or backward pass)"
    state_fields = ("duals",)

    class Params(WeightingParams):
        dual_lr: float = Field(0.01, gt=0, description="η_d, dual ascent step")
        initial_dual: float = Field(0.0, ge=0, description="λ_0 for every constraint")
        targets: Optional[list[float]] = Field(
            None, description="c_k for objectives 2..M (M−1 values); default 0.9 each"
        )

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        num_constraints = self.num_objectives - 1
        targets = [0.9] * num_constraints if self.params.targets is None else self.params.targets
        constraints = ", ".join(self.objectives[1:])
        self.targets = user_vector(targets, num_constraints, "weighting.targets", per=f"constraint ({constraints})")
        self.duals = torch.full((num_constraints,), self.params.initial_dual, dtype=torch.float64)

    @property
    def weights(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=torch.float64), self.duals])

    def advantages(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, estimator: Estimator, response_mask: torch.Tensor
    ) -> torch.Tensor:
        self._check_rewards(rewards)
        per_objective = per_objective_advantages(rewards, group_ids, estimator, response_mask)
        return self._weighted_advantages(per_objective, self.weights)

    def update(self, stats: StepStats) -> dict[str, float]:
        self._check_rewards(stats.rewards)
        violation = self.targets - objective_means(stats.rewards)[1:]
        step = self.params.dual_lr * torch.nan_to_num(violation, nan=0.0)  # unobserved constraint: no step
        self.duals = self._finite((self.duals + step).clamp(min=0.0), self.duals)
        constraints = self.objectives[1:]
        return {
            **self.metrics(),
            **self._per_objective(self.duals, "dual", constraints),
            **self._per_objective(violation, "violation", constraints),
        }
