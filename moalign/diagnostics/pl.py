"""μ-PL diagnostics along a run (METHOD §8).

J satisfies the μ-PL condition when ½‖∇J(θ)‖² ≥ μ (J* − J(θ)) for every θ. With L-smoothness, gradient ascent with
step 1/L then converges linearly: J* − J_t ≤ (1 − μ/L)^t (J* − J_0). Along a run, the largest μ consistent with the
points visited is

    μ̂ = min_t ‖∇J_t‖² / (2 (J* − J_t)),

and the largest local curvature seen between successive points bounds L from below:

    L̂ = max_t ‖∇J_{t+1} − ∇J_t‖ / ‖θ_{t+1} − θ_t‖.

All functions are pure (floats and tensors in, floats out), so they run on a toy problem or along an LM run.

Along a training run (``PLEstimator`` in the native engine) each step gives one point of the function the step
optimizes, the scalarization with that step's weights: J_t = the batch's mean scalarized score, J*_t = the score of
a completion that satisfies every objective under the same weights (``diagnostics.j_star`` fixes it), and ‖∇J_t‖ =
``actor/grad_norm``, the norm of the gradient of the clipped surrogate loss with its KL term, before clipping,
averaged over the step's optimizer steps. Weights that change (CTWA's grow without renormalization) change J and J*
together, so the gap stays on one scale. A point whose gap is at most ``TINY_GAP`` (J at or above J*) constrains
nothing: it is left out of μ̂ and counted (``pl/dropped_points``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

TINY_GAP = 1e-12  # gaps at or below this are optimal up to round-off: they say nothing about μ


def pl_ratio(grad_sq_norm: float, gap: float, tiny: float = TINY_GAP) -> float:
    """‖∇J‖² / (2 gap): the largest μ this one point allows (inf when gap ≤ tiny: no constraint)."""
    return math.inf if gap <= tiny else float(grad_sq_norm) / (2.0 * float(gap))


def estimate_mu(grad_sq_norms: Sequence[float], gaps: Sequence[float], tiny: float = TINY_GAP) -> float:
    """μ̂ = min over t of ‖∇J_t‖² / (2 gap_t), ignoring gap_t ≤ tiny; NaN when no point has a gap."""
    if len(grad_sq_norms) != len(gaps):
        raise ValueError(f"{len(grad_sq_norms)} gradient norms for {len(gaps)} gaps; give one of each per point")
    mu = min((pl_ratio(g, float(gap), tiny) for g, gap in zip(grad_sq_norms, gaps)), default=math.inf)
    return math.nan if math.isinf(mu) else mu


def estimate_L(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> float:
    """L̂ = max over t of ‖∇J_{t+1} − ∇J_t‖ / ‖θ_{t+1} − θ_t‖ (pairs with θ_{t+1} = θ_t skipped); NaN if none."""
    if len(grads) != len(params):
        raise ValueError(f"{len(grads)} gradients for {len(params)} parameter vectors; give one of each per point")
    ratios = []
    for t in range(len(grads) - 1):
        moved = float((params[t + 1].double() - params[t].double()).norm())
        if moved > 0:
            ratios.append(float((grads[t + 1].double() - grads[t].double()).norm()) / moved)
    return max(ratios, default=math.nan)


def linear_rate_bound(mu: float, L: float, steps: int) -> float:
    """(1 − μ/L)^t: the fraction of the initial gap that μ-PL + L-smoothness guarantee is left after t steps."""
    return (1.0 - mu / L) ** steps


class PLEstimator:
    """Streaming μ̂: feed one point per step; the running minimum of ‖∇J‖²/(2 gap) is the estimate."""

    def __init__(self, tiny: float = TINY_GAP):
        self.tiny = tiny
        self._min_ratio = math.inf
        self.num_dropped = 0  # points with gap ≤ tiny: no constraint on μ

    @property
    def mu_hat(self) -> float:
        """NaN until a point with a gap above ``tiny`` arrives."""
        return math.nan if math.isinf(self._min_ratio) else self._min_ratio

    def update(self, grad_sq_norm: float, J: float, J_star: float) -> dict[str, float]:
        gap = float(J_star) - float(J)
        self.num_dropped += gap <= self.tiny
        self._min_ratio = min(self._min_ratio, pl_ratio(grad_sq_norm, gap, self.tiny))
        return {"pl/mu_hat": self.mu_hat, "pl/grad_sq_norm": float(grad_sq_norm), "pl/gap": gap,
                "pl/j_star": float(J_star), "pl/dropped_points": float(self.num_dropped)}

    def state_dict(self) -> dict[str, float]:
        return {"min_ratio": self._min_ratio, "num_dropped": self.num_dropped}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._min_ratio = state["min_ratio"]
        self.num_dropped = int(state.get("num_dropped", 0))
