"""CTWA statistic and controller, and the covariance-law training signal, against hand-computed cases."""

import math

import pytest
import torch

from moalign.rl.covariance import (
    carries_signal,
    drop_outliers,
    group_covariance,
    training_signal,
)
from moalign.weighting import StepStats, make_weighting
from moalign.weighting.linear import Linear

G4 = torch.tensor([0, 0, 1, 1])


def stats_for(rewards, advantages, groups=G4, ratio=None, step=0):
    B = rewards.shape[0]
    mask = torch.ones(B, 2)
    old = torch.zeros(B, 2)
    new = old.clone() if ratio is None else torch.log(ratio)
    return StepStats(step, rewards, groups, rewards.sum(1), advantages, mask, old, new, 0.2, 0.2)


def test_group_covariance_hand():
    r = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    w = torch.tensor([2.0, 0.0, 3.0, 1.0])
    gc = group_covariance(r, w, G4)
    assert gc.cov.item() == pytest.approx(0.25)  # groups: 0.5 and 0
    assert gc.corr.item() == pytest.approx(1.0)  # only group 0 has a defined correlation
    pooled = group_covariance(r, w, G4, pooled=True)
    assert pooled.cov.item() == pytest.approx(0.25)
    assert pooled.corr.item() == pytest.approx(0.25 / math.sqrt(0.125))


def test_group_covariance_ignores_singletons_and_missing():
    r = torch.tensor([[1.0], [0.0], [float("nan")], [1.0], [5.0]])
    w = torch.tensor([1.0, -1.0, 9.0, 2.0, 100.0])
    gc = group_covariance(r, w, torch.tensor([0, 0, 1, 1, 2]))
    # group 0: cov 0.5; group 1 has one usable sample, group 2 is a singleton -> only group 0 counts
    assert gc.cov.item() == pytest.approx(0.5)
    assert gc.num_groups.item() == 1


def test_training_signal_clipping_hand():
    adv = torch.tensor([1.0, -1.0])
    ratio = torch.tensor([[1.1, 1.3], [0.9, 0.7]])
    sig = training_signal(adv, torch.zeros(2, 2), ratio.log(), torch.ones(2, 2), 0.2, 0.2, "mean")
    assert torch.allclose(sig.w, torch.tensor([0.55, -0.45]), atol=1e-6)
    assert torch.allclose(sig.w_unclipped, torch.tensor([1.2, -0.8]), atol=1e-6)
    assert sig.unclipped_fraction.item() == pytest.approx(0.5)
    assert sig.distortion.item() == pytest.approx(0.5, abs=1e-6)
    total = training_signal(adv, torch.zeros(2, 2), ratio.log(), torch.ones(2, 2), 0.2, 0.2, "sum")
    assert torch.allclose(total.w, torch.tensor([1.1, -0.9]), atol=1e-6)
    # the authors' "mean_unclipped": the mean of Â·ρ over the unclipped tokens only, Σ_t Â ρ I / (Σ_t I + 1e-8)
    unc = training_signal(adv, torch.zeros(2, 2), ratio.log(), torch.ones(2, 2), 0.2, 0.2, "mean_unclipped")
    assert torch.allclose(unc.w, torch.tensor([1.1, -0.9]), atol=1e-6)
    assert torch.allclose(unc.w_unclipped, torch.tensor([1.2, -0.8]), atol=1e-6)


def test_mean_unclipped_averages_over_the_unclipped_tokens():
    """Â = 1, ratios (1.0, 1.5), ε = 0.2: the second token is clipped, so the authors' mean over unclipped tokens is
    1.0 (not 1.25, the mean of Â·ρ over every token, nor 0.5, the "mean" aggregation)."""
    ratio = torch.tensor([[1.0, 1.5]])
    args = (torch.tensor([1.0]), torch.zeros(1, 2), ratio.log(), torch.ones(1, 2), 0.2, 0.2)
    assert training_signal(*args, "mean_unclipped").w.item() == pytest.approx(1.0, abs=1e-6)
    assert training_signal(*args, "mean").w.item() == pytest.approx(0.5, abs=1e-6)
    assert training_signal(*args, "sum").w.item() == pytest.approx(1.0, abs=1e-6)
    # every token clipped: no unclipped token to average over, the signal is 0
    all_clipped = training_signal(torch.tensor([1.0]), torch.zeros(1, 2), torch.tensor([[1.5, 2.0]]).log(),
                                  torch.ones(1, 2), 0.2, 0.2, "mean_unclipped")
    assert all_clipped.w.item() == 0.0


