"""How a run computes (``precision``), and what keeps an update from rounding away.

* ``fp32``: weights, optimizer state and every computation in float32.
* ``bf16-mixed``: the weights and AdamW's state stay float32 — the master copy the optimizer updates — and every
  forward and backward (the sampler's decode steps, the frozen trunk, the reference, update and post-update passes,
  evaluation) runs under ``torch.autocast(device, torch.bfloat16)``: matmuls and attention in bf16 (AMX on recent
  Xeons, tensor cores on GPUs), the residual stream, norms, log-probs and gradient accumulation in fp32.
* ``bf16-pure``: the weights themselves in bf16. AdamW adds its step Δ to a bf16 weight w, and the sum rounds
  back to w unless |Δ| exceeds half bf16's spacing at w,

      ½ · ulp_bf16(w) = 2^(e − 9)      for 2^(e − 1) ≤ |w| < 2^e      (≈ |w| / 512 … |w| / 256)

  so at |w| = 0.02 an update needs |Δ| ≳ 6e-5: at the learning rates RL fine-tuning uses (1e-6 … 1e-5, Adam's
  |Δ| ≈ lr) almost no weight moves. ``warn_if_updates_round_away`` says so when it happens.

bf16 copies of weights that do not change (``hold_linears_in_bf16``: the frozen reference model) give the same bits
under autocast as their fp32 originals, since autocast casts a linear layer's weight to bf16 for every call; held
as bf16 they cost half the memory and no cast per call.
"""

from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from typing import Callable, Iterable, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")
PRECISIONS = ("fp32", "bf16-mixed", "bf16-pure")
# warn when a step of size lr rounds away on more than this fraction of the trainable weights
ROUNDING_AWAY_WARNING = 0.5


def compute_context(precision: str, device: torch.device | str):
    """The context a forward (and its backward) runs in: bf16 autocast on ``device``'s type for ``bf16-mixed``
    (CPU or CUDA alike), nothing for ``fp32`` and ``bf16-pure`` (whose weights already set the dtype)."""
    if precision == "bf16-mixed":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def in_context(context: Callable[[], object], fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run inside ``context()`` (a sampler run in the run's precision, e.g.)."""
    @functools.wraps(fn)
    def run(*args, **kwargs) -> T:
        with context():
            return fn(*args, **kwargs)
    return run


@torch.no_grad()
def hold_linears_in_bf16(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear``'s weight and bias of a model that never trains by a bf16 copy (a tied output
    head gets its own copy; the embedding it was tied to stays as it is). Under bf16 autocast the outputs are the
    same bits as with the originals."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(torch.bfloat16), requires_grad=False)
    return model


@torch.no_grad()
def fraction_rounding_away(params: Iterable[torch.Tensor], step: float) -> float:
    """The fraction of the elements w of ``params`` to which adding ±``step`` in their own dtype gives w back:
    |step| ≤ half the dtype's spacing at w, eps · 2^(e − 2) for w = m · 2^e, ½ ≤ |m| < 1 (0 for fp32 weights
    of ordinary size: fp32's half spacing at |w| = 1 is 6e-8)."""
    total = stuck = 0
    for p in params:
        if not p.is_floating_point():
            continue
        _, exponent = torch.frexp(p.detach().float())
        half_spacing = torch.finfo(p.dtype).eps * torch.pow(2.0, (exponent - 2).float())
        stuck += int(((half_spacing >= abs(step)) & (p != 0)).sum())
        total += p.numel()
    return stuck / max(total, 1)


def warn_if_updates_round_away(params: Iterable[torch.Tensor], lr: float, precision: str) -> float | None:
    """For ``bf16-pure``: the fraction of trainable weights an optimizer step of size ``lr`` cannot change, with a
    warning when that is most of them; ``None`` for the precisions that keep fp32 weights."""
    if precision != "bf16-pure":
        return None
    fraction = fraction_rounding_away(params, lr)
    if fraction > ROUNDING_AWAY_WARNING:
        log.warning("precision=bf16-pure with optim.lr=%g: a step of that size rounds away on %.0f%% of the "
                    "trainable weights (bf16 keeps 8 significant bits), so they barely train; use "
                    "precision=bf16-mixed (fp32 master weights, bf16 compute)", lr, 100 * fraction)
    return fraction
