"""Per-objective gradients on a chosen set of parameters: the first pass of a gradient-level weighting's update, in
the native engine (``Trainer._objective_weights``) and on TRL (``moalign.integrations.trl.gradient_pass``).

G = [g_1; …; g_M] ∈ R^{M×P} with g_j = ∇_θ L_j over the chosen parameters θ (flattened in their order, summed over
micro-batches). The other trainable parameters are frozen while the pass runs, so its forward keeps no graph that
only they need.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


def gradient_matrix(num_objectives: int, chosen: Sequence[nn.Parameter], device) -> torch.Tensor:
    """A zero G [M, P] (float32) for ``accumulate``."""
    return torch.zeros(num_objectives, sum(p.numel() for p in chosen), device=device)


@contextmanager
def only_chosen_require_grad(trainable: Sequence[nn.Parameter], chosen: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block, the ``trainable`` parameters that are not ``chosen`` do not require gradients."""
    chosen_ids = {id(p) for p in chosen}
    others = [p for p in trainable if id(p) not in chosen_ids]
    try:
        for p in others:
            p.requires_grad_(False)
        yield
    finally:
        for p in others:
            p.requires_grad_(True)


def accumulate(grads: torch.Tensor, losses: Sequence[torch.Tensor], chosen: Sequence[nn.Parameter]) -> None:
    """G[j] += ∇ losses[j] on ``chosen``, in place (no per-objective flat copies); the graph is freed after the
    last loss. A parameter a loss does not reach adds nothing."""
    for j, loss in enumerate(losses):
        parts = torch.autograd.grad(loss, chosen, retain_graph=j + 1 < len(losses), allow_unused=True)
        offset = 0
        for part, p in zip(parts, chosen):
            if part is not None:
                grads[j, offset:offset + p.numel()].add_(part.reshape(-1).to(grads.dtype))
            offset += p.numel()
