"""The gradient-level first pass's helpers: G's rows against hand-computed gradients, and the freeze undone."""

import pytest
import torch

from moalign.engine import objective_gradients


def test_rows_are_each_losss_gradient_on_the_chosen_parameters_summed_over_calls():
    a, b, unused = (torch.nn.Parameter(torch.tensor(v)) for v in ([1.0, 2.0], [[3.0]], [5.0]))
    chosen = [a, b, unused]
    grads = objective_gradients.gradient_matrix(2, chosen, "cpu")
    assert grads.shape == (2, 4)
    for scale in (1.0, 2.0):  # two micro-batches
        x = scale * (a * a).sum() + b.sum()  # ∇a = 2·scale·a, ∇b = 1
        y = a[0] * b[0, 0]  # ∇a = (b, 0), ∇b = a[0]
        objective_gradients.accumulate(grads, [x, y], chosen)
    expected = torch.tensor([[2 * 3 * 1.0, 2 * 3 * 2.0, 2.0, 0.0],  # Σ scale = 3; `unused` adds nothing
                             [2 * 3.0, 0.0, 2 * 1.0, 0.0]])
    assert torch.equal(grads, expected)


def test_only_the_chosen_require_grad_inside_and_all_again_after_an_error():
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(3)]
    with pytest.raises(RuntimeError):
        with objective_gradients.only_chosen_require_grad(params, params[1:2]):
            assert [p.requires_grad for p in params] == [False, True, False]
            raise RuntimeError("boom")
    assert all(p.requires_grad for p in params)
