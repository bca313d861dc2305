"""The theory lab: exact derivatives vs autograd, the first-order laws by finite differences, and weightings run
unchanged on exact problems."""

import math

import pytest
import torch

from moalign.errors import UserError
from moalign.theory.lab import LAW_ETAS, covariance_law, error_slope, format_table
from moalign.theory.problem import (
    DTYPE,
    SoftmaxProblem,
    correlated_rewards,
    expected,
    policy_covariance,
    random_features,
    random_problem,
    stretched_features,
    tabular_features,
)
from moalign.theory.updates import (
    Clipped,
    Natural,
    Tilt,
    Vanilla,
    all_pairs,
    clipped_update,
    run,
    sample_groups,
    tilt,
)
from moalign.weighting.base import Weighting

torch.set_num_threads(1)


def instance(seed: int, complete: bool = True, binary: bool = False):
    g = torch.Generator().manual_seed(seed)
    P, K, M = 3, 4, 3
    features = random_features(P, K, dim=None if complete else 5, condition=10.0, generator=g)
    problem = random_problem(P, K, M, correlation=-0.3, binary=binary, features=features, generator=g)
    theta = torch.randn(problem.dim, dtype=DTYPE, generator=g)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE)
    return problem, theta, problem.scalarized(weights)


def autograd_value(problem: SoftmaxProblem, signal: torch.Tensor):
    return lambda theta: expected(problem.probs(theta), signal)


def central_difference(f, eta: float) -> torch.Tensor:
    """(f(η) − f(−η)) / 2η: error O(η²), so 1e-6 relative agreement is reachable at η = 1e-4."""
    return (f(eta) - f(-eta)) / (2 * eta)


# ---------------------------------------------------------------------- exact derivatives


@pytest.mark.parametrize("complete", [True, False])
def test_gradients_match_autograd(complete):
    problem, theta, signal = instance(0, complete)
    auto = torch.func.grad(autograd_value(problem, signal))(theta)
    torch.testing.assert_close(problem.grad(theta, signal), auto, rtol=1e-12, atol=1e-14)
    for j in range(problem.num_objectives):
        auto_j = torch.func.grad(autograd_value(problem, problem.rewards[..., j]))(theta)
        torch.testing.assert_close(problem.objective_grads(theta)[j], auto_j, rtol=1e-12, atol=1e-14)


def test_fisher_matches_autograd():
    problem, theta, _ = instance(1, complete=False)
    score = torch.func.jacrev(problem.log_probs)(theta)  # [P, K, D]: ∇ log π(y|x)
    expected_fisher = torch.einsum("xk,xkd,xke->de", problem.probs(theta), score, score) / problem.num_prompts
    torch.testing.assert_close(problem.fisher(theta), expected_fisher, rtol=1e-12, atol=1e-14)


def test_hessian_matches_autograd_and_respects_the_smoothness_bound():
    problem, theta, signal = instance(2)
    auto = torch.autograd.functional.hessian(autograd_value(problem, signal), theta)
    torch.testing.assert_close(problem.hessian(theta, signal), auto, rtol=1e-10, atol=1e-13)
    bound = problem.smoothness_bound(signal)
    g = torch.Generator().manual_seed(3)
    for scale in (0.1, 1.0, 5.0, 30.0):  # from near-uniform to near-deterministic policies
        theta = scale * torch.randn(problem.dim, dtype=DTYPE, generator=g)
        assert torch.linalg.eigvalsh(problem.hessian(theta, signal)).abs().max() <= bound


def test_smoothness_bound_by_hand():
    # one prompt, tabular, s ∈ [0, 2]: L = 5/2 · range · λ_max(ΦᵀΦ / P) = 5/2 · 2 · 1
    problem = SoftmaxProblem(torch.tensor([[[0.0], [2.0], [1.0]]]), tabular_features(1, 3), ("r",))
    assert problem.smoothness_bound(problem.rewards[..., 0]) == pytest.approx(5.0)


def test_policy_covariance_by_hand():
    # π = (½, ½), a = (1, 0), b = (1, 0): Cov = E[ab] − E[a]E[b] = ½ − ¼
    probs = torch.tensor([[0.5, 0.5]], dtype=DTYPE)
    a = torch.tensor([[1.0, 0.0]], dtype=DTYPE)
    assert float(policy_covariance(probs, a, a)) == pytest.approx(0.25)


