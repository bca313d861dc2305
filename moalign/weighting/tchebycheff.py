"""Tchebycheff scalarization (reward-level)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

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


@WEIGHTINGS.register("tchebycheff")
class Tchebycheff(StatefulWeighting):
    """Weighted Tchebycheff scalarization of sequence-level rewards (METHOD §4):

        s_b = − max_j λ_j (z_j − r_bj)

    z is the ideal point, by default (``ideal_mode="running_max"``, the authors' ``running_max``) the running
    maximum over steps of every completion's reward, the current batch included (missing rewards excluded): for
    {0,1} rewards z_j = 1 as soon as one completion has reached 1 on objective j. ``ideal_mode="running_mean_max"``
    takes the running maximum of the per-objective batch *means* instead, and ``ideal_point`` fixes z. The score is
    0 when every objective reaches its ideal value and grows more negative with the worst weighted shortfall.
    Missing rewards count as 0 in r (``fill_missing``). Before an objective has ever been observed its z_j is taken
    as 0, the value its filled-in rewards have.

    Why the per-completion maximum is the default: with batch means as z, the objective the policy is worst at
    has the smallest z_j and so the smallest shortfall; e.g. batch means (0.25, 0.75, 0.5) and λ uniform score
    r = (0, 1, 1) at −0.083 and r = (1, 1, 0) at −0.167, where z = (1, 1, 1) scores both −1/3.

    Departure from the public code: the authors apply the formula per token, so every non-final token scores
    ≈ −0.33 and REINFORCE++ turns that into a length penalty. Here the score is one number per completion (the
    estimator puts it on the completion's tokens), so two completions that satisfy every objective score the same
    whatever their lengths. (Their per-token maximum also floors z at 0, the reward of a non-final token; it
    differs from the per-completion maximum only for negative rewards.)

    ``update`` folds the step's batch into the running maximum; ``scalarize`` never changes state.
    """

    name = "tchebycheff"
    family = "reward"
    description = ("s = −max_j λ_j (z_j − r_j) on sequence scores, z = running max of every completion's reward "
                   "(the authors'; ideal_mode=running_mean_max: of the batch means)")
    cost = "none"
    state_fields = ("running_ideal",)

    class Params(WeightingParams):
        weights: Optional[list[Annotated[float, Field(gt=0)]]] = Field(
            None, description="λ, one positive weight per objective; default uniform 1/M"
        )
        ideal_mode: Literal["running_max", "running_mean_max"] = Field(
            "running_max", description="z without ideal_point: running max of every completion's reward (the "
            "authors') or of the per-objective batch means"
        )
        ideal_point: Optional[list[float]] = Field(
            None, description="fixed z, one value per objective (overrides ideal_mode)"
        )

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        self.lambdas = user_vector(self.params.weights, self.num_objectives, "weighting.weights")
        self.fixed_ideal = (
            None
            if self.params.ideal_point is None
            else user_vector(self.params.ideal_point, self.num_objectives, "weighting.ideal_point")
        )
        self.running_ideal = torch.full((self.num_objectives,), float("nan"), dtype=torch.float64)  # NaN = unseen

    @property
    def weights(self) -> torch.Tensor:
        return self.lambdas

    def batch_ideal(self, rewards: torch.Tensor) -> torch.Tensor:
        """The batch's candidate for z [M]: its per-objective maxima or means (``ideal_mode``; NaN = unobserved)."""
        return objective_maxima(rewards) if self.params.ideal_mode == "running_max" else objective_means(rewards)

    def ideal(self, rewards: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z for a batch: the fixed point, or the running max including the batch (unseen → 0)."""
        if self.fixed_ideal is not None:
            return self.fixed_ideal
        z = self.running_ideal if rewards is None else torch.fmax(self.running_ideal, self.batch_ideal(rewards))
        return torch.nan_to_num(z, nan=0.0)

    def scalarize(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        self._check_rewards(rewards)
        gap_to_ideal = self.ideal(rewards).to(rewards.device) - fill_missing(rewards).double()
        shortfall = self.lambdas.to(rewards.device) * gap_to_ideal
        scores = -shortfall.max(dim=1).values
        return self._finite(scores, torch.zeros_like(scores)).to(rewards.dtype)

    def update(self, stats: StepStats) -> dict[str, float]:
        self._check_rewards(stats.rewards)
        self.running_ideal = torch.fmax(self.running_ideal, self.batch_ideal(stats.rewards))  # fmax skips NaN
        return {**self.metrics(), **self._per_objective(self.ideal(), "ideal")}
