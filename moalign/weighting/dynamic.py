"""Dynamic reweighting by gradient influence (gradient-level)."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
from pydantic import Field

from moalign.weighting._solvers import GradientWeighting
from moalign.weighting.base import (
    WEIGHTINGS,
    Estimator,
    StepStats,
    WeightingParams,
    fill_missing,
    user_vector,
)


@WEIGHTINGS.register("dynamic")
class DynamicReweighting(GradientWeighting):
    """Gradient-based dynamic reward weighting (Lu et al. 2025, "Learning to Optimize Multi-Objective Alignment
    Through Dynamic Reward Weighting", arXiv 2509.11452), a mirror-ascent (exponentiated-gradient) update of the
    objective weights by each objective's influence on the others:

        s_i = Σ_j ⟨g_i, g_j⟩ = ⟨g_i, Σ_j g_j⟩                 influence of objective i (row sums of the Gram matrix)
        w ← softmax(log w + η · s / ρ)                         (in ``update``, after the policy step)
        score  s_b = Σ_j w_j r_bj  →  one advantage A(s)       (``advantages``: what the policy trains on)

    The per-objective gradients only set the weights (``trains_on_score``): like the authors' code and METHOD §4,
    the update trains on one advantage of the weighted score s, not on Σ_j w_j A(r_j). The two agree only for a
    linear estimator; with GRPO's group std or REINFORCE++'s whitening, two completions with equal s would get
    different advantages from the per-objective sum. (``combine`` returns Σ_j w_j g_j, the direction of s for
    exact gradients.)

    An objective whose gradient aligns with the joint direction gains weight. Defaults: η = 1e-6 (the paper's
    learning rate), ρ = 1e-5, w_0 uniform (or ``initial_weights``). s is averaged over the ``combine`` calls
    since the previous ``update``; the weights are fixed within a step, and step t's influence moves the weights
    used from step t + 1 on. The state is log w, kept normalized with log-softmax, so a weight can approach 0 but
    never reach a −∞ log.

    Departures from the public code: it multiplies the step by the learning rate twice (step ∝ lr² ≈ 1e-12), so
    the weights barely move; here η is applied once. And it takes the per-objective gradients on the whole batch
    before the update and applies step t's influence to step t's own score; here they come from the update's
    first pass (per mini-batch, see docs/algorithms.md), so the influence applies from the next step on.
    """

    name = "dynamic"
    description = ("mirror ascent on the weights by gradient influence s_i = Σ_j ⟨g_i, g_j⟩; trains on one advantage "
                   "of Σ_j w_j r_j")
    cost = "one extra forward and M backward passes on the chosen parameters (weighting.gradient_params)"
    state_fields = ("_weights", "log_weights", "influence_sum", "num_combines")
    trains_on_score = True

    class Params(WeightingParams):
        lr: float = Field(1e-6, gt=0, description="η, applied once (the paper's learning rate)")
        rho: float = Field(1e-5, gt=0, description="ρ, influence scale")
        initial_weights: Optional[list[Annotated[float, Field(gt=0)]]] = Field(
            None, description="w_0, one positive value per objective (normalized); default uniform"
        )

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        self.log_weights = self._weights.log()
        self.influence_sum = torch.zeros(self.num_objectives, dtype=torch.float64)
        self.num_combines = 0

    def initial_weights(self) -> torch.Tensor:
        w0 = user_vector(self.params.initial_weights, self.num_objectives, "weighting.initial_weights")
        return w0 / w0.sum()

    def scalarize(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """s = Σ_j w_j r_j with this step's weights (missing rewards count as 0)."""
        self._check_rewards(rewards)
        return (fill_missing(rewards).double() @ self.weights.to(rewards.device)).to(rewards.dtype)

    def advantages(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, estimator: Estimator, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """One advantage of the weighted score: estimator(Σ_j w_j r_j)."""
        advantages = estimator(self.scalarize(rewards, group_ids), group_ids, response_mask)
        return self._finite(advantages, torch.zeros_like(advantages))

    def solve_weights(self, gram: torch.Tensor, stats: StepStats) -> torch.Tensor:
        self.influence_sum = self.influence_sum + gram.sum(dim=1)
        self.num_combines += 1
        return self.log_weights.exp()

    def update(self, stats: StepStats) -> dict[str, float]:
        if self.num_combines > 0:
            influence = self.influence_sum / self.num_combines
            stepped = torch.log_softmax(self.log_weights + self.params.lr * influence / self.params.rho, dim=0)
            self.log_weights = self._finite(stepped, self.log_weights)
            self._weights = self.log_weights.exp()
            self._diagnostics = self._per_objective(influence, "influence")
        self.influence_sum = torch.zeros_like(self.influence_sum)
        self.num_combines = 0
        return self.metrics()
