"""Estimators, clipped loss, KL estimators and aggregation against hand-computed values."""

import math

import pytest
import torch

from moalign.rl.estimators import dr_grpo, grpo, grpo_no_std, reinforce_pp, rloo
from moalign.rl.loss import aggregate, kl_penalty, policy_loss

G = torch.tensor([0, 0, 0, 1, 1, 2])
S = torch.tensor([1.0, 0.0, 2.0, 3.0, 5.0, 7.0])


def test_grpo_hand():
    # group 0: mean 1, unbiased std 1 -> (0, -1, 1)/(1+1e-6); group 1: mean 4, std sqrt(2); group 2 alone -> 0
    a = grpo(S, G)
    e = 1e-6
    assert torch.allclose(a, torch.tensor([0.0, -1 / (1 + e), 1 / (1 + e), -1 / (math.sqrt(2) + e),
                                           1 / (math.sqrt(2) + e), 0.0]), atol=1e-6)


def test_grpo_without_std_and_dr_grpo():
    expect = torch.tensor([0.0, -1.0, 1.0, -1.0, 1.0, 0.0])
    assert torch.allclose(grpo_no_std(S, G), expect)
    assert torch.allclose(dr_grpo(S, G), expect)


def test_grpo_zero_variance_group_gives_zero():
    a = grpo(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 0, 0]))
    assert torch.equal(a, torch.zeros(3))


def test_rloo_hand():
    # group 0: 1 - mean(0,2)=0, 0 - mean(1,2)=-1.5, 2 - mean(1,0)=1.5 ; group 1: 3-5=-2, 5-3=2 ; singleton 0
    assert torch.allclose(rloo(S, G), torch.tensor([0.0, -1.5, 1.5, -2.0, 2.0, 0.0]))


def test_reinforce_pp_token_whitening():
    scores = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    # tokens: 1,1,1,0 -> mean 0.75, unbiased var = (3*0.0625 + 0.5625)/3 = 0.25
    a = reinforce_pp(scores, torch.tensor([0, 1]), mask)
    assert torch.allclose(a, torch.tensor([0.25 / math.sqrt(0.25 + 1e-8), -0.75 / math.sqrt(0.25 + 1e-8)]))


def test_policy_loss_clip_and_dual_clip():
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    # ratios 0.5, 1.0, 1.5, 5.0
    new = torch.log(torch.tensor([[0.5, 1.0, 1.5, 5.0]]))
    pos = policy_loss(new, old, torch.tensor([2.0]), mask, 0.2, 0.2, dual_clip=3.0)
    # A>0: max(-A r, -A clip(r)) = -A*min(r, clip(r)) -> r=.5: max(-1, -1.6)=-1 ; 1: -2 ; 1.5: max(-3,-2.4)=-2.4 ; 5: -2.4
    assert torch.allclose(pos.per_token, torch.tensor([[-1.0, -2.0, -2.4, -2.4]]))
    assert pos.clipfrac.item() == pytest.approx(0.5)
    neg = policy_loss(new, old, torch.tensor([-1.0]), mask, 0.2, 0.2, dual_clip=3.0)
    # A<0: max(r, clip(r)): .5->.8, 1->1, 1.5->1.5, 5->5 then min(., 3) -> 3
    assert torch.allclose(neg.per_token, torch.tensor([[0.8, 1.0, 1.5, 3.0]]))
    assert neg.clipfrac.item() == pytest.approx(0.25)
    assert neg.clipfrac_lower.item() == pytest.approx(0.25)
    no_dual = policy_loss(new, old, torch.tensor([-1.0]), mask, 0.2, 0.2, dual_clip=None)
    assert no_dual.per_token[0, 3].item() == pytest.approx(5.0)


def test_policy_loss_asymmetric_eps():
    new = torch.log(torch.tensor([[0.7, 1.3]]))
    out = policy_loss(new, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2), eps_low=0.1, eps_high=0.5)
    assert torch.allclose(out.per_token, torch.tensor([[0.9, 1.3]]))


def test_policy_loss_gradient_is_minus_advantage_on_policy():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = policy_loss(lp, lp.detach(), torch.tensor([3.0]), torch.ones(1, 2))
    out.per_token.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[-3.0, -3.0]]))


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.125)
    d = -0.5
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(math.exp(d) - d - 1)
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([50.0]), "k3").item() == pytest.approx(10.0)
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k9")


def test_k3_is_unbiased_kl_estimate():
    torch.manual_seed(0)
    p = torch.softmax(0.5 * torch.randn(5, dtype=torch.float64), 0)  # mild: stay inside the ±10 clamp
    q = torch.softmax(0.5 * torch.randn(5, dtype=torch.float64), 0)
    exact = (p * (p / q).log()).sum()
    expected_k3 = (p * kl_penalty(p.log(), q.log(), "k3")).sum()
    assert expected_k3.item() == pytest.approx(exact.item(), rel=1e-5)


def test_aggregation_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=5).item() == pytest.approx(10 / (2 * 5))
    # micro-batch denominators: two halves sum to the whole
    halves = aggregate(loss[:1], mask[:1], "token-mean", num_tokens=4) + aggregate(loss[1:], mask[1:], "token-mean",
                                                                                  num_tokens=4)
    assert halves.item() == pytest.approx(10 / 4)
    with pytest.raises(ValueError):
        aggregate(loss, mask, "nope")
