"""Scalarization algorithms (moalign/weighting/*): formulas on hand-computed cases, solvers against scipy's SLSQP,
state round trips and finiteness on adversarial inputs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.optimize import minimize

import moalign.weighting  # noqa: F401  (registers every algorithm)
from moalign.errors import UserError
from moalign.rl.estimators import grpo, reinforce_pp
from moalign.weighting._solvers import min_norm_weights, project_onto_simplex
from moalign.weighting.base import WEIGHTINGS, StepStats, Weighting, make_weighting
from moalign.weighting.nash_mtl import solve_nash_bargaining
from moalign.weighting.pama import scalar_min_norm_weights

torch.set_num_threads(1)

ALGORITHMS = [
    "tchebycheff", "smooth_tchebycheff", "lagrangian", "gdpo", "pama", "famo",
    "mgda", "gradnorm", "nash_mtl", "dynamic", "pcgrad", "cagrad", "upgrad",
]
OBJECTIVES = ("accuracy", "conciseness", "clarity")


def make_stats(rewards, group_size: int = 4, lengths=None, step: int = 0) -> StepStats:
    """StepStats for a small batch: groups of ``group_size`` consecutive samples, response lengths ``lengths``."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    batch = rewards.shape[0]
    lengths = torch.as_tensor(lengths if lengths is not None else [4] * batch)
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).float()
    return StepStats(
        step=step, rewards=rewards, group_ids=torch.arange(batch) // group_size, scores=torch.zeros(batch),
        advantages=torch.zeros(batch), response_mask=mask, old_logprobs=torch.zeros_like(mask),
    )


def has_combine(weighting: Weighting) -> bool:
    return type(weighting).combine is not Weighting.combine


def run_step(weighting: Weighting, stats: StepStats, grads: torch.Tensor, estimator=grpo):
    """One training step as the engine runs it: combine (if any) → advantages → update."""
    direction = weighting.combine(grads, stats) if has_combine(weighting) else None
    advantages = weighting.advantages(stats.rewards, stats.group_ids, estimator, stats.response_mask)
    metrics = weighting.update(stats)
    return direction, advantages, metrics


def random_rewards(seed: int, batch: int = 8, m: int = 3) -> torch.Tensor:
    return torch.randint(0, 2, (batch, m), generator=torch.Generator().manual_seed(seed)).float()


def random_grads(seed: int, m: int = 3, p: int = 6) -> torch.Tensor:
    return torch.randn(m, p, generator=torch.Generator().manual_seed(seed))


def simplex_qp(objective, gradient, m: int) -> np.ndarray:
    """Reference solver: minimize over the probability simplex with SLSQP."""
    result = minimize(objective, np.full(m, 1.0 / m), jac=gradient, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                      constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}],
                      options={"ftol": 1e-12, "maxiter": 1000})
    assert result.success, result.message
    return result.x


# ----------------------------------------------------------------------------------------------------------------
# Registry and parameters
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALGORITHMS)
def test_registered_with_metadata(name):
    cls = WEIGHTINGS.get(name)
    assert cls.name == name
    assert cls.family in ("reward", "advantage", "gradient")
    assert cls.description and cls.cost
    weighting = make_weighting(name, OBJECTIVES)
    assert weighting.weights.shape == (3,)


@pytest.mark.parametrize(
    "name, params",
    [("smooth_tchebycheff", {"lr": -0.1}), ("lagrangian", {"dual_lr": 0.0}), ("gradnorm", {"lr": 0.0}),
     ("famo", {"w_lr": -1.0}), ("dynamic", {"rho": 0.0}), ("nash_mtl", {"ridge": 0.0}), ("cagrad", {"c": -0.1}),
     ("tchebycheff", {"weights": [1.0, -1.0, 1.0]}), ("gdpo", {"unknown": 1})],
)
def test_invalid_params_rejected(name, params):
    with pytest.raises(ValidationError):
        make_weighting(name, OBJECTIVES, **params)


@pytest.mark.parametrize(
    "name, params",
    [("tchebycheff", {"weights": [0.5, 0.5]}), ("lagrangian", {"targets": [0.9, 0.9, 0.9]}),
     ("gdpo", {"weights": [1.0]}), ("upgrad", {"preference": [1.0, 1.0]})],
)
def test_wrong_number_of_values_is_a_user_error(name, params):
    with pytest.raises(UserError, match="give one value per (objective|constraint)"):
        make_weighting(name, OBJECTIVES, **params)


