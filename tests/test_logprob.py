"""The token log-prob function of the log-prob passes: values and gradients against autograd's own graph."""

import torch

from moalign.engine.rollout import TokenLogProb


def reference(logits, targets):
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def test_gradcheck_float64():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda z: TokenLogProb.apply(z, targets), (logits,))


def test_values_and_gradients_match_autograd():
    torch.manual_seed(1)
    logits = torch.randn(4, 9, 50) * 5
    logits[..., 3] = -torch.inf  # a token masked out of the vocabulary
    targets = torch.randint(4, 50, (4, 9))
    weights = torch.randn(4, 9)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    out_a, out_b = TokenLogProb.apply(a, targets), reference(b, targets)
    assert torch.equal(out_a, out_b)
    (out_a * weights).sum().backward()
    (out_b * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert torch.all(a.grad[..., 3] == 0)
    # by hand at one position: g · (1[v = y] − softmax(z)_v)
    p = torch.softmax(logits[1, 2], -1)
    expected = -weights[1, 2] * p
    expected[targets[1, 2]] += weights[1, 2]
    torch.testing.assert_close(a.grad[1, 2], expected, rtol=1e-6, atol=1e-7)


def test_repeated_backward_leaves_the_graph_intact():
    """Gradient-level weightings differentiate the same log-probs once per objective (retain_graph)."""
    torch.manual_seed(2)
    logits = torch.randn(5, 11, requires_grad=True)
    out = TokenLogProb.apply(logits * 1.0, torch.randint(0, 11, (5,)))
    first = torch.autograd.grad(out.sum(), logits, retain_graph=True)[0]
    second = torch.autograd.grad(out.sum(), logits)[0]
    assert torch.equal(first, second)
