"""The change interval over seeds × prompts (moalign.diagnostics.crossed): hand-computed tables, agreement with
textbook intervals in the cases where one exists, and simulated studies of a policy with binary rewards sampled
on common random numbers — coverage of the true change, the rate at which a null change is flagged, and the
detection rate of a known change against the stated power (docs/statistics.md)."""

import numpy as np
import pytest
from scipy import stats

from moalign.diagnostics.crossed import (
    Design,
    MeanSquares,
    VarianceComponents,
    change_interval,
    power,
    standard_error,
)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def simulated_studies(rng, studies, seeds, prompts, samples, shift, seed_sd, prompt_sd, interaction_sd,
                      start_mean=0.0, start_sd=1.0):
    """Per-completion rewards [R, S, P, K] at the start and the end of ``studies`` simulated studies. A prompt's
    start policy answers correctly with probability σ(θ_p), θ_p ~ N(start_mean, start_sd²); training moves its logit
    by shift + a_s + b_p + c_sp (seed, prompt, interaction); completion k of a prompt draws one uniform u shared by
    the start and the end (common random numbers): reward = [u < probability]."""
    theta = rng.normal(start_mean, start_sd, (studies, 1, prompts, 1))
    end = (theta + shift + rng.normal(0, seed_sd, (studies, seeds, 1, 1))
           + rng.normal(0, prompt_sd, (studies, 1, prompts, 1))
           + rng.normal(0, interaction_sd, (studies, seeds, prompts, 1)))
    u = rng.random((studies, seeds, prompts, samples))
    return (u < sigmoid(theta)).astype(float), (u < sigmoid(end)).astype(float)


def true_change(rng, shift, seed_sd, prompt_sd, interaction_sd, start_mean=0.0, start_sd=1.0, n=2_000_000):
    """Δ = E[σ(θ + shift + a + b + c) − σ(θ)] by Monte Carlo (0 exactly when start_mean = shift = 0: symmetry)."""
    theta = rng.normal(start_mean, start_sd, n)
    moved = theta + shift + rng.normal(0, np.sqrt(seed_sd ** 2 + prompt_sd ** 2 + interaction_sd ** 2), n)
    return float(np.mean(sigmoid(moved) - sigmoid(theta)))


# ------------------------------------------------------------------------------------------------ hand cases


def test_mean_squares_of_a_hand_table():
    d = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 8.0]])
    ms = MeanSquares.of(d)
    # grand mean 3.5; seed means 2, 5; prompt means 2, 3, 5.5
    assert ms.mean == pytest.approx(3.5)
    assert ms.seed == pytest.approx(3 * ((2 - 3.5) ** 2 + (5 - 3.5) ** 2) / 1)
    assert ms.prompt == pytest.approx(2 * ((2 - 3.5) ** 2 + (3 - 3.5) ** 2 + (5.5 - 3.5) ** 2) / 2)
    resid = d - np.array([[2.0], [5.0]]) - np.array([2.0, 3.0, 5.5]) + 3.5
    assert ms.resid == pytest.approx(np.sum(resid ** 2) / 2)
    # the three sums of squares add up to the total
    total = np.sum((d - 3.5) ** 2)
    assert ms.seed * 1 + ms.prompt * 2 + ms.resid * 2 == pytest.approx(total)


def test_one_run_is_the_paired_t_interval_over_prompts():
    rng = np.random.default_rng(3)
    changes = rng.normal(0.1, 0.3, 40)
    estimate = change_interval(changes)
    expected = stats.ttest_1samp(changes, 0.0).confidence_interval(0.95)
    assert estimate.interval == pytest.approx((expected.low, expected.high))
    assert estimate.seeds == 1 and estimate.prompts == 40 and estimate.df == 39


def test_a_pure_seed_effect_gives_the_t_interval_over_seed_means():
    """Every prompt of a seed changed alike: no prompt variance, and the interval is Student's t over the seeds."""
    seed_changes = np.array([0.10, 0.25, 0.04])
    changes = np.repeat(seed_changes[:, None], 16, axis=1)
    estimate = change_interval(changes)
    expected = stats.ttest_1samp(seed_changes, 0.0).confidence_interval(0.95)
    assert estimate.interval == pytest.approx((expected.low, expected.high))
    assert estimate.v_prompt == pytest.approx(0.0, abs=1e-15)


def test_a_constant_change_has_a_point_interval():
    estimate = change_interval(np.full((3, 8), -0.25))
    assert estimate.interval == pytest.approx((-0.25, -0.25))
    assert estimate.falls and not estimate.rises
    assert change_interval(np.zeros((2, 8))).interval == (0.0, 0.0)


def test_prompts_missing_in_any_run_are_left_out():
    changes = np.array([[0.1, np.nan, 0.3, 0.2], [0.2, 0.5, np.nan, 0.1]])
    estimate = change_interval(changes)
    assert estimate.prompts == 2
    assert estimate.mean == pytest.approx(np.mean([0.1, 0.2, 0.2, 0.1]))
    with pytest.raises(ValueError, match="two prompts"):
        change_interval(np.array([[0.1, np.nan], [0.2, 0.3]]))


