"""CAGrad: conflict-averse gradient descent (gradient-level)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import minimize

from moalign.weighting._solvers import GradientWeighting, normalized_gram
from moalign.weighting.base import WEIGHTINGS, StepStats, WeightingParams

# ‖g_w*‖ below this (on the trace-normalized Gram, i.e. relative to the gradients' scale) counts as 0: SLSQP
# leaves a residual of ~1e-8 where the exact value is 0, and sqrt(φ)/residual would be a weight of millions.
# The threshold is torchjd's ``norm_eps``.
PARETO_STATIONARY_NORM = 1e-4
RESCALE_FACTORS = {"none": lambda c: 1.0, "one_plus_c_squared": lambda c: 1.0 + c * c, "one_plus_c": lambda c: 1.0 + c}


@WEIGHTINGS.register("cagrad")
class CAGrad(GradientWeighting):
    """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning", Alg. 1):

        max_d min_j ⟨g_j, d⟩   subject to  ‖d − g_0‖ ≤ c‖g_0‖,     g_0 = mean_j g_j

    Its dual is a problem over the simplex,  w* = argmin_{w ∈ simplex} ⟨g_w, g_0⟩ + √φ ‖g_w‖  with
    g_w = Σ_j w_j g_j and √φ = c‖g_0‖, and the primal solution is

        d = g_0 + (√φ / ‖g_w*‖) g_w*,   then divided by 1 + c² (``rescale``, the official default),

    i.e. weights w_j = (1/M + √φ w*_j / ‖g_w*‖) / (1 + c²). c = 0.4 (the paper's multi-task setting); c = 0 is
    the mean gradient. The dual is solved with scipy's SLSQP as in the official code, on the trace-normalized Gram
    matrix (the weights are scale-free).

    Why not torchjd's ``CAGrad``: it needs cvxpy + Clarabel, which are not moalign dependencies. Edge case:
    when ‖g_w*‖ ≈ 0 (below 1e-4 relative to the gradients, torchjd's threshold) the gradients are
    Pareto-stationary and the correction direction is undefined (the official code divides by ‖g_w*‖ + 1e-8 and
    gets weights of order 1e8 on a cancelling combination; torchjd returns d = 0); here the correction is dropped
    and d = g_0 / rescale, the mean gradient.
    """

    name = "cagrad"
    description = "maximizes the worst objective's improvement within a ball around the mean gradient"
    cost = "one extra forward and M backward passes on the chosen parameters (weighting.gradient_params), plus one M-variable SLSQP solve"

    class Params(WeightingParams):
        c: float = Field(0.4, ge=0, description="radius of the ball around the mean gradient, in units of ‖g_0‖")
        rescale: Literal["none", "one_plus_c_squared", "one_plus_c"] = Field(
            "one_plus_c_squared", description="divide the direction by 1, 1 + c² or 1 + c"
        )

    def solve_weights(self, gram: torch.Tensor, stats: StepStats) -> torch.Tensor:
        m = self.num_objectives
        uniform = np.full(m, 1.0 / m)
        rescale = RESCALE_FACTORS[self.params.rescale](self.params.c)
        Q = normalized_gram(gram)
        if Q is None:  # every gradient is 0
            return torch.from_numpy(uniform / rescale)
        G = Q.numpy()
        toward_mean = G @ uniform  # ⟨g_j, g_0⟩
        sqrt_phi = self.params.c * math.sqrt(max(float(uniform @ toward_mean), 0.0))

        def dual(w: np.ndarray) -> tuple[float, np.ndarray]:
            norm_gw = math.sqrt(max(float(w @ G @ w), 0.0) + 1e-16)
            return float(w @ toward_mean) + sqrt_phi * norm_gw, toward_mean + sqrt_phi * (G @ w) / norm_gw

        result = minimize(
            dual, uniform, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
            options={"ftol": 1e-12, "maxiter": 200},
        )
        w_star = np.clip(result.x, 0.0, None)
        w_star = w_star / w_star.sum()
        norm_gw = math.sqrt(max(float(w_star @ G @ w_star), 0.0))
        correction = sqrt_phi / norm_gw if norm_gw >= PARETO_STATIONARY_NORM else 0.0
        return torch.from_numpy((uniform + correction * w_star) / rescale)
