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


def test_cov_w_keeps_every_completion_when_the_signal_splits_in_two_levels():
    """|w| = (0.01, 0.01, 1.5, 1.5): the ordinary median keeps all four (the lower median, 0.01, would drop group 1
    and leave Cov(r, w) to group 0 alone). w = A at ratio 1: group 0 cov 0.005, group 1 cov 0.75 → 0.3775."""
    r = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    adv = torch.tensor([0.01, -0.01, 1.5, -1.5])
    m = LawMonitor(["a"]).observe_step(stats(r, adv, adv))
    assert m["law/cov_w/a"] == pytest.approx((0.005 + 0.75) / 2, rel=1e-5)


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


def test_probe_realised_change_on_exact_theory_problem():
    """With a uniform policy every prompt group holding all K responses is the exact policy distribution, so the
    monitor's Cov(r_j, s) is E_x Cov_π(r_j, s); the probe's realised change under an exact tilt step of size η must
    then equal η·Cov to first order, in sign and size."""
    from moalign.theory.problem import random_problem
    from moalign.theory.updates import tilt

    problem = random_problem(prompts=3, responses=6, objectives=2, correlation=-0.5,
                             generator=torch.Generator().manual_seed(0))
    P, K, M = problem.rewards.shape
    probs = torch.full((P, K), 1.0 / K, dtype=torch.float64)
    signal = problem.rewards.sum(-1)  # linear scalarization with unit weights
    rewards = problem.rewards.reshape(P * K, M).float()
    s = signal.reshape(-1).float()
    groups = torch.arange(P).repeat_interleave(K)
    old = torch.zeros(P * K, 1)
    mon = LawMonitor(["r1", "r2"])
    stats_ = StepStats(0, rewards, groups, s, s, torch.ones(P * K, 1), old, old.clone())
    observed = mon.observe_step(stats_)
    eta = 1e-4
    before = problem.objective_values(probs)
    after = problem.objective_values(tilt(probs, signal, eta))
    out = mon.realise(before, after)
    for j, name in enumerate(["r1", "r2"]):
        assert out[f"law/realised/{name}"] / eta == pytest.approx(observed[f"law/cov_s/{name}"], rel=1e-3)
    assert out["law/sign_agreement"] == 1.0


def test_probe_change_and_its_standard_error_from_paired_completions():
    mon = LawMonitor(["a", "b"])
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mon.observe_step(stats(r, adv, adv))
    before = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [math.nan, 0.0]])
    after = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    out = mon.realise(before, after)
    # a: paired changes 0, 1, −1 (the fourth is missing): mean 0, sd 1, se 1/√3; b: 1, 0, 0, 0: mean 0.25, se 0.5/2
    assert out["law/realised/a"] == pytest.approx(0.0) and out["law/realised_se/a"] == pytest.approx(1 / math.sqrt(3))
    assert out["law/realised/b"] == pytest.approx(0.25) and out["law/realised_se/b"] == pytest.approx(0.25)
    assert out["law/probe_completions"] == 4


def test_the_engine_probe_draws_on_common_random_numbers_and_logs_its_noise(tmp_path):
    """Every probe measurement of a run samples completion k of probe prompt i with the same uniforms (the run's
    "probe" stream), so successive measurements are paired; the run logs the realised change's standard error."""
    from moalign.engine.evaluation import eval_uniforms
    from moalign.engine.metrics import read_metrics
    from moalign.engine.trainer import Trainer
    from test_engine import tiny_config

    cfg = tiny_config("diagnostics.probe_prompts=2", "diagnostics.probe_group_size=3", "seed=5")
    (tmp_path / "run").mkdir()
    trainer = Trainer(cfg, tmp_path / "run")
    draws = []
    generate = trainer.generate

    def spy(*args, **kwargs):
        if kwargs.get("uniforms") is not None:
            draws.append(kwargs["uniforms"])
        return generate(*args, **kwargs)

    trainer.generate = spy
    trainer.run()
    expected = eval_uniforms(5, "probe", 2, 3, cfg.rollout.max_new_tokens)
    assert len(draws) == 3 and all(torch.equal(d, expected) for d in draws)  # before step 1, after steps 1 and 2
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "law/realised_se/accuracy" in r]
    assert len(records) == 2 and all(r["law/probe_completions"] == 6 for r in records)
    assert all(r["law/realised_se/accuracy"] >= 0 for r in records)
