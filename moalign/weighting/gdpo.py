"""GDPO: group reward-decoupled normalization (advantage-level)."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
from pydantic import Field

from moalign.weighting._solvers import StatefulWeighting, whiten
from moalign.weighting.base import (
    WEIGHTINGS,
    Estimator,
    WeightingParams,
    per_objective_advantages,
    user_vector,
)


@WEIGHTINGS.register("gdpo")
class GDPO(StatefulWeighting):
    """GDPO (Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL
    Optimization", arXiv 2601.05242):

        A_bj = (r_bj − mean_g r_j) / (std_g r_j + ε)      per objective, within the prompt group g of b
        A_b  = Σ_j w_j A_bj
        A_b  ← (A_b − mean_B A) / (std_B A + ε)           batch whitening (``batch_whiten``, on by default)

    Normalizing each reward inside its group before summing keeps reward combinations that GRPO on the summed
    reward collapses to one advantage value (e.g. (1,0) and (0,1) in a group); the final batch whitening keeps the
    advantage scale independent of the number of rewards. The per-objective step is the engine's estimator, so
    with ``estimator = grpo`` this is exactly GDPO; other estimators give the same decoupled scheme with their own
    normalization. Fixed weights w, uniform 1/M by default (with whitening only their ratios matter).
    Missing rewards count as 0. No state changes during training.
    """

    name = "gdpo"
    family = "advantage"
    description = "per-objective group-normalized advantages, weighted sum, then batch whitening"
    cost = "M advantage computations (no extra forward or backward pass)"

    class Params(WeightingParams):
        weights: Optional[list[Annotated[float, Field(gt=0)]]] = Field(
            None, description="w, one positive weight per objective; default uniform 1/M"
        )
        batch_whiten: bool = Field(True, description="whiten the summed advantage over the batch")
        eps: float = Field(1e-6, gt=0, description="ε in the batch whitening")

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        self.fixed_weights = user_vector(self.params.weights, self.num_objectives, "weighting.weights")

    @property
    def weights(self) -> torch.Tensor:
        return self.fixed_weights

    def advantages(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, estimator: Estimator, response_mask: torch.Tensor
    ) -> torch.Tensor:
        self._check_rewards(rewards)
        per_objective = per_objective_advantages(rewards, group_ids, estimator, response_mask)
        summed = self._weighted_advantages(per_objective, self.fixed_weights)
        if not self.params.batch_whiten:
            return summed
        whitened = whiten(summed.double(), self.params.eps)
        return self._finite(whitened, torch.zeros_like(whitened)).to(summed.dtype)
