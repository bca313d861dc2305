"""μ-PL diagnostics: estimators on functions with known constants, and the linear rate on exact problems."""

import math

import pytest
import torch

from moalign.diagnostics.pl import (
    PLEstimator,
    estimate_L,
    estimate_mu,
    linear_rate_bound,
    pl_ratio,
)
from moalign.theory.lab import (
    calibrated_ascent,
    gradient_ascent,
    path_curvature,
    pl_models,
    pl_study,
)
from moalign.theory.problem import random_problem

torch.set_num_threads(1)

EIGENVALUES = torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64)


def quadratic():
    """J(θ) = −½ θᵀAθ: J* = 0, ∇J = −Aθ, μ-PL with μ = λ_min(A) exactly and L-smooth with L = λ_max(A)."""
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).Q
    return q, (q * EIGENVALUES) @ q.T


def test_pl_ratio_and_estimate_mu_by_hand():
    assert pl_ratio(4.0, 1.0) == 2.0
    assert pl_ratio(4.0, 0.0) == math.inf
    assert estimate_mu([4.0, 1.0], [1.0, 2.0]) == 0.25  # min(4/2, 1/4)
    assert estimate_mu([4.0, 1.0], [1.0, 1e-15]) == 2.0  # the optimal point says nothing
    assert math.isnan(estimate_mu([1.0], [0.0]))
    with pytest.raises(ValueError, match="one of each"):
        estimate_mu([1.0, 2.0], [1.0])


def test_estimate_mu_recovers_lambda_min_along_gradient_ascent():
    _, A = quadratic()
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grad_sq_norms, gaps = [], []
    for _ in range(120):
        grad = -A @ theta
        grad_sq_norms.append(float(grad @ grad))
        gaps.append(float(0.5 * theta @ A @ theta))  # J* − J = ½θᵀAθ
        theta = theta + grad / float(EIGENVALUES.max())
    ratios = [g / (2 * gap) for g, gap in zip(grad_sq_norms, gaps)]
    assert min(ratios) >= 1.0 - 1e-12  # the PL inequality holds with μ = λ_min at every point
    assert estimate_mu(grad_sq_norms, gaps) == pytest.approx(1.0, abs=1e-6)  # ascent aligns θ with λ_min's vector


def test_pl_estimator_streams_the_running_minimum():
    estimator = PLEstimator()
    assert math.isnan(estimator.update(1.0, J=1.0, J_star=1.0)["pl/mu_hat"])
    metrics = estimator.update(4.0, J=0.0, J_star=1.0)
    assert metrics == {"pl/mu_hat": 2.0, "pl/grad_sq_norm": 4.0, "pl/gap": 1.0, "pl/j_star": 1.0,
                       "pl/dropped_points": 1.0}  # the first point (gap 0) was dropped, and counted
    assert estimator.update(1.0, J=-1.0, J_star=1.0)["pl/mu_hat"] == 0.25
    assert estimator.update(9.0, J=0.5, J_star=1.0)["pl/mu_hat"] == 0.25  # a larger ratio never raises μ̂


def test_points_at_or_above_j_star_are_dropped_visibly():
    """A negative gap (J above J*: e.g. a J* that no longer matches the weights) says nothing about μ; it is left
    out of μ̂ and counted, and the count survives a checkpoint."""
    estimator = PLEstimator()
    assert estimator.update(2.0, J=1.35, J_star=1.0)["pl/dropped_points"] == 1.0
    metrics = estimator.update(2.0, J=0.5, J_star=1.0)
    assert metrics["pl/mu_hat"] == 2.0 and metrics["pl/dropped_points"] == 1.0
    assert estimator.update(2.0, J=1.0, J_star=1.0)["pl/dropped_points"] == 2.0  # gap exactly 0
    resumed = PLEstimator()
    resumed.load_state_dict(estimator.state_dict())
    assert (resumed.mu_hat, resumed.num_dropped) == (2.0, 2)


def test_estimate_L_on_a_quadratic():
    q, A = quadratic()
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(3, dtype=torch.float64, generator=g) for _ in range(6)]
    params.insert(3, params[2].clone())  # a repeated point (no move) is skipped, not divided by zero
    grads = [-A @ p for p in params]
    estimate = estimate_L(grads, params)
    assert estimate <= EIGENVALUES.max() + 1e-12
    top = params[-1] + q[:, 2]  # a move along the top eigenvector sees the full curvature
    assert estimate_L(grads + [-A @ top], params + [top]) == pytest.approx(10.0)
    assert math.isnan(estimate_L(grads[:1], params[:1]))


def test_linear_rate_bound():
    assert linear_rate_bound(0.1, 1.0, 2) == pytest.approx(0.81)


def test_linear_rate_holds_on_a_tabular_problem():
    problem = random_problem(3, 4, 2, correlation=-0.5, generator=torch.Generator().manual_seed(0))
    signal = problem.scalarized([0.5, 0.5])
    L = problem.smoothness_bound(signal)
    path = gradient_ascent(problem, signal, steps=200, step_size=1.0 / L)
    gaps = problem.optimum(signal) - path.values  # exact J* for a tabular softmax policy
    assert (gaps > 0).all()
    # ascent lemma for an L-smooth J: J_{t+1} ≥ J_t + ‖∇J_t‖² / 2L
    assert (path.values.diff() >= path.grad_sq_norms[:-1] / (2 * L) - 1e-15).all()
    mu = estimate_mu(path.grad_sq_norms.tolist(), gaps.tolist())
    assert 0 < mu < L
    rate = torch.tensor([linear_rate_bound(mu, L, t) for t in range(201)], dtype=torch.float64)
    assert (gaps / gaps[0] <= rate + 1e-12).all()


def test_pl_study_rows():
    rows = pl_study(steps=40, reference_steps=400)
    assert [row["model"] for row in rows][:3] == ["tabular", "well-conditioned", "ill-conditioned"]
    for row in rows:
        assert row["bound_holds"] and row["scalar_rises"]
        assert 0 < row["mu_hat"] <= row["mu_hat_early"]
        assert row["L"] <= row["L_bound"]
        assert row["J_star_exact"] == (not row["model"].startswith("restricted"))
    by_model = {row["model"]: row for row in rows}
    assert by_model["ill-conditioned"]["mu_over_L"] < by_model["well-conditioned"]["mu_over_L"]
    assert by_model["aligned kernel"]["grad_cos"] > by_model["conflicting kernel"]["grad_cos"]


def test_calibrated_step_covers_the_curvature_of_its_own_path():
    generator = torch.Generator().manual_seed(0)
    base = random_problem(3, 5, 2, correlation=-0.6, generator=generator)
    for name, features in pl_models(base, generator):
        problem = base.with_features(features)
        signal = problem.scalarized([0.5, 0.5])
        L, path = calibrated_ascent(problem, signal, steps=100)
        assert path_curvature(problem, signal, path) <= L <= problem.smoothness_bound(signal), name
