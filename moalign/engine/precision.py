"""How a run computes (``precision``), and what keeps an update from rounding away.

* ``fp32``: weights, optimizer state and every computation in float32.
* ``bf16-mixed``: the model the engine runs — sampler, frozen trunk, reference, update, post-update pass,
  evaluation — is held in bf16 (``MasterWeights``), so every matmul and attention runs in bf16 (AMX on recent
  Xeons, tensor cores on GPUs); the optimizer updates fp32 master copies of the weights, with fp32 gradients and
  fp32 AdamW state, and the bf16 working copies are refreshed from them after every optimizer step.
* ``bf16-pure``: the same bf16 computation, but the optimizer updates the bf16 weights themselves. AdamW adds its
  step Δ to a bf16 weight w, and the sum rounds back to w unless |Δ| exceeds half bf16's spacing at w,

      ½ · ulp_bf16(w) = 2^(e − 9)      for 2^(e − 1) ≤ |w| < 2^e      (≈ |w| / 512 … |w| / 256)

  so at |w| = 0.02 an update needs |Δ| ≳ 6e-5: at the learning rates RL fine-tuning uses (1e-6 … 1e-5, Adam's
  |Δ| ≈ lr) almost no weight moves. ``warn_if_updates_round_away`` says so when it happens. In bf16-mixed the same
  steps accumulate in the fp32 masters and reach the bf16 copies once they add up to half a spacing.

Working copies rather than autocast over fp32 weights: on this project's CPU the update's forward and backward
took 6.15 s with a bf16 copy against 7.27 s under autocast (whose fp32 residual stream and norms cost a cast at
every linear layer's input and gradient), the sampler 334 against 117 tokens/s (autocast re-casts every weight at
every decode step under ``torch.inference_mode``); the copy's log-probs are ≈ 1.2× further from fp32's
(``bench/precision.py``, docs/performance.md).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

# warn when a step of size lr rounds away on more than this fraction of the trainable weights
ROUNDING_AWAY_WARNING = 0.5


class MasterWeights:
    """fp32 master copies of every parameter of ``model``, which is cast to bf16 in place (the working copy the
    engine computes with). The optimizer updates ``trainable``; per micro-batch ``add_gradients`` moves the working
    copy's bf16 gradients into the masters' fp32 ``.grad`` (so they accumulate in fp32), and after each optimizer
    step ``refresh_working_copy`` rounds the masters into the working copy. Frozen parameters keep a master too: a
    checkpoint and the exported model hold the fp32 weights, not their bf16 roundings."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.masters = {name: p.detach().clone().float().requires_grad_(p.requires_grad)
                        for name, p in model.named_parameters()}
        model.to(torch.bfloat16)
        self.pairs = [(p, self.masters[name]) for name, p in model.named_parameters() if p.requires_grad]

    @property
    def trainable(self) -> list[torch.Tensor]:
        """The tensors the optimizer updates, in the model's parameter order."""
        return [master for _, master in self.pairs]

    @torch.no_grad()
    def add_gradients(self) -> None:
        for working, master in self.pairs:
            if working.grad is not None:
                if master.grad is None:
                    master.grad = working.grad.float()
                else:
                    master.grad.add_(working.grad)
                working.grad = None

    @torch.no_grad()
    def refresh_working_copy(self) -> None:
        for working, master in self.pairs:
            working.copy_(master)

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Set masters (and their working copies) from fp32 tensors by parameter name (a checkpoint's)."""
        working = dict(self.model.named_parameters())
        for name, value in state.items():
            self.masters[name].copy_(value)
            working[name].copy_(value)

    @torch.no_grad()
    def restore_fp32(self) -> nn.Module:
        """The model back in fp32 with the master weights (for the export at the end of a run)."""
        self.model.float()
        for name, p in self.model.named_parameters():
            p.copy_(self.masters[name])
        return self.model


@torch.no_grad()
def fraction_rounding_away(params: Iterable[torch.Tensor], step: float) -> float:
    """The fraction of the nonzero elements w of ``params`` to which adding ±``step`` in their own dtype gives w
    back: |step| ≤ half the dtype's spacing at w, eps · 2^(e − 2) for w = m · 2^e with ½ ≤ |m| < 1."""
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
