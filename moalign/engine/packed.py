"""Pre-packed weights for the CPU linear layers of a model whose weights stay fixed for a while (a sampling phase).

``F.linear(x, W)`` on a CPU calls MKL's sgemm, which re-packs ``W`` into its blocked layout on every call. At the
small row counts of decoding (one row per live sequence) that packing is a large share of the call: on SmolLM2-135M
at 16 rows, a decode step's 211 matmuls take 66 ms plain and 40 ms with the weights packed once beforehand
(``cblas_sgemm_pack`` through ``torch.ops.mkl._mkl_reorder_linear_weight``; 112 → 87 ms at 64 rows). The result
is the same sgemm computed from the same packed panels: bit-identical to ``F.linear`` at 16 and 64 rows here, and
within float rounding at a handful of rows, where plain ``F.linear`` takes a matrix–vector path instead.

Inference only (the packed product has no autograd), CPU fp32 only, and only while the weights do not change:
``fast_generate`` packs at the start of each call (≈ 0.2 s for SmolLM2's 211 weights, 538 MB) and drops the copies
when it returns.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

# The batch-size hint given to MKL's packing; the packed panels serve any number of rows.
PACK_ROWS_HINT = 64


def packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _packable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass or a quantized/tensor-subclass weight) with a CPU fp32 weight."""
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return (type(weight) in (torch.Tensor, nn.Parameter) and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and weight.is_contiguous())


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, version: int,
                    x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or torch.is_grad_enabled() or weight._version != version:
        return nn.functional.linear(x, weight, bias)  # not what was packed for: the plain product
    features = x.shape[-1]
    rows = x.numel() // features
    out = torch.ops.mkl._mkl_linear(x.reshape(rows, features), packed, weight, bias, rows)
    return out.view(*x.shape[:-1], out.shape[-1])


@contextmanager
def packed_linear_weights(model: nn.Module):
    """Within the block, every CPU fp32 ``nn.Linear`` of ``model`` multiplies by a pre-packed copy of its weight
    (while gradients are disabled and the weight is unmodified since packing: an in-place update falls back to the
    plain product); the plain forward returns on exit. A no-op where MKL's packed GEMM is unavailable (non-CPU
    weights, half precision, other BLAS builds)."""
    patched = []
    if packing_available():
        with torch.no_grad():
            for module in model.modules():
                if _packable(module):
                    packed = torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), PACK_ROWS_HINT)
                    module.forward = partial(_packed_forward, module.weight, module.bias, packed,
                                             module.weight._version)
                    patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # the instance attribute; the class's forward is back