def test_wrong_shapes_are_user_errors():
    stats = make_stats(random_rewards(0))
    with pytest.raises(UserError, match=r"\[batch, 3\]"):
        make_weighting("tchebycheff", OBJECTIVES).scalarize(torch.zeros(8, 2), stats.group_ids)
    with pytest.raises(UserError, match=r"\[3, num_params\]"):
        make_weighting("mgda", OBJECTIVES).combine(torch.zeros(2, 5), stats)


# ----------------------------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_simplex_projection_matches_qp(seed):
    v = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    x = project_onto_simplex(v)
    reference = simplex_qp(lambda y: float(((y - v.numpy()) ** 2).sum()), lambda y: 2 * (y - v.numpy()), 4)
    assert float(x.sum()) == pytest.approx(1.0) and bool((x >= 0).all())
    np.testing.assert_allclose(x.numpy(), reference, atol=1e-6)


def test_simplex_projection_hand_cases():
    torch.testing.assert_close(project_onto_simplex(torch.tensor([0.6, 0.5, -1.0], dtype=torch.float64)),
                               torch.tensor([0.55, 0.45, 0.0], dtype=torch.float64))
    torch.testing.assert_close(project_onto_simplex(torch.tensor([3.0, 0.0], dtype=torch.float64)),
                               torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_mgda_two_gradients_closed_form():
    # g1 = (1, 0), g2 = (0, 2): α1 = ⟨g2 − g1, g2⟩ / ‖g1 − g2‖² = 4/5, min-norm point (0.8, 0.4).
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    mgda = make_weighting("mgda", ("a", "b"))
    direction = mgda.combine(grads, make_stats(random_rewards(0, m=2)))
    torch.testing.assert_close(mgda.weights, torch.tensor([0.8, 0.2], dtype=torch.float64))
    torch.testing.assert_close(direction, torch.tensor([0.8, 0.4]))
    # g2 = 3·g1: the min-norm point of the segment is g1 itself.
    torch.testing.assert_close(min_norm_weights(torch.tensor([[1.0, 3.0], [3.0, 9.0]], dtype=torch.float64)),
                               torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_mgda_min_norm_matches_qp(m, seed):
    grads = random_grads(seed, m=m, p=5).double()
    if seed % 2:  # make objective 1 conflict with objective 0
        grads[1] = -0.7 * grads[0] + 0.2 * grads[1]
    mgda = make_weighting("mgda", [f"o{j}" for j in range(m)])
    direction = mgda.combine(grads, make_stats(random_rewards(seed, m=m)))
    gram = (grads @ grads.T).numpy()
    reference = simplex_qp(lambda a: float(a @ gram @ a), lambda a: 2 * gram @ a, m)
    assert float(direction @ direction) == pytest.approx(float(reference @ gram @ reference), rel=1e-6, abs=1e-12)
    # The min-norm point is unique even when α is not.
    torch.testing.assert_close(direction, torch.from_numpy(reference) @ grads, atol=1e-5, rtol=1e-5)
    assert float(mgda.weights.sum()) == pytest.approx(1.0) and bool((mgda.weights >= 0).all())


@pytest.mark.parametrize("seed", range(4))
def test_nash_solution_satisfies_bargaining_equation(seed):
    grads = random_grads(seed, m=3, p=8).double()
    nash = make_weighting("nash_mtl", OBJECTIVES, ridge=1e-12)
    nash.combine(grads, make_stats(random_rewards(seed)))
    gram = grads @ grads.T
    alpha = nash.weights * torch.linalg.matrix_norm(gram) ** -0.5  # solution for the raw Gram matrix
    torch.testing.assert_close(gram @ alpha, 1.0 / alpha, rtol=1e-8, atol=0.0)
    assert bool((alpha > 0).all())
    assert nash.update(make_stats(random_rewards(seed)))["nash/residual"] < 1e-10


@pytest.mark.parametrize("seed", range(3))
def test_nash_is_invariant_to_each_gradients_scale(seed):
    """Scaling one objective's gradient by 1, 0.1, 0.01, 0.003 leaves the bargaining solution a solution: with the
    default ridge, α ⊙ (Qα) = 1 (Q the Frobenius-normalized Gram matrix) holds to 1e-4, α_j⟨g_j, d⟩ is the same for
    every j, and d keeps its direction."""
    base = random_grads(seed, m=3, p=50).double()
    reference = None
    for factor in (1.0, 0.1, 0.01, 0.003):
        grads = base.clone()
        grads[1] *= factor
        nash = make_weighting("nash_mtl", OBJECTIVES)
        direction = nash.combine(grads, make_stats(random_rewards(seed)))
        gram = grads @ grads.T
        Q = gram / torch.linalg.matrix_norm(gram)
        alpha = nash.weights
        torch.testing.assert_close(alpha * (Q @ alpha), torch.ones(3, dtype=torch.float64), rtol=0.0, atol=1e-4)
        utilities = alpha * (grads @ direction)  # α_j⟨g_j, d⟩: the same number for every j
        assert float(utilities.max() / utilities.min()) - 1.0 < 1e-4
        assert nash.metrics()["nash/residual"] < 1e-4
        unit = direction / direction.norm()
        if reference is None:
            reference = unit
        assert float(unit @ reference) > 1.0 - 1e-8


def test_nash_residual_measures_the_unridged_system():
    """Orthogonal gradients and ridge 0.1: the cosine matrix is I, so β = (1 + 0.1)^{-1/2} solves the ridged system
    exactly, and the bargaining equation itself is off by |β² − 1| = 1 − 1/1.1."""
    grads = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    nash = make_weighting("nash_mtl", OBJECTIVES, ridge=0.1)
    nash.combine(grads, make_stats(random_rewards(0)))
    assert nash.metrics()["nash/residual"] == pytest.approx(1.0 - 1.0 / 1.1, rel=1e-9)


def test_nash_orthogonal_gradients_closed_form():
    # Q diagonal: α_j = Q_jj^{-1/2}.
    Q = torch.diag(torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64))
    alpha, residual = solve_nash_bargaining(Q)
    torch.testing.assert_close(alpha, torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))
    assert residual < 1e-12


