"""Pre-packed weights for the CPU linear layers of a model whose weights stay fixed for a while (a sampling phase).

``F.linear(x, W)`` on a CPU re-packs ``W`` into the GEMM library's blocked layout on every call. At the small row
counts of decoding (one row per live sequence) that packing is a large share of the call, so ``fast_generate``
packs every weight once per call and multiplies by the packed copy until it returns:

* **fp32** (MKL's sgemm, ``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``): SmolLM2-135M's 211
  decode-step products take 54 → 42 ms at 16 rows, 92 → 73 ms at 64 (``bench/precision.py``). Bit-identical to
  ``F.linear`` at 16 and 64 rows here, within float rounding at a handful of rows, where plain ``F.linear`` takes a
  matrix–vector path instead.
* **bf16** (the bf16 weights of ``precision=bf16-mixed`` and ``bf16-pure``; oneDNN, AMX where the CPU has it,
  ``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``): the same 211 products take 26 → 19 ms at
  16 rows, 34 → 24 ms at 64. Bit-identical to ``F.linear`` at every row count measured (1–512).

Inference only (the packed product has no autograd), CPU only, and only while the weights do not change: a
weight modified in place since packing (its version counter) takes the plain product, and so does a call under
autocast (whose product is in another dtype than the packed one). Packing costs ≈ 0.2 s for
SmolLM2 and one more copy of the linear weights (538 MB in fp32, 269 MB in bf16) for the duration of the call.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

# The batch-size hint given to the packing; the packed panels serve any number of rows (for oneDNN's bf16 packing,
# a hint of 16 or more gives F.linear's bits at every row count; a hint of 1 does not above 32 rows).
PACK_ROWS_HINT = 64


def packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def bf16_packing_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _plain_cpu_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass or a quantized/tensor-subclass weight) with a contiguous CPU weight."""
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.device.type == "cpu" and weight.is_contiguous()


def _mkl_forward(weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, version: int,
                 x: torch.Tensor) -> torch.Tensor:
    if (x.dtype != torch.float32 or torch.is_grad_enabled() or weight._version != version
            or torch.is_autocast_enabled("cpu")):
        return nn.functional.linear(x, weight, bias)  # not what was packed for: the plain product
    features = x.shape[-1]
    rows = x.numel() // features
    out = torch.ops.mkl._mkl_linear(x.reshape(rows, features), packed, weight, bias, rows)
    return out.view(*x.shape[:-1], out.shape[-1])


def _onednn_bf16_forward(weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, version: int,
                         x: torch.Tensor) -> torch.Tensor:
    if (x.dtype != torch.bfloat16 or torch.is_grad_enabled() or weight._version != version
            or torch.is_autocast_enabled("cpu")):
        return nn.functional.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack(module: nn.Linear):
    """The packed forward for ``module``, or ``None`` where its weight is not one this packing serves."""
    weight, bias = module.weight, module.bias
    if weight.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16) and bf16_packing_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
        return partial(_onednn_bf16_forward, weight, bias, packed, weight._version)
    if weight.dtype == torch.float32 and packing_available():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
        return partial(_mkl_forward, weight, bias, packed, weight._version)
    return None


@contextmanager
def packed_linear_weights(model: nn.Module):
    """Within the block, every plain CPU ``nn.Linear`` of ``model`` with fp32 or bf16 weights multiplies by a
    pre-packed copy of its weight (while gradients are disabled, outside autocast, and the weight is unmodified since
    packing: an in-place update falls back to the plain product); the plain forward returns on exit. Yields the
    number of layers packed (0 where the build has neither library)."""
    patched = []
    with torch.no_grad():
        for module in model.modules():
            if _plain_cpu_linear(module):
                forward = _pack(module)
                if forward is not None:
                    module.forward = forward
                    patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # the instance attribute; the class's forward is back
