"""FAMO: fast adaptive multitask optimization (advantage-level; also usable on gradients)."""

from __future__ import annotations

import torch
from pydantic import Field

from moalign.weighting._solvers import StatefulWeighting, reward_deficits
from moalign.weighting.base import (
    WEIGHTINGS,
    Estimator,
    StepStats,
    WeightingParams,
    per_objective_advantages,
)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@WEIGHTINGS.register("famo")
class FAMO(StatefulWeighting):
    """FAMO (Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization", arXiv 2306.03792).

    FAMO descends Σ_j z_j log d_j with z = softmax(ξ): the update is Σ_j (c z_j / d_j) ∇d_j with
    c = 1 / Σ_j (z_j / d_j), so objectives are balanced by their *relative* (log) decrease. In RL the "loss" is the
    reward deficit d_j = max(r* − mean r_j, 0) + offset (``_solvers.reward_deficits``; ∇d_j = −∇J_j), so

        w_j = c z_j / d_j        (Σ_j w_j = 1),     A_b = Σ_j w_j A_bj     (per-objective advantages)

    and after the policy step (``update``) the logits follow the log-improvement of each deficit,

        δ_j = log d_j(previous update) − log d_j(this update)
        ξ ← Adam_step(ξ, ∇_ξ (zᵀδ) + γ ξ) = Adam_step(ξ, z ⊙ (δ − zᵀδ) + γ ξ)

    which moves weight toward the objectives that improved least. w_lr = 0.025 and γ = 1e-5 (weight decay) as
    in the official code (Adam with β = (0.9, 0.999), ε = 1e-8, written out so its state round-trips exactly).

    Choices, stated:
    * Positive losses. RL surrogate losses are near 0 with a random sign, so log d would be undefined; the
      deficit with ``deficit_offset`` = 0.1 is ≥ 0.1 (this also bounds 1/d_j, so a nearly satisfied objective
      weighs at most (1 + 0.1)/0.1 = 11× a fully failing one before z). r* = ``ideal_reward`` (1.0), the best reward.
    * Improvement between consecutive ``update`` calls, i.e. on consecutive batches. The official code measures
      it on the same mini-batch before and after the step, at the price of one extra no-grad forward per
      mini-batch; the consecutive-batch version is free and uses the same signal, with sampling noise.
    * Family. FAMO's weights depend on the rewards only, never on the per-objective gradients, so it runs as an
      advantage-level method (no extra backward pass, which is FAMO's point). ``combine`` is provided too and
      gives Σ_j w_j g_j with the same weights, for running it on a parameter subset.
    An objective with no observed reward in the batch gets the mean of the other deficits (and δ_j = 0).
    """

    name = "famo"
    family = "advantage"
    description = "weights z_j/d_j on reward deficits, logits follow the log-improvement of each deficit"
    cost = "none (weights from batch-mean rewards; no per-objective gradients, no extra forward)"
    state_fields = ("_weights", "logits", "adam_mean", "adam_var", "adam_steps", "previous_log_deficits")

    class Params(WeightingParams):
        w_lr: float = Field(0.025, gt=0, description="Adam learning rate of the logits ξ")
        gamma: float = Field(1e-5, ge=0, description="γ, weight decay on ξ")
        ideal_reward: float = Field(1.0, description="best reward value; the deficit is ideal − mean reward")
        deficit_offset: float = Field(0.1, gt=0, description="added to the deficit so its log is defined")

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        m = self.num_objectives
        self.logits = torch.zeros(m, dtype=torch.float64)
        self.adam_mean = torch.zeros(m, dtype=torch.float64)
        self.adam_var = torch.zeros(m, dtype=torch.float64)
        self.adam_steps = 0
        self.previous_log_deficits = torch.full((m,), float("nan"), dtype=torch.float64)  # NaN = unseen
        self._weights = torch.full((m,), 1.0 / m, dtype=torch.float64)

    @property
    def weights(self) -> torch.Tensor:
        """w = c z / d of the last ``advantages`` / ``combine`` call (uniform before the first)."""
        return self._weights

    def _deficits(self, rewards: torch.Tensor) -> torch.Tensor:
        self._check_rewards(rewards)
        deficits = reward_deficits(rewards, self.params.ideal_reward, self.params.deficit_offset)
        fill = deficits.nanmean() if bool((~deficits.isnan()).any()) else torch.tensor(1.0, dtype=torch.float64)
        return torch.nan_to_num(deficits, nan=float(fill))

    def _refresh_weights(self, rewards: torch.Tensor) -> torch.Tensor:
        ratio = torch.softmax(self.logits, dim=0) / self._deficits(rewards)
        self._weights = self._finite(ratio / ratio.sum(), self._weights)
        return self._weights

    def advantages(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, estimator: Estimator, response_mask: torch.Tensor
    ) -> torch.Tensor:
        weights = self._refresh_weights(rewards)
        per_objective = per_objective_advantages(rewards, group_ids, estimator, response_mask)
        return self._weighted_advantages(per_objective, weights)

    def combine(self, grads: torch.Tensor, stats: StepStats) -> torch.Tensor:
        grads = self._checked_gradients(grads)
        weights = self._refresh_weights(stats.rewards)
        direction = weights.to(device=grads.device, dtype=grads.dtype) @ grads
        return self._finite(direction, torch.zeros_like(direction))

    def update(self, stats: StepStats) -> dict[str, float]:
        log_deficits = self._deficits(stats.rewards).log()
        observed = ~stats.rewards.isnan().all(dim=0)
        comparable = observed & ~self.previous_log_deficits.isnan()
        improvement = torch.where(comparable, self.previous_log_deficits - log_deficits, torch.zeros_like(log_deficits))
        if bool(comparable.any()):
            self._adam_step(improvement)
        self.previous_log_deficits = torch.where(observed, log_deficits, self.previous_log_deficits)
        z = torch.softmax(self.logits, dim=0)
        return {**self.metrics(), **self._per_objective(z, "famo_z"), **self._per_objective(improvement, "famo_delta")}

    def _adam_step(self, improvement: torch.Tensor) -> None:
        """ξ ← Adam(ξ, g) with g = ∇_ξ (softmax(ξ)ᵀδ) + γξ (torch.optim.Adam's L2 weight decay)."""
        z = torch.softmax(self.logits, dim=0)
        grad = z * (improvement - z @ improvement) + self.params.gamma * self.logits
        beta1, beta2 = ADAM_BETAS
        self.adam_steps += 1
        self.adam_mean = beta1 * self.adam_mean + (1 - beta1) * grad
        self.adam_var = beta2 * self.adam_var + (1 - beta2) * grad * grad
        mean_hat = self.adam_mean / (1 - beta1**self.adam_steps)
        var_hat = self.adam_var / (1 - beta2**self.adam_steps)
        stepped = self.logits - self.params.w_lr * mean_hat / (var_hat.sqrt() + ADAM_EPS)
        self.logits = self._finite(stepped, self.logits)

