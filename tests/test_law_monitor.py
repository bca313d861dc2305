"""The live covariance-law monitor: hand-computed covariances, agreement bookkeeping and the early warning."""

import math

import pytest
import torch

from moalign.diagnostics.law import LawMonitor, pearson
from moalign.weighting import StepStats

G = torch.tensor([0, 0, 1, 1])


def stats(rewards, scores, advantages, new=None):
    B = rewards.shape[0]
    old = torch.zeros(B, 2)
    return StepStats(0, rewards, G, scores, advantages, torch.ones(B, 2), old, old.clone() if new is None else new)


def test_covariances_hand():
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    s = torch.tensor([2.0, 0.0, 1.0, 1.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    m = LawMonitor(["a", "b"]).observe_step(stats(r, s, adv))
    # Cov(r, s): a: group0 0.5, group1 0 -> 0.25 ; b: group0 -0.5, group1 0 -> -0.25
    assert m["law/cov_s/a"] == pytest.approx(0.25) and m["law/cov_s/b"] == pytest.approx(-0.25)
    # w = A (ratio 1): a: 0.5, 0.5 -> 0.5 ; b: -0.5, 0 -> -0.25
    assert m["law/cov_w/a"] == pytest.approx(0.5) and m["law/cov_w/b"] == pytest.approx(-0.25)
    assert m["law/unclipped_fraction"] == pytest.approx(1.0)
    assert m["law/negative_streak/b"] == 1 and m["law/negative_streak/a"] == 0


def test_agreement_and_warning():
    mon = LawMonitor(["a", "b"], warn_after=2)
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    for step in range(2):
        mon.observe_step(stats(r, adv, adv))
        out = mon.realise(torch.tensor([0.5, 0.5]), torch.tensor([0.6, 0.4 if step == 0 else 0.55]))
    # predictions: a > 0, b < 0 both steps; realised: a up twice, b down then up -> 3 of 4 agree
    assert out["law/sign_agreement"] == pytest.approx(0.75)
    assert mon.warnings() and "b" in mon.warnings()[0]
    assert mon.realise(torch.zeros(2), torch.ones(2)) == {}  # nothing pending


def test_batch_agreement_and_state_round_trip():
    mon = LawMonitor(["a", "b"])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    r1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # means (0.5, 0.5); predicts a up, b down
    r2 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # means (0.75, 0.25): both as predicted
    mon.observe_step(stats(r1, adv, adv))
    out = mon.observe_step(stats(r2, adv, adv))
    assert out["law/batch_sign_agreement"] == pytest.approx(1.0) and out["law/batch_num_pairs"] == 2
    clone = LawMonitor(["a", "b"])
    clone.load_state_dict(mon.state_dict())
    assert clone.summary() == pytest.approx(mon.summary(), nan_ok=True)


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 2], [1, 2]))