def test_completions_without_signal_are_left_out_of_the_unclipped_fraction():
    """Â_b = 0 gives w_b = 0 whatever the ratios, so its tokens neither count as clipped nor unclipped, and its
    post-update log-probs do not matter (the trainer skips their forward)."""
    adv = torch.tensor([1.0, 0.0])
    ratio = torch.tensor([[1.1, 1.3], [2.0, 2.0]])  # the second row would be clipped if it carried a signal
    sig = training_signal(adv, torch.zeros(2, 2), ratio.log(), torch.ones(2, 2), 0.2, 0.2, "mean")
    assert sig.unclipped_fraction.item() == pytest.approx(0.5)  # 1 of the first row's 2 tokens
    assert sig.w[1].item() == 0.0
    other = training_signal(adv, torch.zeros(2, 2), torch.tensor([[1.1, 1.3], [0.3, 0.1]]).log(), torch.ones(2, 2))
    assert torch.equal(sig.w, other.w) and torch.equal(sig.unclipped_fraction, other.unclipped_fraction)
    none = training_signal(torch.zeros(2), torch.zeros(2, 2), ratio.log(), torch.ones(2, 2))
    assert none.unclipped_fraction.item() == 1.0  # nothing carries a signal: nothing is clipped
    # token-level advantages: the token mean over the response mask decides
    token_adv = torch.tensor([[0.5, -0.5, 3.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert carries_signal(token_adv, mask).tolist() == [False, False, True]
    assert carries_signal(torch.tensor([0.0, -0.1]), mask[:2]).tolist() == [False, True]


def test_training_signal_respects_mask():
    adv = torch.tensor([2.0])
    sig = training_signal(adv, torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]))
    assert sig.w.item() == pytest.approx(2.0)


def test_drop_outliers():
    w = torch.tensor([1.0, -1.0, 2.0, 1e6, float("nan")])
    assert drop_outliers(w).tolist() == [True, True, True, False, False]


def test_drop_outliers_uses_the_ordinary_median():
    """Even count: the median is the mean of the two middle values (numpy's, the authors'), not the lower one.
    |w| = (0.001, 0.001, 1.5, 1.5): median 0.7505, threshold 75.05, all four kept (the lower median 0.001 would
    drop both 1.5s)."""
    assert drop_outliers(torch.tensor([0.001, 0.001, 1.5, 1.5])).tolist() == [True] * 4
    # median (2 + 4)/2 = 3, threshold 300: 250 stays, 350 goes; the lower median (2) would drop both
    w = torch.tensor([1.0, -1.0, 2.0, -4.0, 250.0, -350.0])
    assert drop_outliers(w).tolist() == [True] * 5 + [False]
    assert drop_outliers(w, factor=1.0).tolist() == [True, True, True, False, False, False]  # |w| ≤ 3


def test_group_covariance_keeps_the_completions_the_lower_median_dropped():
    """|w| split between 0.01 and 1.5 (three each): the ordinary median is 0.755 and every completion counts. The
    lower median (0.01) would set the threshold at 1 and drop all of group 1.

    group 0: r̃ = (1/3, −2/3, 1/3), w̃ = (0.02, −0.04, 0.02)/3 → cov = (0.12/9)/3 = 0.00444…
    group 1: r̃ = (−1/3, 2/3, −1/3), w̃ = (1, 1, −2)         → cov = (−1/3 + 2/3 + 2/3)/3 = 1/3"""
    rewards = torch.tensor([[1.0], [0.0], [1.0], [0.0], [1.0], [0.0]])
    w = torch.tensor([0.01, -0.01, 0.01, 1.5, 1.5, -1.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    valid = drop_outliers(w)
    assert valid.all()
    gc = group_covariance(rewards, w, groups, valid=valid)
    assert gc.cov.item() == pytest.approx((0.12 / 27 + 1 / 3) / 2, rel=1e-5)
    assert gc.num_groups.item() == 2


def ctwa(**kw):
    base = dict(init_weights=[0.5, 0.5], lambda_lr=0.1, cov_targets=[0.3, 0.3], tau=0.5)
    base.update(kw)
    return make_weighting("ctwa", ["a", "b"], **base)


REWARDS_1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])  # c = [0.5, -0.25]
ADV = torch.tensor([1.0, -1.0, 1.0, -1.0])


def test_ctwa_first_step_and_gating():
    w = ctwa(obj_targets=[1.0, 0.5])  # b's batch mean 0.75 >= 0.5: gated
    m = w.update(stats_for(REWARDS_1, ADV))
    assert m["ctwa/cov/a"] == pytest.approx(0.5)
    assert m["ctwa/cov/b"] == pytest.approx(-0.25)
    assert m["ctwa/ema/b"] == pytest.approx(-0.25)
    assert m["ctwa/gate/b"] == 0.0
    assert torch.allclose(w.weights, torch.tensor([0.5, 0.5]))


def test_ctwa_raises_weight_and_ema():
    w = ctwa(obj_targets=[1.0, 1.0])
    w.update(stats_for(REWARDS_1, ADV))
    lam_b = 0.5 * math.exp(0.1 * 0.55)
    assert w.weights[1].item() == pytest.approx(lam_b, rel=1e-6)
    assert w.weights[0].item() == pytest.approx(0.5)  # c_a = 0.5 above its target 0.3
    rewards_2 = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # c_b = 0.5
    m = w.update(stats_for(rewards_2, ADV, step=1))
    assert m["ctwa/ema/b"] == pytest.approx(0.5 * -0.25 + 0.5 * 0.5)
    assert w.weights[1].item() == pytest.approx(lam_b * math.exp(0.1 * (0.3 - 0.125)), rel=1e-6)
    # the new weights scalarize the next batch
    assert torch.allclose(w.scalarize(torch.tensor([[1.0, 1.0]]), torch.tensor([0])), w.weights.sum().reshape(1))


def test_ctwa_correlation_target_and_outliers():
    w = ctwa(obj_targets=[1.0, 1.0], use_corr_target=True, cov_targets=[2.0, 2.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])  # A < 0 keeps ρ = 1e7 unclipped
    rewards = torch.cat([REWARDS_1, torch.tensor([[1.0, 1.0]])])
    ratio = torch.ones(5, 2)
    ratio[4] = 1e7  # the outlier's |w| is far above 100 × median
    m = w.update(stats_for(rewards, adv, groups=torch.tensor([0, 0, 1, 1, 1]), ratio=ratio))
    assert m["ctwa/num_valid_w"] == 4
    assert m["ctwa/corr/a"] == pytest.approx(1.0)


def test_ctwa_state_round_trip_and_missing_rewards():
    w = ctwa(obj_targets=[1.0, 1.0])
    rewards = REWARDS_1.clone()
    rewards[0, 1] = float("nan")
    w.update(stats_for(rewards, ADV))
    assert all(math.isfinite(float(x)) for x in w.weights)
    clone = ctwa(obj_targets=[1.0, 1.0])
    clone.load_state_dict(w.state_dict())
    assert torch.equal(clone.weights, w.weights)
    s2 = stats_for(REWARDS_1, ADV, step=1)
    assert w.update(s2) == clone.update(s2)


def test_ctwa_requires_post_update_logprobs():
    w = ctwa()
    s = stats_for(REWARDS_1, ADV)
    s.new_logprobs = None
    with pytest.raises(ValueError):
        w.update(s)


def test_linear_and_weight_count_error():
    lin = Linear(["a", "b"], weights=[0.25, 0.75])
    r = torch.tensor([[1.0, float("nan")], [1.0, 1.0]])
    assert torch.allclose(lin.scalarize(r, torch.tensor([0, 0])), torch.tensor([0.25, 1.0]))
    from moalign.errors import UserError

    with pytest.raises(UserError, match="3 values but needs 2"):
        Linear(["a", "b"], weights=[0.2, 0.3, 0.5])