def test_nash_ill_conditioned_system_converges():
    Q = torch.tensor([[1.0, 0.999, 0.0], [0.999, 1.0, 0.0], [0.0, 0.0, 1e-3]], dtype=torch.float64)
    alpha, residual = solve_nash_bargaining(Q)
    torch.testing.assert_close(Q @ alpha, 1.0 / alpha, rtol=1e-9, atol=0.0)
    assert residual < 1e-10


def test_nash_zero_gradient_has_no_stake():
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    nash = make_weighting("nash_mtl", OBJECTIVES, ridge=1e-12)
    nash.combine(grads, make_stats(random_rewards(0)))
    assert float(nash.weights[1]) == 0.0
    # The two players are orthogonal: Ĝ = diag(1, 4)/√17, α_j = Ĝ_jj^{-1/2}.
    expected = torch.tensor([1.0, 4.0], dtype=torch.float64).div(math.sqrt(17.0)).rsqrt()
    torch.testing.assert_close(nash.weights[[0, 2]], expected)


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_maximizes_worst_improvement_in_ball(seed):
    grads = random_grads(seed, m=3, p=3).double()
    grads[2] = -0.8 * grads[0] + 0.3 * grads[2]  # a conflict
    c = 0.4
    cagrad = make_weighting("cagrad", OBJECTIVES, c=c, rescale="none")
    direction = cagrad.combine(grads, make_stats(random_rewards(seed)))
    g0 = grads.mean(0)
    radius = c * float(g0.norm())
    assert float((direction - g0).norm()) == pytest.approx(radius, rel=1e-4)  # on the boundary of the ball
    worst = float((grads @ direction).min())
    generator = torch.Generator().manual_seed(seed)
    unit = torch.randn(20_000, 3, generator=generator, dtype=torch.float64)
    unit = unit / unit.norm(dim=1, keepdim=True)
    candidates = g0 + radius * unit * torch.rand(20_000, 1, generator=generator, dtype=torch.float64) ** (1 / 3)
    assert float((candidates @ grads.T).min(dim=1).values.max()) <= worst + 1e-6


def test_cagrad_identical_gradients_hand_case():
    # g_j = g: g_0 = g, ‖g_w‖ = ‖g‖, d = g + c g, rescaled by 1 + c².
    g = torch.tensor([1.0, -2.0, 0.5])
    cagrad = make_weighting("cagrad", OBJECTIVES)
    direction = cagrad.combine(torch.stack([g, g, g]), make_stats(random_rewards(0)))
    torch.testing.assert_close(direction, g * 1.4 / 1.16)


def test_cagrad_pareto_stationary_falls_back_to_the_mean_gradient():
    # g1 = −g2: the dual optimum is w* = (½, ½, 0) with g_w* = 0, so the correction is undefined; d = g_0 / (1 + c²)
    # and no weight explodes (the official code's 1/(‖g_w‖ + 1e-8) would give weights of order 1e7 here).
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    cagrad = make_weighting("cagrad", OBJECTIVES)
    direction = cagrad.combine(grads, make_stats(random_rewards(0)))
    torch.testing.assert_close(direction, torch.tensor([0.0, 1.0 / 3.0]) / 1.16)
    torch.testing.assert_close(cagrad.weights, torch.full((3,), 1 / 3 / 1.16, dtype=torch.float64))


