"""PCGrad: projecting conflicting gradients (gradient-level)."""

from __future__ import annotations

import torch
from pydantic import Field
from torchjd.aggregation import PCGradWeighting

from moalign.weighting._solvers import GradientWeighting, normalized_gram
from moalign.weighting.base import WEIGHTINGS, StepStats, WeightingParams


@WEIGHTINGS.register("pcgrad")
class PCGrad(GradientWeighting):
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Alg. 1):

        for each i:  g_i^PC = g_i;  for j ≠ i in random order:
                         if ⟨g_i^PC, g_j⟩ < 0:  g_i^PC ← g_i^PC − ⟨g_i^PC, g_j⟩ / ‖g_j‖² · g_j
        d = Σ_i g_i^PC

    Each projected gradient is a combination of the g_j, so d = Σ_j w_j g_j; torchjd's ``PCGradWeighting``
    computes these w from the Gram matrix (here trace-normalized; the weights are scale-free) and is used as is.
    The weights sum to about M (PCGrad sums, it does not average).

    Determinism: torchjd draws the orders with ``torch.randperm`` on the global CPU generator. Each call here
    draws a seed from moalign's own generator (seeded by ``seed``, its state part of ``state_dict``) and runs
    torchjd under ``torch.random.fork_rng`` with that seed, so results are reproducible, survive a checkpoint
    resume, and leave the global random state untouched.
    """

    name = "pcgrad"
    description = "projects each gradient off the others it conflicts with (random order), then sums"
    cost = "one extra forward and M backward passes on the chosen parameters (weighting.gradient_params)"
    state_fields = ("_weights", "rng_state")

    class Params(WeightingParams):
        seed: int = Field(0, ge=0, description="seed of the generator for the projection orders")

    def __init__(self, objectives, params=None, **kwargs):
        super().__init__(objectives, params, **kwargs)
        self.rng_state = torch.Generator().manual_seed(self.params.seed).get_state()
        self._torchjd = PCGradWeighting()

    def initial_weights(self) -> torch.Tensor:
        return torch.ones(self.num_objectives, dtype=torch.float64)

    def _next_seed(self) -> int:
        generator = torch.Generator()
        generator.set_state(self.rng_state)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        self.rng_state = generator.get_state()
        return seed

    def solve_weights(self, gram: torch.Tensor, stats: StepStats) -> torch.Tensor:
        Q = normalized_gram(gram)
        if Q is None:  # every gradient is 0
            return self.initial_weights()
        seed = self._next_seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._torchjd(Q)
