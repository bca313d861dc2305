"""Linear layers' weight gradients accumulated in place.

For y = x Wᵀ + b over the rows of x [N, in], the weight's gradient is

    ∂L/∂W = gᵀ x        (g = ∂L/∂y [N, out])

Autograd computes it as a fresh [out, in] tensor per use of the layer, sums the uses with an out-of-place add,
then adds the sum into ``W.grad``. In the update every layer is used twice per micro-batch (the shared prompts'
call and the rows' call, ``rollout.micro_batch_logprobs``) and four micro-batches accumulate: per weight, up to
eight fresh weight-sized tensors and their adds per step. On a CPU those adds read strided (transposed) operands
and fresh pages: ≈ 0.8 s of a 15 s SmolLM2 update under the profiler (docs/performance.md).

``LinearGradientsInPlace`` computes the same sum in ``W.grad`` itself:

    W.grad ← gᵀ x                 (the first use since ``zero_grad``)
    W.grad ← W.grad + gᵀ x        (every later use: one ``addmm_``, no temporary)

The input's gradient g W and the bias's (through autograd, as before) are unchanged. The backward returns no
gradient for the weight, so autograd never builds or adds one of its own.

It applies to plain ``nn.Linear`` layers on a CPU whose weight trains and has no gradient hooks (they would not
run), and only where the loss's gradient comes from ``backward``: ``torch.autograd.grad`` over the parameters would
not see the weights. Under autocast or without gradients a layer runs its plain forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class _LinearWeightGradInPlace(torch.autograd.Function):
    """x Wᵀ; the backward returns ∂L/∂x (and nothing for W) and adds gᵀ x into ``W.grad``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return nn.functional.linear(x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        parameter = ctx.layer.weight  # (weight is the parameter, saved for the version check)
        g, rows = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if parameter.grad is None:
            parameter.grad = g.t().mm(rows)
        else:
            parameter.grad.addmm_(g.t(), rows)
        grad_x = g.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return nn.functional.linear(x, layer.weight, layer.bias)
    # the weight is an input so that the output needs a backward even where x does not (a frozen trunk's output);
    # the backward returns no gradient for it and adds its own into .grad instead
    y = _LinearWeightGradInPlace.apply(x, layer.weight, layer)
    return y if layer.bias is None else y + layer.bias


def _applies(layer: nn.Module) -> bool:
    if type(layer) is not nn.Linear or "forward" in vars(layer):  # a subclass, or a forward patched already
        return False
    weight = layer.weight
    return (type(weight) is nn.Parameter and weight.requires_grad and weight.device.type == "cpu"
            and not weight._backward_hooks and not getattr(weight, "_post_accumulate_grad_hooks", None))


class LinearGradientsInPlace:
    """Context manager: within it, the weight gradients of ``model``'s applicable linear layers are accumulated in
    ``.grad`` in place by the backward (see the module docstring); the layers' own forward returns on exit."""

    def __init__(self, layers: list[nn.Linear]):
        self.layers = layers

    @classmethod
    def for_model(cls, model: nn.Module) -> LinearGradientsInPlace | None:
        """For ``model``'s applicable linear layers, or ``None`` where none applies."""
        layers = [m for m in model.modules() if _applies(m)]
        return cls(layers) if layers else None

    def __enter__(self) -> LinearGradientsInPlace:
        for layer in self.layers:
            layer.forward = _forward.__get__(layer)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            vars(layer).pop("forward", None)