def test_variance_components_are_recovered_from_a_large_normal_table():
    rng = np.random.default_rng(0)
    seeds, prompts, samples = 300, 300, 4
    seed_sd, prompt_sd, interaction_sd, sample_sd = 0.05, 0.1, 0.08, 0.4
    change = (rng.normal(0, seed_sd, (seeds, 1, 1)) + rng.normal(0, prompt_sd, (1, prompts, 1))
              + rng.normal(0, interaction_sd, (seeds, prompts, 1)) + rng.normal(0, sample_sd, (seeds, prompts, samples)))
    components = VarianceComponents.estimate(np.zeros_like(change), change)
    assert components.seed == pytest.approx(seed_sd ** 2, rel=0.2)
    assert components.prompt == pytest.approx(prompt_sd ** 2, rel=0.2)
    assert components.interaction == pytest.approx(interaction_sd ** 2, rel=0.2)
    assert components.sample == pytest.approx(sample_sd ** 2, rel=0.02)


def test_standard_error_of_a_design_by_hand():
    components = VarianceComponents(seed=0.004, prompt=0.01, interaction=0.002, sample=0.08)
    # 0.004/4 + 0.01/50 + (0.002 + 0.08/8)/(4·50)
    assert standard_error(components, Design(4, 50, 8)) == pytest.approx(np.sqrt(0.001 + 0.0002 + 0.012 / 200))


# ------------------------------------------------------------------------------------------------ simulated studies


@pytest.mark.parametrize("seeds,prompts,samples", [(2, 32, 8), (3, 64, 8), (4, 32, 4)])
def test_a_null_change_is_covered_and_flagged_at_most_at_the_nominal_rate(seeds, prompts, samples):
    """1000 studies of a policy whose expected change is exactly 0 (a symmetric start and symmetric moves), with
    seeds, prompts and the seed × prompt interaction all moving it: the 95% interval covers 0 in 93–97% of the
    studies and excludes it (a change "detected") in at most 7%."""
    rng = np.random.default_rng(seeds)
    start, end = simulated_studies(rng, 1000, seeds, prompts, samples, shift=0.0, seed_sd=0.5, prompt_sd=0.5,
                                   interaction_sd=0.5)
    estimates = [change_interval(d) for d in (end - start).mean(axis=3)]
    covered = np.mean([e.interval[0] <= 0.0 <= e.interval[1] for e in estimates])
    assert 0.93 <= covered <= 0.97
    assert 1 - covered <= 0.07


def test_a_known_change_is_covered_and_detected_at_the_stated_power():
    """A policy whose training raises the expected reward by Δ ≈ 0.09: its variance components measured on a large
    pilot (800 seeds × 400 prompts) give the stated power of a 3-seed, 64-prompt, 8-sample study; 1500 such studies
    detect the rise at that rate (± 5 points: the binomial error of 1500 studies and the pilot's estimation error
    are ≈ 1.2 and 1.3 points) and cover Δ in 93–97% of them."""
    rng = np.random.default_rng(7)
    moves = dict(shift=0.45, seed_sd=0.15, prompt_sd=0.3, interaction_sd=0.3)
    delta = true_change(rng, **moves)
    pilot_start, pilot_end = simulated_studies(rng, 1, 800, 400, 8, **moves)
    components = VarianceComponents.estimate(pilot_start[0], pilot_end[0])
    stated = power(components, Design(3, 64, 8), delta)
    assert 0.6 < stated < 0.95  # a design where the rate can be told apart from 0 and from 1
    start, end = simulated_studies(rng, 1500, 3, 64, 8, **moves)
    estimates = [change_interval(d) for d in (end - start).mean(axis=3)]
    detected = np.mean([e.rises for e in estimates])
    assert detected == pytest.approx(stated, abs=0.05)
    assert 0.93 <= np.mean([e.interval[0] <= delta <= e.interval[1] for e in estimates]) <= 0.97


def test_power_matches_simulated_normal_tables():
    """Under the normal model the power computation is exact up to Monte Carlo error, including at S = 2."""
    rng = np.random.default_rng(11)
    components = VarianceComponents(seed=0.0009, prompt=0.004, interaction=0.003, sample=0.06)
    for design, effect in ((Design(2, 48, 8), 0.35), (Design(4, 32, 4), 0.085)):
        s, p, k = design.seeds, design.prompts, design.samples
        tables = (effect + rng.normal(0, np.sqrt(components.seed), (1000, s, 1))
                  + rng.normal(0, np.sqrt(components.prompt), (1000, 1, p))
                  + rng.normal(0, np.sqrt(components.cell(k)), (1000, s, p)))
        detected = np.mean([change_interval(t).rises for t in tables])
        assert detected == pytest.approx(power(components, design, effect), abs=0.04)


def test_the_t_interval_over_seed_means_misses_the_prompt_variance():
    """Why the interval has a prompt term: when prompts differ in how training moves them and every seed is
    evaluated on the same prompts, Student's t over the seeds' mean changes covers far less than 95% of the change
    over the prompt distribution; the crossed interval covers it."""
    rng = np.random.default_rng(5)
    start, end = simulated_studies(rng, 1000, 4, 32, 8, shift=0.0, seed_sd=0.1, prompt_sd=1.0, interaction_sd=0.1)
    changes = (end - start).mean(axis=3)
    seed_means = changes.mean(axis=2)
    half = stats.t.ppf(0.975, 3) * seed_means.std(axis=1, ddof=1) / 2
    seeds_only = np.mean(np.abs(seed_means.mean(axis=1)) <= half)
    crossed = np.mean([e.interval[0] <= 0 <= e.interval[1] for e in map(change_interval, changes)])
    assert seeds_only < 0.8
    assert 0.93 <= crossed <= 0.97
