"""Linear scalarization: s = Σ_j λ_j r_j with fixed weights λ."""

from __future__ import annotations

from typing import Any, Optional

import torch
from pydantic import Field, field_validator

from moalign.weighting.base import (
    WEIGHTINGS,
    Weighting,
    WeightingParams,
    fill_missing,
    user_vector,
)


class LinearParams(WeightingParams):
    weights: Optional[list[float]] = Field(None, description="λ per objective; default uniform 1/M")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v):
        if v is not None and any(x < 0 for x in v):
            raise ValueError("weights must be non-negative")
        if v is not None and v and not any(x > 0 for x in v):
            raise ValueError("weights are all 0: no objective would give a training signal; give at least one "
                             "objective a positive weight")
        return v


@WEIGHTINGS.register("linear")
class Linear(Weighting):
    """Linear scalarization s_b = Σ_j λ_j r_bj with fixed λ (paper: [0.333, 0.333, 0.334] ≈ uniform)."""

    name = "linear"
    family = "reward"
    description = "fixed weighted sum of rewards"
    cost = "none (the baseline)"
    Params = LinearParams

    def __init__(self, objectives, params=None, **kwargs: Any):
        super().__init__(objectives, params, **kwargs)
        self._weights = user_vector(self.params.weights, self.num_objectives, "weighting.weights").float()

    @property
    def weights(self) -> torch.Tensor:
        return self._weights

    def scalarize(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return fill_missing(rewards) @ self._weights.to(rewards.dtype)
