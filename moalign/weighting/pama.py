"""PAMA: Pareto multi-objective alignment with a closed-form min-norm weighting (advantage-level)."""

from __future__ import annotations

import torch
from pydantic import Field

from moalign.weighting._solvers import StatefulWeighting
from moalign.weighting.base import (
    WEIGHTINGS,
    Estimator,
    WeightingParams,
    per_objective_advantages,
)


def scalar_min_norm_weights(signals: torch.Tensor) -> torch.Tensor:
    """α* ∈ argmin_{α ∈ simplex} (Σ_j α_j a_j)²: MGDA's min-norm problem when gradient j is a_j times a common
    vector. The convex hull of the a_j is [min a, max a]; its min-norm point is s* = the projection of 0 onto it:

        min a > 0        → s* = min a: all weight on the smallest signal (split evenly among ties)
        max a < 0        → s* = max a: all weight on the largest signal (ties split)
        min a ≤ 0 ≤ max a → s* = 0: α_min = max a / (max a − min a), α_max = −min a / (max a − min a)
                            (uniform if every signal is 0)
    """
    low, high = float(signals.min()), float(signals.max())
    at_low = (signals == low).double()
    at_high = (signals == high).double()
    if low > 0:
        return at_low / at_low.sum()
    if high < 0:
        return at_high / at_high.sum()
    if high == low:  # every signal is 0
        return torch.full_like(at_low, 1.0 / at_low.numel())
    return (high * at_low / at_low.sum() - low * at_high / at_high.sum()) / (high - low)


@WEIGHTINGS.register("pama")
class PAMA(StatefulWeighting):
    """PAMA (He & Maghsudi 2025, "Pareto Multi-Objective Alignment for Language Models", arXiv 2508.07768).

    Reading used here (the paper is not available offline; this follows METHOD §4 and the paper's abstract:
    "Noon PPO" plus a convex problem with an O(n) closed-form solution converging to a Pareto-stationary point):

        A_bj  = the estimator applied to objective j alone
        Noon PPO: A⁺_bj = max(A_bj, 0)                              (``clip_negative``, on by default)
        a_j   = token-mean of A⁺_j over the batch = Σ_b L_b A⁺_bj / Σ_b L_b     (L_b: response length)
        α     = argmin_{α ∈ simplex} (Σ_j α_j a_j)²                 (closed form, ``scalar_min_norm_weights``)
        A_b   = Σ_j α_j A⁺_bj                                       (per-sample credit)

    The policy gradient of objective j is E[Σ_t A⁺_bj ∇log π]; replacing it by a_j times the common direction
    ∇ token-mean log π turns MGDA's min-norm problem over the M gradients (O(M²·P)) into a one-dimensional one
    over the scalars a_j, solved in O(M): s* = projection of 0 onto [min a, max a], and α are the convex weights
    that produce s*. Under Noon clipping every a_j ≥ 0, so α puts all weight on the objective with the weakest
    positive signal, and an objective with no positive advantage in the whole batch (a_j = 0) makes the step
    Pareto-stationary (A = 0).

    Departures from the public code: it uses s* itself as the advantage of every sampled token, which pushes all
    sampled tokens up by the same amount and drops which completion earned the reward (no per-sample credit).
    Here s* only decides the weights α, and each completion keeps its own advantages A⁺_bj — the objective the
    surrogate was derived for; its token-mean is exactly s* = Σ_j α_j a_j. And the authors' Noon-PPO loss,
    −s*·min(r, clip(r, 1−ε, 1+ε)) with r = π_θ/π_ref, takes its ratio against the *reference* model, so a token
    whose probability has risen above (1+ε)·π_ref gets no gradient (at the start of a step, the indicator
    π_old/π_ref ≤ 1+ε). Here the advantages go through the engine's ordinary clipped surrogate against π_old and
    the KL term, like every other weighting: that indicator is dropped.
    """

    name = "pama"
    family = "advantage"
    description = "Noon-PPO (A ≥ 0) per-objective advantages, weights = closed-form min-norm of their token means"
    cost = "M advantage computations (no extra forward or backward pass)"
    state_fields = ("_weights",)

    class Params(WeightingParams):
        clip_negative: bool = Field(True, description="Noon PPO: drop negative advantages, A⁺ = max(A, 0)")

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        self._weights = torch.full((self.num_objectives,), 1.0 / self.num_objectives, dtype=torch.float64)

    @property
    def weights(self) -> torch.Tensor:
        """α of the last ``advantages`` call (uniform before the first)."""
        return self._weights

    def advantages(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, estimator: Estimator, response_mask: torch.Tensor
    ) -> torch.Tensor:
        self._check_rewards(rewards)
        per_objective = per_objective_advantages(rewards, group_ids, estimator, response_mask)
        if self.params.clip_negative:
            per_objective = per_objective.clamp(min=0.0)
        lengths = response_mask.double().sum(dim=-1).to(per_objective.device)
        signals = ((lengths @ per_objective.double()) / lengths.sum().clamp(min=1.0)).cpu()
        signals = self._finite(signals, torch.zeros_like(signals))
        self._weights = scalar_min_norm_weights(signals)
        self._diagnostics = self._per_objective(signals, "pama_signal")
        return self._weighted_advantages(per_objective, self._weights)