def test_pcgrad_hand_case():
    # g1 = (1, 0), g2 = (−1, 1) conflict: g1^PC = g1 + g2/2 = (.5, .5), g2^PC = g2 + g1 = (0, 1), d = (.5, 1.5).
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    pcgrad = make_weighting("pcgrad", ("a", "b"))
    direction = pcgrad.combine(grads, make_stats(random_rewards(0, m=2)))
    torch.testing.assert_close(direction, torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(pcgrad.weights, torch.tensor([2.0, 1.5], dtype=torch.float64))


def test_pcgrad_is_seeded_and_leaves_global_rng_alone():
    grads = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-0.5, -1.0, 1.0]])
    stats = make_stats(random_rewards(0))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    runs = []
    for _ in range(2):
        pcgrad = make_weighting("pcgrad", OBJECTIVES, seed=7)
        runs.append(torch.stack([pcgrad.combine(grads, stats) for _ in range(6)]))
    torch.testing.assert_close(runs[0], runs[1])
    assert torch.equal(torch.get_rng_state(), before)
    assert len({tuple(d.tolist()) for d in runs[0]}) > 1  # the order really is random across calls


def test_upgrad_hand_case_and_no_conflict():
    # Dual cone of g1 = (1, 0), g2 = (−1, 1): π(g1) = (.5, .5), π(g2) = (0, 1), mean (.25, .75).
    upgrad = make_weighting("upgrad", ("a", "b"), reg_eps=1e-12)
    direction = upgrad.combine(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), make_stats(random_rewards(0, m=2)))
    torch.testing.assert_close(direction, torch.tensor([0.25, 0.75]), atol=1e-6, rtol=0)
    for seed in range(4):
        grads = random_grads(seed, m=3, p=4).double()
        grads[1] = -0.9 * grads[0] + 0.1 * grads[1]
        upgrad = make_weighting("upgrad", OBJECTIVES, reg_eps=1e-12)
        direction = upgrad.combine(grads, make_stats(random_rewards(seed)))
        assert float((grads @ direction).min()) >= -1e-8 * float(grads.norm() ** 2)


