"""GradNorm: adaptive weights that balance gradient norms by training progress (gradient-level)."""

from __future__ import annotations

import torch
from pydantic import Field

from moalign.weighting._solvers import GradientWeighting, reward_deficits
from moalign.weighting.base import WEIGHTINGS, StepStats, WeightingParams


@WEIGHTINGS.register("gradnorm")
class GradNorm(GradientWeighting):
    """GradNorm (Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing"):

        d = Σ_j w_j g_j                                          (``combine``, weights fixed within a step)
        then, in ``update`` after the policy step:
        L_j(t) = d_j = max(r* − mean r_j, 0) + offset             reward deficit (``_solvers.reward_deficits``)
        L̃_j = L_j(t) / L_j(0),   r_j = L̃_j / mean_k L̃_k             relative inverse training rate
        G_j = w_j ‖g_j‖,   Ḡ = mean_j G_j,   target_j = Ḡ · r_j^α
        w_j ← w_j − lr · sign(G_j − target_j) · ‖g_j‖ / Ḡ          (gradient of Σ_j |G_j − target_j| / Ḡ)
        w ← max(w, w_min);   w ← M · w / Σ w                       (renormalized to sum M)

    An objective whose deficit shrinks more slowly than the others' (r_j > 1) gets a larger target norm and so
    a larger weight. ‖g_j‖ is averaged over the ``combine`` calls since the previous ``update``; L_j(0) is the
    first observed deficit of objective j. α = 1.5 and lr = 0.025 (authors' defaults).

    Departures from the public code, and why:
    * Losses. It uses the raw RL surrogate losses, which are near 0 with a random sign; their ratios blow up and
      the weights became NaN, silently freezing training. Progress is measured on reward deficits instead, which
      are ≥ offset > 0 (offset 0.1: with {0,1} rewards it bounds every ratio, and batch-mean differences below
      ~0.1 are sampling noise anyway); r* = ``ideal_reward`` (1.0) is the best reward value.
    * Step scale. The L1 objective is divided by Ḡ (held fixed, like the targets), so the weight step is
      invariant to the gradient scale; with raw norms, lr · ‖g_j‖ is arbitrary for LM gradients whose norm
      varies by orders of magnitude, and one step can flip the sign of a weight. Weights are floored at ``w_min``.
    * Solving on one data-parallel shard's slice of the gradient does not arise: the norms are of the full
      gradients the engine passes in.
    """

    name = "gradnorm"
    description = "weights move so w_j‖g_j‖ tracks the mean norm × (relative reward-deficit progress)^α"
    cost = "one extra forward and M backward passes on the chosen parameters (weighting.gradient_params)"
    state_fields = ("_weights", "initial_deficits", "grad_norm_sum", "num_combines")

    class Params(WeightingParams):
        alpha: float = Field(1.5, ge=0, description="α, strength of the pull toward balanced training rates")
        lr: float = Field(0.025, gt=0, description="step size of the weight update")
        ideal_reward: float = Field(1.0, description="best reward value; the deficit is ideal − mean reward")
        deficit_offset: float = Field(0.1, gt=0, description="added to the deficit so it stays positive")
        w_min: float = Field(1e-3, gt=0, description="floor on each weight before renormalizing")

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        self.initial_deficits = torch.full((self.num_objectives,), float("nan"), dtype=torch.float64)  # NaN = unseen
        self.grad_norm_sum = torch.zeros(self.num_objectives, dtype=torch.float64)
        self.num_combines = 0

    def initial_weights(self) -> torch.Tensor:
        return torch.ones(self.num_objectives, dtype=torch.float64)

    def solve_weights(self, gram: torch.Tensor, stats: StepStats) -> torch.Tensor:
        self.grad_norm_sum = self.grad_norm_sum + gram.diagonal().clamp(min=0.0).sqrt()
        self.num_combines += 1
        return self._weights

    def update(self, stats: StepStats) -> dict[str, float]:
        self._check_rewards(stats.rewards)
        deficits = reward_deficits(stats.rewards, self.params.ideal_reward, self.params.deficit_offset)
        self.initial_deficits = torch.where(self.initial_deficits.isnan(), deficits, self.initial_deficits)
        ratio = deficits / self.initial_deficits
        relative_rate = torch.nan_to_num(ratio / ratio.nanmean(), nan=1.0)  # unobserved objective: neutral
        if self.num_combines > 0:
            grad_norms = self.grad_norm_sum / self.num_combines
            self._weights = self._finite(self._balanced(grad_norms, relative_rate), self._weights)
        self.grad_norm_sum = torch.zeros_like(self.grad_norm_sum)
        self.num_combines = 0
        return {**self.metrics(), **self._per_objective(deficits, "deficit")}

    def _balanced(self, grad_norms: torch.Tensor, relative_rate: torch.Tensor) -> torch.Tensor:
        """One GradNorm step on the weights (see the class docstring)."""
        weighted_norms = self._weights * grad_norms
        mean_norm = weighted_norms.mean()
        if not mean_norm > 0:  # every gradient is 0: nothing to balance
            return self._weights
        target = mean_norm * relative_rate.pow(self.params.alpha)
        step = torch.sign(weighted_norms - target) * grad_norms / mean_norm
        weights = (self._weights - self.params.lr * step).clamp(min=self.params.w_min)
        return self.num_objectives * weights / weights.sum()
