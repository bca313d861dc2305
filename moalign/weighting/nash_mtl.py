"""Nash-MTL: the Nash bargaining solution between the objectives' gradients (gradient-level)."""

from __future__ import annotations

import torch
from pydantic import Field

from moalign.weighting._solvers import GradientWeighting
from moalign.weighting.base import WEIGHTINGS, StepStats, WeightingParams


def solve_nash_bargaining(Q: torch.Tensor, max_iter: int = 100, tol: float = 1e-12) -> tuple[torch.Tensor, float]:
    """The α > 0 with Qα = 1/α (elementwise) for a symmetric positive-definite Q, and the final residual
    max_j |α_j (Qα)_j − 1| (scale-free form of the same equation).

    α is the unique minimizer of the strictly convex, coercive f(α) = ½ αᵀQα − Σ_j log α_j, whose gradient is
    Qα − 1/α. Damped Newton: Hessian Q + diag(1/α²) (positive definite), step cut to stay in α > 0, then
    backtracking (Armijo) on f. Quadratic convergence near the solution; the start α_j = Q_jj^{-1/2} is exact for
    a diagonal Q (orthogonal gradients)."""

    def f(a: torch.Tensor) -> float:
        return float(0.5 * a @ Q @ a - a.log().sum())

    alpha = Q.diagonal().rsqrt()
    residual = float("inf")
    for _ in range(max_iter):
        Qa = Q @ alpha
        residual = float((alpha * Qa - 1.0).abs().max())
        if residual < tol:
            break
        grad = Qa - 1.0 / alpha
        step = -torch.linalg.solve(Q + torch.diag(alpha.pow(-2)), grad)
        t = 1.0
        while bool((alpha + t * step <= 0).any()):
            t /= 2
        f0, slope = f(alpha), float(grad @ step)
        while f(alpha + t * step) > f0 + 1e-4 * t * slope and t > 1e-12:
            t /= 2
        alpha = alpha + t * step
    return alpha, residual


@WEIGHTINGS.register("nash_mtl")
class NashMTL(GradientWeighting):
    """Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", arXiv 2202.01017).

    The update d = Σ_j α_j g_j maximizes Σ_j log⟨g_j, d⟩ in a ball; its first-order condition is

        (GᵀG) α = 1/α,  α > 0        (G = [g_1 … g_M] ∈ R^{P×M}, so GᵀG is the M×M Gram matrix)

    i.e. α_j ⟨g_j, d⟩ = 1: every objective's improvement is inversely proportional to its weight. The direction is
    invariant to each gradient's scale: g_j → c_j g_j gives α_j → α_j / c_j and the same d. As in the official code
    the weights solve the equation for the Gram matrix normalized by its Frobenius norm, Q = GᵀG / ‖GᵀG‖_F, so they
    do not depend on the overall gradient scale (for raw gradients the solution is α / ‖GᵀG‖_F^{1/2}).

    Solved in the per-gradient scale-free form: with D = diag(Q)^{1/2} (the normalized gradient norms) and the
    cosine matrix C = D⁻¹ Q D⁻¹ (unit diagonal), β solves (C + εI) β = 1/β and α = D⁻¹ β. For ε = 0 this is exactly
    Qα = 1/α; the ridge ε (``ridge``) is relative to every gradient's own norm, so a small gradient keeps its stake
    in the bargain (a ridge on Q itself would swamp any gradient ≳ 30× smaller than the largest).
    ``nash/residual`` = max_j |α_j (Qα)_j − 1| on the unridged system, the bargaining equation itself.

    Departures from the official code, and why:
    * Solver. The official code (and torchjd's ``NashMTL``, which needs cvxpy + ECOS) approximates the solution
      by a few sequential convex programs and keeps the previous α when the solver fails. Here a damped Newton
      method on the M×M system (``solve_nash_bargaining``) converges to machine precision.
    * Degenerate inputs. A solution exists only if some d improves every objective (Gordan: 0 ∉ conv{g_j}). The
      ridge makes the problem well posed when the gradients are Pareto-stationary (e.g. exactly opposite
      gradients: β grows to ≈ ε^{-1/2} while d stays 0); its default 1e-8 moves the solution of a well-posed
      problem by ≈ 1e-8 relative. An objective whose gradient is negligible (‖g_j‖² ≤ 1e-12 · max_k ‖g_k‖², e.g.
      exactly 0 when every group tied) has no stake in the bargain — its utility ⟨g_j, d⟩ is 0 for every d — and
      gets weight 0 instead of the meaningless ε^{-1/2}; it would otherwise dominate ``advantages()``.
    * The official ``max_norm`` clipping of the combined gradient is left to the engine's global grad-norm clip.
    * The data-parallel defect of the public code (solving on one shard's slice) does not arise: the Gram matrix
      is of the full gradients the engine passes in.
    """

    name = "nash_mtl"
    description = "Nash bargaining weights α > 0 solving (GᵀG)α = 1/α (invariant to each gradient's scale)"
    cost = "one extra forward and M backward passes on the chosen parameters (weighting.gradient_params), plus a Newton solve on the M×M Gram matrix"

    class Params(WeightingParams):
        ridge: float = Field(1e-8, gt=0, description="ε added to the cosine matrix of the gradients (relative to "
                             "each gradient's own norm) so a solution exists when they are Pareto-stationary")

    def initial_weights(self) -> torch.Tensor:
        """α = 1 for every objective: the solution for identical gradients (Q = 11ᵀ/M)."""
        return torch.ones(self.num_objectives, dtype=torch.float64)

    def solve_weights(self, gram: torch.Tensor, stats: StepStats) -> torch.Tensor:
        norms_sq = gram.diagonal()
        players = norms_sq > 1e-12 * norms_sq.max()
        if not bool(players.any()):  # every gradient is 0: the direction is 0 whatever the weights
            return self.initial_weights()
        bargaining = gram[players][:, players]
        Q = bargaining / torch.linalg.matrix_norm(bargaining)
        norms = Q.diagonal().sqrt()
        cosines = Q / torch.outer(norms, norms)
        beta, _ = solve_nash_bargaining(cosines + self.params.ridge * torch.eye(len(norms), dtype=Q.dtype))
        alpha = beta / norms
        self._diagnostics = {"nash/residual": float((alpha * (Q @ alpha) - 1.0).abs().max())}
        weights = torch.zeros(self.num_objectives, dtype=torch.float64)
        weights[players] = alpha
        return weights
