"""UPGrad: unconflicting projection of gradients (gradient-level)."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
from pydantic import Field
from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import DualConeProjector

from moalign.weighting._solvers import GradientWeighting, minimize_quadratic
from moalign.weighting.base import WEIGHTINGS, StepStats, WeightingParams, user_vector


class ProjectedGradientDualConeProjector(DualConeProjector):
    """torchjd's dual-cone projection problem, solved without quadprog: for each weight vector u,

        w = argmin_v vᵀGv  subject to  v ≥ u         (Jacobian Descent, Prop. 1)

    by accelerated projected gradient (the projection onto {v ≥ u} is a clamp). Like torchjd's default
    ``QuadprogProjector``, G is normalized by its trace and regularized with ``reg_eps``·I; unlike it, only an
    exactly zero G counts as zero (torchjd zeroes any G whose trace is below 1e-4, an absolute threshold that
    would silently turn UPGrad into the mean for small LM gradients)."""

    def __init__(self, reg_eps: float):
        self.reg_eps = reg_eps

    def __call__(self, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        m = G.shape[0]
        G = G.double()
        trace = G.trace()
        Q = (G / trace if trace > 0 else torch.zeros_like(G)) + self.reg_eps * torch.eye(m, dtype=torch.float64)
        rows = U.reshape(-1, m).double()
        projected = [minimize_quadratic(Q, lambda v, u=u: torch.maximum(v, u), start=u) for u in rows]
        return torch.stack(projected).reshape(U.shape).to(U.dtype)


@WEIGHTINGS.register("upgrad")
class UPGrad(GradientWeighting):
    """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232):

        d = Σ_i p_i π_J(g_i),    π_J(g) = the projection of g onto the dual cone {x : ⟨g_j, x⟩ ≥ 0 ∀j}

    Each gradient is projected so it conflicts with none of the others, then the projections are averaged with
    preference p (uniform by default). d never conflicts with any objective (⟨g_j, d⟩ ≥ 0). torchjd's
    ``UPGradWeighting`` is used for the weights, with ``ProjectedGradientDualConeProjector`` in place of its
    default solver (quadprog is not a moalign dependency).
    """

    name = "upgrad"
    description = "averages each gradient's projection onto the dual cone of all gradients (no conflicts)"
    cost = "one extra forward and M backward passes on the chosen parameters (weighting.gradient_params), plus M small QPs on the M×M Gram matrix"

    class Params(WeightingParams):
        preference: Optional[list[Annotated[float, Field(gt=0)]]] = Field(
            None, description="p, one positive value per objective; default uniform 1/M"
        )
        reg_eps: float = Field(1e-4, gt=0, description="ridge added to the trace-normalized Gram matrix")

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        preference = None
        if self.params.preference is not None:
            preference = user_vector(self.params.preference, self.num_objectives, "weighting.preference")
        self._torchjd = UPGradWeighting(preference, projector=ProjectedGradientDualConeProjector(self.params.reg_eps))

    def solve_weights(self, gram: torch.Tensor, stats: StepStats) -> torch.Tensor:
        return self._torchjd(gram)