def test_pama_closed_form_matches_min_norm_solver():
    cases = [[0.4, 0.1, 0.3], [0.0, 0.2, 0.5], [-0.3, 0.5, 0.1], [-0.2, -0.5, -0.9], [0.0, 0.0, 0.0], [0.1, 0.1, 0.4]]
    for signals in cases:
        a = torch.tensor(signals, dtype=torch.float64)
        alpha = scalar_min_norm_weights(a)
        assert float(alpha.sum()) == pytest.approx(1.0) and bool((alpha >= 0).all())
        optimum = float(min_norm_weights(torch.outer(a, a)) @ a) ** 2
        assert float(alpha @ a) ** 2 == pytest.approx(optimum, abs=1e-12)
    torch.testing.assert_close(scalar_min_norm_weights(torch.tensor([0.1, 0.1, 0.4], dtype=torch.float64)),
                               torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))  # ties share the weight
    torch.testing.assert_close(scalar_min_norm_weights(torch.tensor([-0.3, 0.5, 0.1], dtype=torch.float64)),
                               torch.tensor([0.625, 0.375, 0.0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------
# Reward- and advantage-level formulas
# ----------------------------------------------------------------------------------------------------------------


def test_tchebycheff_hand_case_and_running_ideal():
    """The authors' ideal point: the running max of every completion's reward (current batch included)."""
    tcheb = make_weighting("tchebycheff", ("a", "b"), weights=[0.5, 1.0])
    rewards = torch.tensor([[0.5, 0.0], [0.0, 1.0], [0.25, 0.5], [0.0, 0.0]])
    # z = batch maxima (0.5, 1.0): s = −max(0.5(0.5 − r_a), 1.0(1.0 − r_b))
    torch.testing.assert_close(tcheb.scalarize(rewards, torch.zeros(4)), torch.tensor([-1.0, -0.25, -0.5, -1.0]))
    tcheb.update(make_stats(rewards))
    worse = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.25], [1.0, 0.0]])  # maxima (1, .25): z → (1, 1)
    torch.testing.assert_close(tcheb.scalarize(worse, torch.zeros(4))[2], torch.tensor(-0.75))
    torch.testing.assert_close(tcheb.ideal(), torch.tensor([0.5, 1.0], dtype=torch.float64))
    tcheb.update(make_stats(worse))
    torch.testing.assert_close(tcheb.ideal(), torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_tchebycheff_ideal_from_per_completion_maxima_not_batch_means():
    """Batch means (0.25, 0.75, 0.5), λ uniform. The authors' z = (1, 1, 1) scores r = (0, 1, 1) and r = (1, 1, 0)
    both −1/3; with z = the batch means (ideal_mode=running_mean_max) failing the objective the policy is worst at
    costs least: −0.25/3 = −0.083 against −0.5/3 = −0.167."""
    rewards = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    groups = torch.zeros(4)
    authors = make_weighting("tchebycheff", OBJECTIVES).scalarize(rewards, groups)
    torch.testing.assert_close(authors[:2], torch.full((2,), -1 / 3))
    means = make_weighting("tchebycheff", OBJECTIVES, ideal_mode="running_mean_max").scalarize(rewards, groups)
    torch.testing.assert_close(means[:2], torch.tensor([-0.25 / 3, -0.5 / 3]))
    # the batch-mean form, two steps: means (0.5, 0.5) then (0.25, 0): z stays (0.5, 0.5)
    tcheb = make_weighting("tchebycheff", ("a", "b"), weights=[0.5, 1.0], ideal_mode="running_mean_max")
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(tcheb.scalarize(first, torch.zeros(4)), torch.tensor([-0.5, -0.25, 0.25, -0.5]))
    tcheb.update(make_stats(first))
    worse = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(tcheb.scalarize(worse, torch.zeros(4))[3], torch.tensor(-0.5))
    torch.testing.assert_close(tcheb.ideal(), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_tchebycheff_all_satisfying_completions_score_equal_whatever_their_length():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    stats = make_stats(rewards, lengths=[3, 12, 5, 7])
    fixed = make_weighting("tchebycheff", OBJECTIVES, ideal_point=[1.0, 1.0, 1.0])
    scores = fixed.scalarize(rewards, stats.group_ids)
    assert float(scores[0]) == float(scores[1]) == 0.0
    assert float(scores[2]) < 0 and float(scores[3]) < 0
    for tcheb in (fixed, make_weighting("tchebycheff", OBJECTIVES)):  # fixed and running ideal point
        for estimator in (grpo, reinforce_pp):
            advantages = tcheb.advantages(rewards, stats.group_ids, estimator, stats.response_mask)
            assert float(advantages[0]) == float(advantages[1])
            assert float(advantages[0]) > float(advantages[2])


def test_smooth_tchebycheff_two_step_hand_example():
    smooth = make_weighting("smooth_tchebycheff", ("a", "b"))  # p = (.5, .5), T = 1, η = 0.3; z reaches (1, 1)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(smooth.scalarize(rewards, torch.zeros(2)), torch.tensor([0.5, 0.5]))
    # step 1: means (0.5, 1.0) → ℓ += 0.3·0.5·(0.5, 0) = (0.075, 0)
    smooth.update(make_stats([[1.0, 1.0], [0.0, 1.0]]))
    expected_a = 1.0 / (1.0 + math.exp(-0.075))
    torch.testing.assert_close(smooth.weights, torch.tensor([expected_a, 1 - expected_a], dtype=torch.float64))
    # step 2: means (0.25, 0.5) → ℓ += 0.15·(0.75, 0.5); ℓ_a − ℓ_b = 0.075 + 0.1125 − 0.075 = 0.1125
    metrics = smooth.update(make_stats([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    expected_a = 1.0 / (1.0 + math.exp(-0.1125))
    assert metrics["weight/a"] == pytest.approx(expected_a)
    torch.testing.assert_close(smooth.scalarize(rewards, torch.zeros(2)),
                               torch.tensor([expected_a, 1 - expected_a], dtype=torch.float32))


def test_smooth_tchebycheff_ideal_is_the_running_max_of_completions():
    """z as the authors run it: an objective no completion has reached yet has z_j = its best reward so far, so a
    batch with a = 0 everywhere moves ℓ_a by 0, not by η p_a (1 − 0) as a fixed z = 1 would."""
    smooth = make_weighting("smooth_tchebycheff", ("a", "b"))  # p = (.5, .5), η = 0.3
    metrics = smooth.update(make_stats([[0.0, 1.0], [0.0, 0.0]]))  # maxima (0, 1), means (0, 0.5)
    assert metrics["gap/a"] == 0.0 and metrics["gap/b"] == pytest.approx(0.5)
    torch.testing.assert_close(smooth.log_weights, torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
                               + torch.tensor([0.0, 0.3 * 0.5 * 0.5], dtype=torch.float64))
    metrics = smooth.update(make_stats([[0.5, 0.0], [0.0, 0.0]]))  # z = (0.5, 1), means (0.25, 0)
    assert metrics["gap/a"] == pytest.approx(0.25) and metrics["gap/b"] == pytest.approx(1.0)
    fixed = make_weighting("smooth_tchebycheff", ("a", "b"), ideal_point=[1.0, 1.0])
    assert fixed.update(make_stats([[0.0, 1.0], [0.0, 0.0]]))["gap/a"] == pytest.approx(1.0)


def test_lagrangian_two_step_hand_example():
    lag = make_weighting("lagrangian", OBJECTIVES, targets=[0.9, 0.5])  # η_d = 0.01, λ0 = 0
    lag.update(make_stats([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))  # means b 0.5, c 1.0
    torch.testing.assert_close(lag.duals, torch.tensor([0.004, 0.0], dtype=torch.float64))
    metrics = lag.update(make_stats([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    # b: 0.004 + 0.01·(0.9 − 1.0) = 0.003; c: max(0, 0 + 0.01·(0.5 − 0.25)) = 0.0025
    assert metrics["dual/conciseness"] == pytest.approx(0.003)
    assert metrics["dual/clarity"] == pytest.approx(0.0025)
    stats = make_stats(random_rewards(3))
    columns = [grpo(stats.rewards[:, j], stats.group_ids) for j in range(3)]
    expected = columns[0] + 0.003 * columns[1] + 0.0025 * columns[2]
    torch.testing.assert_close(lag.advantages(stats.rewards, stats.group_ids, grpo, stats.response_mask), expected)


def test_gdpo_hand_example():
    # One group: (1,0), (0,1), (1,1), (0,0). Each reward column has mean ½ and unbiased std √(1/3), so its group
    # z-scores are ±z with z = ½/√(1/3); with weights (2, 1): A = 2·A_a + A_b = (z, −z, 3z, −3z).
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    stats = make_stats(rewards)
    gdpo = make_weighting("gdpo", ("a", "b"), weights=[2.0, 1.0], batch_whiten=False)
    z = 0.5 / math.sqrt(1.0 / 3.0)  # group z-score of a {0,1} reward with mean .5, unbiased std √(1/3)
    expected = torch.tensor([2 * z - z, -2 * z + z, 3 * z, -3 * z])
    torch.testing.assert_close(gdpo.advantages(rewards, stats.group_ids, grpo, stats.response_mask), expected,
                               rtol=1e-5, atol=1e-5)
    whitened = make_weighting("gdpo", ("a", "b"), weights=[2.0, 1.0])
    result = whitened.advantages(rewards, stats.group_ids, grpo, stats.response_mask)
    torch.testing.assert_close(result, (expected - expected.mean()) / (expected.std() + 1e-6), rtol=1e-5, atol=1e-5)


def test_pama_keeps_per_sample_credit():
    # One group. GRPO: A_a = (1.5, −.5, −.5, −.5), A_b = (.5, .5, −1.5, .5); Noon clipping keeps the positive parts.
    # Token means with lengths (2, 4, 4, 6): a_a = 1.5·2/16 = 0.1875, a_b = .5·(2 + 4 + 6)/16 = 0.375.
    # Both positive → all weight on the weaker signal (a), and each completion keeps its own credit.
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    stats = make_stats(rewards, lengths=[2, 4, 4, 6])
    pama = make_weighting("pama", ("a", "b"))
    advantages = pama.advantages(rewards, stats.group_ids, grpo, stats.response_mask)
    torch.testing.assert_close(advantages, torch.tensor([1.5, 0.0, 0.0, 0.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pama.weights, torch.tensor([1.0, 0.0], dtype=torch.float64))
    metrics = pama.update(stats)
    assert metrics["pama_signal/a"] == pytest.approx(0.1875, rel=1e-5)
    assert metrics["pama_signal/b"] == pytest.approx(0.375, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Adaptive gradient-level and loss-balancing methods
# ----------------------------------------------------------------------------------------------------------------


def test_dynamic_update_hand_example():
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    dynamic = make_weighting("dynamic", OBJECTIVES, lr=1e-6, rho=1e-5)
    stats = make_stats(random_rewards(0))
    direction = dynamic.combine(grads, stats)
    torch.testing.assert_close(direction, grads.mean(0))  # uniform weights this step
    dynamic.update(stats)
    influence = torch.tensor([1.0 + 1.0 + 0.0, 1.0 + 2.0 - 1.0, 0.0 - 1.0 + 1.0], dtype=torch.float64)
    expected = torch.softmax(torch.full((3,), 1 / 3, dtype=torch.float64).log() + 0.1 * influence, dim=0)
    torch.testing.assert_close(dynamic.weights, expected)


def test_dynamic_trains_on_one_advantage_of_the_weighted_score():
    """One group, w = (½, ½): a = (1, 0, 0, 0), b = (0, 1, 1, 0) → s = (.5, .5, .5, 0). GRPO on s: mean .375,
    unbiased std .25 → A = (.5, .5, .5, −1.5): the three equal scores get equal advantages. The per-objective sum
    ½A(a) + ½A(b) = ½(1.5, −.5, −.5, −.5) + ½(−.866, .866, .866, −.866) would give the first 0.317 and the next
    two 0.183."""
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    stats = make_stats(rewards)
    dynamic = make_weighting("dynamic", ("a", "b"))
    assert dynamic.trains_on_score
    advantages = dynamic.advantages(rewards, stats.group_ids, grpo, stats.response_mask)
    torch.testing.assert_close(advantages, torch.tensor([0.5, 0.5, 0.5, -1.5]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dynamic.scalarize(rewards, stats.group_ids), torch.tensor([0.5, 0.5, 0.5, 0.0]))
    per_objective_sum = 0.5 * grpo(rewards[:, 0], stats.group_ids) + 0.5 * grpo(rewards[:, 1], stats.group_ids)
    assert float(per_objective_sum[0] - per_objective_sum[1]) == pytest.approx(1 - math.sqrt(3) / 2, abs=1e-5)
    # after an update with new weights the score (and so the advantage) uses them
    dynamic.combine(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), stats)
    dynamic.update(stats)
    w = dynamic.weights.float()
    torch.testing.assert_close(dynamic.advantages(rewards, stats.group_ids, reinforce_pp, stats.response_mask),
                               reinforce_pp(rewards @ w, stats.group_ids, stats.response_mask))


@pytest.mark.parametrize("rewards", [
    [[0.0, 0.0]] * 4,  # all zero
    [[-5.0, -3.0], [-4.0, -1.0], [-6.0, -2.0], [-5.0, -7.0]],  # negative
    [[2.0, 3.0]] * 4,  # above the ideal value
    [[1.0, 1.0]] * 4,  # exactly at the ideal value (zero deficit)
])
@pytest.mark.parametrize("name", ["gradnorm", "famo"])
def test_loss_balancing_stays_finite_on_degenerate_rewards(name, rewards):
    weighting = make_weighting(name, ("a", "b"))
    grads = torch.tensor([[1.0, 0.5], [-0.2, 2.0]])
    for step in range(4):
        stats = make_stats(rewards, step=step)
        direction, advantages, metrics = run_step(weighting, stats, grads)
        assert bool(torch.isfinite(direction).all()) and bool(torch.isfinite(advantages).all())
        assert all(math.isfinite(v) for v in metrics.values())
        assert bool((weighting.weights > 0).all())


def test_gradnorm_moves_weight_to_the_lagging_objective():
    gradnorm = make_weighting("gradnorm", ("a", "b"))
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # equal norms
    run_step(gradnorm, make_stats([[0.0, 0.0]] * 4), grads)  # deficits (1.1, 1.1) = L(0)
    run_step(gradnorm, make_stats([[1.0, 0.0]] * 4), grads)  # a fully solved (0.1), b not (1.1)
    # ratios (1/11, 1): r_b = 2/(1 + 1/11) > 1 → target_b > w_b‖g_b‖ → w_b up by lr, w_a down by lr
    torch.testing.assert_close(gradnorm.weights, torch.tensor([0.975, 1.025], dtype=torch.float64))


def test_famo_adam_matches_torch_and_favours_the_least_improved():
    famo = make_weighting("famo", ("a", "b"))
    logits = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([logits], lr=0.025, weight_decay=1e-5)
    batches = [[[0.0, 0.0]] * 4, [[1.0, 0.0], [0.0, 0.0]] * 2, [[1.0, 0.0], [1.0, 1.0]] * 2]
    previous = None
    for rewards in batches:
        famo.update(make_stats(rewards))
        log_deficits = (1.0 - torch.tensor(rewards, dtype=torch.float64).mean(0)).clamp(min=0).add(0.1).log()
        if previous is not None:
            (grad,) = torch.autograd.grad(torch.softmax(logits, 0), logits, grad_outputs=previous - log_deficits)
            logits.grad = grad
            reference.step()
        previous = log_deficits
    torch.testing.assert_close(famo.logits, logits.detach())
    z = torch.softmax(famo.logits, 0)
    assert float(z[1]) > float(z[0])  # b's deficit improved less than a's
    stats = make_stats([[0.5, 0.5]] * 4)
    famo.advantages(stats.rewards, stats.group_ids, grpo, stats.response_mask)
    torch.testing.assert_close(famo.weights, z / z.sum())  # equal deficits: w = z


# ----------------------------------------------------------------------------------------------------------------
# Every algorithm: state round trip and adversarial inputs
# ----------------------------------------------------------------------------------------------------------------


def assert_same_state(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a.nan_to_num(nan=-12345.0), b.nan_to_num(nan=-12345.0)) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    else:
        assert a == b


@pytest.mark.parametrize("name", ALGORITHMS)
def test_state_dict_round_trip(name):
    original = make_weighting(name, OBJECTIVES)
    for step in range(3):
        run_step(original, make_stats(random_rewards(step), step=step), random_grads(step))
    saved = original.state_dict()
    frozen = copy.deepcopy(saved)
    restored = make_weighting(name, OBJECTIVES)
    restored.load_state_dict(saved)
    assert_same_state(restored.state_dict(), saved)
    # The restored object continues exactly like the original.
    for step in range(3, 5):
        stats, grads = make_stats(random_rewards(step), step=step), random_grads(step)
        (d1, a1, m1), (d2, a2, m2) = run_step(original, stats, grads), run_step(restored, stats, grads)
        assert (d1 is None and d2 is None) or torch.equal(d1, d2)
        assert torch.equal(a1, a2) and m1 == m2
    assert_same_state(original.state_dict(), restored.state_dict())
    assert_same_state(saved, frozen)  # the saved state never aliases the live one


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(UserError, match="expected"):
        make_weighting("mgda", OBJECTIVES).load_state_dict(make_weighting("famo", OBJECTIVES).state_dict())


def _reward_cases() -> dict[str, torch.Tensor]:
    nan = float("nan")
    return {
        "zero_variance_groups": torch.tensor([[1.0, 0.0, 1.0]] * 4 + [[0.0, 1.0, 1.0]] * 4),
        "all_zero": torch.zeros(8, 3),
        "huge_scale": 1e6 * random_rewards(1),
        "negative": -3.0 * random_rewards(2) - 1.0,
        "missing_entries": torch.where(random_rewards(3).bool(), torch.tensor(nan), random_rewards(4)),
        "missing_objective": torch.cat([random_rewards(5)[:, :2], torch.full((8, 1), nan)], dim=1),
        "single_sample_groups": random_rewards(6),
    }


def _gradient_cases() -> dict[str, torch.Tensor]:
    g = random_grads(0)[0]
    h = random_grads(1)[1]
    return {
        "identical": torch.stack([g, g, g]),
        "opposite": torch.stack([g, -g, h]),
        "exactly_opposite_pair": torch.stack([g, -g, g]),
        "huge_scale": 1e6 * random_grads(2),
        "tiny_scale": 1e-20 * random_grads(3),
        "one_zero": torch.stack([g, torch.zeros_like(g), h]),
        "all_zero": torch.zeros(3, 6),
        "non_finite_row": torch.stack([g, torch.full_like(g, float("nan")), h]),
    }


@pytest.mark.parametrize("name", ALGORITHMS)
def test_adversarial_inputs_stay_finite(name):
    weighting = make_weighting(name, OBJECTIVES)
    reward_cases, gradient_cases = _reward_cases(), _gradient_cases()
    for step, (reward_case, rewards) in enumerate(reward_cases.items()):
        for grad_case, grads in gradient_cases.items():
            group_size = 1 if reward_case == "single_sample_groups" else 4
            stats = make_stats(rewards, group_size=group_size, step=step)
            for estimator in (grpo, reinforce_pp):
                direction, advantages, metrics = run_step(weighting, stats, grads, estimator)
                where = f"{name} on {reward_case} rewards, {grad_case} gradients"
                if direction is not None:
                    assert bool(torch.isfinite(direction).all()), where
                assert bool(torch.isfinite(advantages).all()), where
                assert bool(torch.isfinite(weighting.weights).all()), where
                assert all(math.isfinite(v) for v in metrics.values()), where
                if weighting.family == "reward":
                    assert bool(torch.isfinite(weighting.scalarize(stats.rewards, stats.group_ids)).all()), where
    if has_combine(weighting):  # a NaN gradient row is a guarded event, and update() reports it
        assert weighting.update(make_stats(random_rewards(0)))["num_guarded"] >= 1