def test_spans_all_policies():
    assert random_problem(3, 4).spans_all_policies  # tabular
    g = torch.Generator().manual_seed(0)
    assert random_problem(3, 4, features=random_features(3, 4, dim=9, generator=g)).spans_all_policies  # P(K−1)
    assert not random_problem(3, 4, features=random_features(3, 4, dim=8, generator=g)).spans_all_policies


def test_correlated_rewards_have_the_requested_correlation():
    g = torch.Generator().manual_seed(0)
    r = correlated_rewards(200, 50, 2, correlation=-0.8, binary=True, generator=g).reshape(-1, 2)
    # for z ~ N(0, ρ), P(z1 > 0, z2 > 0) = ¼ + asin(ρ)/2π, so corr(1[z1>0], 1[z2>0]) = (2/π) asin ρ
    assert float(torch.corrcoef(r.T)[0, 1]) == pytest.approx(2 / math.pi * math.asin(-0.8), abs=0.02)
    with pytest.raises(UserError, match="correlation"):
        correlated_rewards(2, 3, 3, correlation=-0.6)


def test_stretched_features_kernel():
    direction = torch.tensor([[3.0, 4.0]], dtype=DTYPE)
    phi = stretched_features(direction, 8.0).reshape(2, 2)
    u = direction.reshape(-1) / 5
    torch.testing.assert_close(phi @ phi.T, torch.eye(2, dtype=DTYPE) + 8.0 * torch.outer(u, u))


# ---------------------------------------------------------------------- first-order laws


def test_tilt_law_by_hand():
    # π = (½, ½), r = s = (1, 0): π'(1) = σ(η), so dJ/dη at 0 = ¼ = Cov(r, s)
    probs = torch.tensor([[0.5, 0.5]], dtype=DTYPE)
    s = torch.tensor([[1.0, 0.0]], dtype=DTYPE)
    assert float(tilt(probs, s, 0.3)[0, 0]) == pytest.approx(torch.sigmoid(torch.tensor(0.3)).item())
    slope = central_difference(lambda eta: expected(tilt(probs, s, eta), s), 1e-4)
    assert float(slope) == pytest.approx(0.25, rel=1e-8)


@pytest.mark.parametrize("seed", range(5))
def test_tilt_law_finite_differences(seed):
    problem, theta, signal = instance(seed, binary=seed % 2 == 1)
    probs = problem.probs(theta)
    predicted = policy_covariance(probs, problem.rewards, signal)
    realised = central_difference(lambda eta: problem.objective_values(tilt(probs, signal, eta)), 1e-4)
    torch.testing.assert_close(realised, predicted, rtol=1e-6, atol=1e-6 * float(predicted.abs().max()))


@pytest.mark.parametrize("seed", range(3))
def test_natural_gradient_law(seed):
    problem, theta, signal = instance(seed)  # complete model: invertible Fisher up to per-prompt constants
    direction = Natural().direction(problem, theta, signal)
    predicted = policy_covariance(problem.probs(theta), problem.rewards, signal)
    torch.testing.assert_close(problem.objective_grads(theta) @ direction, predicted, rtol=1e-9, atol=1e-12)
    realised = central_difference(lambda eta: problem.objective_values(problem.probs(theta + eta * direction)), 1e-4)
    torch.testing.assert_close(realised, predicted, rtol=1e-6, atol=1e-6 * float(predicted.abs().max()))


