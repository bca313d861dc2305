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

The input's gradient g W and the bias's Σ g are returned as autograd expects them. The backward returns no gradient
for the weight, so autograd never builds or adds one of its own.

Under bf16 autocast (``precision=bf16-mixed``) the layer computes what autocast computes — x and W cast to bf16,
the product in bf16 — but multiplies by a bf16 copy of W made once per weight version (the first use after each
optimizer step) instead of casting W on every call, and adds gᵀx (a bf16 product, as autocast's backward computes
it) into the fp32 ``W.grad`` in place instead of building and adding an fp32 copy of it per use: the same outputs
bit for bit, the same gradients up to the order of the additions. On the default job's update that is
6.53 → 5.22 s (``bench/precision.py``).

It applies to plain ``nn.Linear`` layers on a CPU whose weight trains and has no gradient hooks (they would not
run), and only where the loss's gradient comes from ``backward``: ``torch.autograd.grad`` over the parameters would
not see the weights. Without gradients a layer runs its plain forward.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class _LinearWeightGradInPlace(torch.autograd.Function):
    """x Wᵀ + b, with x and b cast to the dtype of ``compute_weight`` (W itself, or its bf16 copy under autocast);
    the backward returns ∂L/∂x and ∂L/∂b (nothing for W) and adds gᵀ x into ``W.grad``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: nn.Linear,
                compute_weight: torch.Tensor) -> torch.Tensor:
        dtype = compute_weight.dtype
        x_c = x.to(dtype)
        ctx.save_for_backward(x_c, compute_weight)
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return nn.functional.linear(x_c, compute_weight, None if bias is None else bias.to(dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        parameter = ctx.layer.weight
        g, rows = grad_out.to(weight.dtype).reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if parameter.grad is None:
            parameter.grad = g.t().mm(rows).to(parameter.dtype)
        elif parameter.dtype == weight.dtype:
            parameter.grad.addmm_(g.t(), rows)
        else:  # the bf16 product, added into the fp32 gradient
            parameter.grad.add_(g.t().mm(rows))
        grad_x = g.mm(weight).view(x.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None, None


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
        self._copies: dict[nn.Linear, tuple[int, torch.Tensor]] = {}  # under autocast: (weight version, copy)

    @classmethod
    def for_model(cls, model: nn.Module) -> LinearGradientsInPlace | None:
        """For ``model``'s applicable linear layers, or ``None`` where none applies."""
        layers = [m for m in model.modules() if _applies(m)]
        return cls(layers) if layers else None

    def _compute_weight(self, layer: nn.Linear) -> torch.Tensor:
        """The weight as the product uses it: under autocast a copy in its dtype, made again when the weight has
        changed since (its version counter), else the weight itself."""
        weight = layer.weight
        if not torch.is_autocast_enabled(weight.device.type):
            return weight.detach()
        dtype = torch.get_autocast_dtype(weight.device.type)
        version, copy = self._copies.get(layer, (None, None))
        if version != weight._version or copy.dtype != dtype:
            copy = weight.detach().to(dtype)
            self._copies[layer] = (weight._version, copy)
        return copy

    def _forward(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return nn.functional.linear(x, layer.weight, layer.bias)
        # the weight is an input so that the output needs a backward even where x does not (a frozen trunk's
        # output); the backward returns no gradient for it and adds its own into .grad instead
        return _LinearWeightGradInPlace.apply(x, layer.weight, layer.bias, layer, self._compute_weight(layer))

    def __enter__(self) -> LinearGradientsInPlace:
        for layer in self.layers:
            layer.forward = partial(self._forward, layer)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            vars(layer).pop("forward", None)
        self._copies.clear()