def test_natural_step_is_the_tilt_on_a_complete_model():
    problem, theta, signal = instance(4)
    for rule in (Natural(), Tilt()):
        stepped = problem.probs(theta + 0.7 * rule.direction(problem, theta, signal))
        torch.testing.assert_close(stepped, tilt(problem.probs(theta), signal, 0.7), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("complete", [True, False])
def test_vanilla_gradient_law(complete):
    problem, theta, signal = instance(5, complete)
    direction = Vanilla().direction(problem, theta, signal)
    predicted = problem.objective_grads(theta) @ problem.grad(theta, signal)
    realised = central_difference(lambda eta: problem.objective_values(problem.probs(theta + eta * direction)), 1e-4)
    torch.testing.assert_close(realised, predicted, rtol=1e-6, atol=1e-6 * float(predicted.abs().max()))


def test_vanilla_departs_from_the_covariance_law_by_hand():
    # tabular, one prompt, π = (0.6, 0.2, 0.2); centred r = (1, −3, 0), centred s = (−1, −4/3, 13/3):
    # Cov = Σ π r s = −0.6 + 0.8 = 0.2 > 0, but ⟨∇J_r, ∇J_s⟩ = Σ π² r s = −0.36 + 0.16 = −0.2 < 0.
    r = torch.tensor([[[1.0], [-3.0], [0.0]]], dtype=DTYPE)
    s = torch.tensor([[-1.0, -4.0 / 3, 13.0 / 3]], dtype=DTYPE)
    problem = SoftmaxProblem(r, tabular_features(1, 3), ("r",))
    theta = torch.tensor([0.6, 0.2, 0.2], dtype=DTYPE).log()
    assert float(policy_covariance(problem.probs(theta), r, s)) == pytest.approx(0.2)
    assert float(problem.objective_grads(theta) @ problem.grad(theta, s)) == pytest.approx(-0.2)
    for rule, sign in ((Vanilla(), -1), (Natural(), 1), (Tilt(), 1)):
        change = problem.objective_values(problem.probs(theta + 1e-3 * rule.direction(problem, theta, s)))
        assert sign * float(change - problem.objective_values(problem.probs(theta))) > 0, rule.name


def test_error_slope_is_two_for_the_exact_prediction_and_one_for_a_wrong_one():
    problem, theta, signal = instance(6)
    probs = problem.probs(theta)
    start = problem.objective_values(probs)
    change = lambda eta: problem.objective_values(tilt(probs, signal, eta)) - start  # noqa: E731
    cov = policy_covariance(probs, problem.rewards, signal)
    for predicted, lo, hi in ((cov, 1.8, 2.2), (1.1 * cov, 0.9, 1.1)):
        errors = torch.stack([(change(eta) - eta * predicted).abs() for eta in LAW_ETAS])
        for j in range(problem.num_objectives):
            assert lo <= error_slope(LAW_ETAS, errors[:, j].tolist()) <= hi


def test_error_slope_fit():
    assert error_slope([1e-1, 1e-2, 1e-3], [3e-2, 3e-4, 3e-6]) == pytest.approx(2.0)
    assert error_slope([1e-1, 1e-2, 1e-3], [0.0, 0.0, 1e-3]) is None  # below round-off: nothing to fit


def test_clipped_update_first_order_is_the_sampled_policy_gradient():
    # at ρ = 1 nothing clips: each epoch steps by η·(1/B) Σ_b A_b ∇log π(y_b|x_b), ∇log π(y|x) = Φ(x,y) − E_π Φ(x,·)
    problem, theta, signal = instance(7)
    probs = problem.probs(theta)
    batch = sample_groups(problem, probs, 8, torch.Generator().manual_seed(0))
    advantages = torch.randn(len(batch.prompts), dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    score = problem.features - torch.einsum("xk,xkd->xd", probs, problem.features)[:, None]
    expected_grad = (advantages[:, None] * score[batch.prompts, batch.responses]).mean(0)
    eta, epochs = 1e-6, 3
    moved = (clipped_update(problem, theta, batch, advantages, eta, 0.2, epochs) - theta) / (eta * epochs)
    torch.testing.assert_close(moved, expected_grad, rtol=1e-4, atol=1e-9)


def test_clipping_stops_the_push():
    # one prompt, one sampled response with A > 0: after its ratio passes 1+ε the clipped surrogate has no gradient
    problem = SoftmaxProblem(torch.tensor([[[1.0], [0.0]]]), tabular_features(1, 2), ("r",))
    batch = all_pairs(problem)
    theta = problem.zero_params()
    advantages = torch.tensor([1.0, 0.0], dtype=DTYPE)
    few, many = (clipped_update(problem, theta, batch, advantages, 10.0, 0.1, n) for n in (1, 5))
    torch.testing.assert_close(few, many)
    assert few[0] > 0


def test_covariance_law_rows():
    rows = {row["rule"]: row for row in covariance_law(instances=6, seed=1)}
    for rule in ("tilt", "natural", "vanilla"):
        assert rows[rule]["cases"] > 0
        assert rows[rule]["sign_agreement"] == 1.0
        assert 1.8 <= rows[rule]["error_slope"] <= 2.2
    clipped = [row for name, row in rows.items() if name.startswith("clipped")]
    assert len(clipped) == 2 and all(0.0 <= row["sign_agreement"] <= 1.0 for row in clipped)
    assert clipped[-1]["clipped_tokens"] > clipped[0]["clipped_tokens"]  # the large step with a tight clip clips


def test_format_table():
    text = format_table([{"rule": "tilt", "agreement": 0.98765, "slope": None, "holds": True}], title="law")
    assert "law" in text and "tilt" in text and "0.9877" in text and "—" in text and "yes" in text


# ---------------------------------------------------------------------- weightings run unchanged


class SumOfGradients(Weighting):
    """A minimal gradient-level weighting: Σ_j λ_j ∇J_j with fixed λ."""

    name = "sum_of_gradients_test"
    family = "gradient"

    def __init__(self, objectives, weights):
        super().__init__(objectives)
        self._weights = torch.as_tensor(weights, dtype=DTYPE)

    @property
    def weights(self):
        return self._weights

    def combine(self, grads, stats):
        return self._weights @ grads


def test_linear_weighting_runs_unchanged_and_tilts_exactly():
    from moalign.weighting.linear import Linear

    problem = random_problem(3, 4, 2, correlation=-0.5, generator=torch.Generator().manual_seed(0))
    weighting = Linear(problem.objectives, weights=[0.7, 0.3])
    trajectory = run(problem, weighting, "tilt", steps=5, eta=0.4)
    assert trajectory.objective_values.shape == (6, 2)
    # five tilts by the same signal are one tilt by 5η
    final = tilt(problem.probs(problem.zero_params()), problem.scalarized([0.7, 0.3]), 5 * 0.4)
    torch.testing.assert_close(trajectory.objective_values[-1], problem.objective_values(final))


@pytest.mark.parametrize("rule", ["tilt", "natural", "vanilla", Clipped(epochs=2)])
def test_ctwa_runs_on_a_theory_problem(rule):
    from moalign.weighting.ctwa import CTWA

    problem = random_problem(3, 4, 2, correlation=-0.5, generator=torch.Generator().manual_seed(1))
    weighting = CTWA(problem.objectives, cov_targets=[0.5, 0.5], obj_targets=[1.0, 1.0], lambda_lr=0.5)
    trajectory = run(problem, weighting, rule, steps=4, eta=0.5)
    assert torch.isfinite(trajectory.objective_values).all()
    assert (trajectory.weights[-1] > trajectory.weights[0]).all()  # targets above any covariance: weights grow
    assert all("ctwa/cov/r1" in m for m in trajectory.metrics)


def test_gradient_level_weighting_matches_its_linear_twin():
    from moalign.weighting.linear import Linear

    problem = random_problem(2, 3, 2, generator=torch.Generator().manual_seed(2))
    for rule in ("vanilla", "natural"):
        via_grads = run(problem, SumOfGradients(problem.objectives, [0.2, 0.8]), rule, steps=3, eta=0.5)
        via_rewards = run(problem, Linear(problem.objectives, weights=[0.2, 0.8]), rule, steps=3, eta=0.5)
        torch.testing.assert_close(via_grads.objective_values, via_rewards.objective_values)


def test_run_rejects_what_cannot_work():
    from moalign.weighting.linear import Linear

    g = torch.Generator().manual_seed(0)
    restricted = random_problem(3, 4, 2, features=random_features(3, 4, dim=5, generator=g), generator=g)
    with pytest.raises(UserError, match="spans all policies"):
        run(restricted, Linear(restricted.objectives), "tilt", steps=1, eta=0.1)
    with pytest.raises(UserError, match="vanilla or natural"):
        run(restricted, SumOfGradients(restricted.objectives, [0.5, 0.5]), Clipped(), steps=1, eta=0.1)
    with pytest.raises(UserError, match="objectives"):
        run(restricted, Linear(["a", "b", "c"]), "vanilla", steps=1, eta=0.1)
    with pytest.raises(UserError, match="unknown update rule"):
        run(restricted, Linear(restricted.objectives), "adam", steps=1, eta=0.1)
    with pytest.raises(UserError, match="features must have shape"):
        SoftmaxProblem(torch.zeros(2, 3, 1), torch.zeros(2, 4, 5), ("r",))
