"""Shared building blocks of the scalarization algorithms in this package.

Three groups, each used by several algorithms:

1. Reward statistics with missing values (``NaN`` = missing, see ``base.py``): batch means that skip missing
   entries, reward deficits, per-objective advantages, user-given vectors, batch whitening.
2. Small convex solvers on M×M problems: Euclidean projection onto the simplex and an accelerated projected
   gradient method for ``min ½ xᵀQx`` over a convex set (MGDA's min-norm point, UPGrad's dual-cone projection).
3. Two base classes: ``StatefulWeighting`` (non-finite guard with a ``num_guarded`` counter, exact
   ``state_dict`` round trip, input checks) and ``GradientWeighting`` (the common ``combine`` / ``advantages``
   of the gradient-level family).

All solver arithmetic runs in float64 on the CPU: the problems are M×M with M the number of objectives.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from moalign.errors import UserError
from moalign.weighting.base import (
    Estimator,
    StepStats,
    Weighting,
    per_objective_advantages,
)

# ---------------------------------------------------------------------------------------------------------------
# 1. Reward statistics
# ---------------------------------------------------------------------------------------------------------------


def objective_means(rewards: torch.Tensor) -> torch.Tensor:
    """Per-objective batch mean [M] (float64, CPU like all weighting state) over the observed entries; NaN where a
    column is entirely missing."""
    return torch.nanmean(rewards.double(), dim=0).cpu()


def objective_maxima(rewards: torch.Tensor) -> torch.Tensor:
    """Per-objective maximum over the batch's completions [M] (float64, CPU) of the observed entries; NaN where a
    column is entirely missing."""
    observed = rewards.double().cpu()
    best = torch.where(torch.isnan(observed), -math.inf, observed).amax(dim=0)
    return torch.where(torch.isneginf(best), math.nan, best)


def reward_deficits(rewards: torch.Tensor, ideal_reward: float, offset: float) -> torch.Tensor:
    """Positive per-objective "losses" for methods defined on losses (GradNorm, FAMO):

        d_j = max(ideal_reward − mean r_j, 0) + offset   (≥ offset > 0; NaN if objective j is entirely missing)

    RL surrogate losses are near zero with a random sign, so ratios and logarithms of them are meaningless; the
    distance of the batch-mean reward to its best value is positive and shrinks as the objective improves."""
    return (ideal_reward - objective_means(rewards)).clamp(min=0.0) + offset


def whiten(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x − mean) / (std + eps) over the batch, unbiased std; a batch of one is only centred."""
    centred = values - values.mean()
    if values.numel() < 2:
        return centred
    return centred / (values.std() + eps)


# ---------------------------------------------------------------------------------------------------------------
# 2. Small convex solvers
# ---------------------------------------------------------------------------------------------------------------


def gram_matrix(grads: torch.Tensor) -> torch.Tensor:
    """G = grads gradsᵀ [M, M], float64 on the CPU. The product runs in the gradients' own precision and device
    (half precision is promoted to float32) so no float64 copy of the [M, P] matrix is made."""
    if grads.dtype not in (torch.float32, torch.float64):
        grads = grads.float()
    gram = (grads @ grads.T).double().cpu()
    return (gram + gram.T) / 2  # exact symmetry for the solvers


def normalized_gram(gram: torch.Tensor) -> Optional[torch.Tensor]:
    """G / trace(G), so solvers see O(1) numbers whatever the gradient scale; ``None`` when every gradient is 0."""
    trace = float(gram.trace())
    if not trace > 0.0:
        return None
    return gram / trace


def project_onto_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {x ≥ 0, Σx = 1} (sort-based; Held et al. 1974, Duchi et al. 2008)."""
    n = v.numel()
    u, _ = torch.sort(v, descending=True)
    cumulative = u.cumsum(0) - 1.0
    k = torch.arange(1, n + 1, dtype=v.dtype)
    support = (u - cumulative / k) > 0
    rho = int(support.nonzero().max())  # last index where the condition holds (index 0 always does)
    theta = cumulative[rho] / (rho + 1)
    return (v - theta).clamp(min=0.0)


def minimize_quadratic(
    Q: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    max_iter: int = 20_000,
    tol: float = 1e-13,
) -> torch.Tensor:
    """argmin ½ xᵀQx over a closed convex set C given by its Euclidean projection (Q symmetric PSD, float64).

    FISTA (Beck & Teboulle 2009) with step 1/L, L = λ_max(Q), and the gradient restart of O'Donoghue & Candès
    (2015): the momentum is dropped whenever it points uphill, which gives linear convergence on strongly convex
    problems and keeps ill-conditioned ones (nearly identical gradients) monotone. Stops when the projected
    gradient step moves the iterate by less than ``tol`` (max-norm)."""
    x = project(start)
    lipschitz = float(torch.linalg.eigvalsh(Q)[-1])
    if not lipschitz > 0.0:  # Q = 0: every feasible point is optimal
        return x
    y, t = x, 1.0
    for _ in range(max_iter):
        x_next = project(y - (Q @ y) / lipschitz)
        if float((x_next - y).abs().max()) < tol:
            return x_next
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        if float((y - x_next) @ (x_next - x)) > 0.0:  # momentum points uphill: restart
            y, t_next = x_next, 1.0
        else:
            y = x_next + ((t - 1.0) / t_next) * (x_next - x)
        x, t = x_next, t_next
    return x


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """MGDA: α* = argmin_{α ∈ simplex} αᵀGα, the weights of the min-norm point of conv{g_1..g_M}.

    M = 2 in closed form (Sener & Koltun 2018, Alg. 1): α_1 = clip(⟨g_2 − g_1, g_2⟩ / ‖g_1 − g_2‖², 0, 1).
    M > 2 by accelerated projected gradient on the trace-normalized Gram matrix (the minimizer is scale-free)."""
    m = gram.shape[0]
    uniform = torch.full((m,), 1.0 / m, dtype=torch.float64)
    Q = normalized_gram(gram)
    if Q is None or m == 1:
        return uniform
    if m == 2:
        spread = float(Q[0, 0] + Q[1, 1] - 2 * Q[0, 1])  # ‖g_1 − g_2‖²
        if not spread > 0.0:  # identical gradients: every α gives the same point
            return uniform
        a1 = min(max(float(Q[1, 1] - Q[0, 1]) / spread, 0.0), 1.0)
        return torch.tensor([a1, 1.0 - a1], dtype=torch.float64)
    return minimize_quadratic(Q, project_onto_simplex, uniform)


# ---------------------------------------------------------------------------------------------------------------
# 3. Base classes
# ---------------------------------------------------------------------------------------------------------------


def _clone_state(value: Any) -> Any:
    """Deep copy of a state value; tensors are cloned so a saved state never aliases the live one."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_state(v) for v in value)
    return value


class StatefulWeighting(Weighting):
    """A ``Weighting`` with the machinery every algorithm here shares.

    * ``num_guarded``: how many times a non-finite weight, score or direction was replaced by a safe fallback
      (``_finite``). Reported by ``metrics()`` and so by every ``update()``.
    * ``state_fields``: attribute names that make up the training state; ``state_dict`` / ``load_state_dict``
      round-trip them exactly (tensors cloned both ways).
    * ``_diagnostics``: method-specific numbers from the last call, merged into ``metrics()``.
    """

    state_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, objectives: Sequence[str], params=None, **kwargs: Any):
        super().__init__(objectives, params, **kwargs)
        if self.num_objectives < 1:
            raise UserError(f"weighting {self.name!r} needs at least one objective")
        self.num_guarded = 0
        self._diagnostics: dict[str, float] = {}

    def _finite(self, value: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """``value`` if every entry is finite, else ``fallback`` (counted in ``num_guarded``)."""
        if bool(torch.isfinite(value).all()):
            return value
        self.num_guarded += 1
        return fallback

    def _check_rewards(self, rewards: torch.Tensor) -> None:
        if rewards.dim() != 2 or rewards.shape[1] != self.num_objectives:
            raise UserError(
                f"weighting {self.name!r}: rewards must have shape [batch, {self.num_objectives}] (one column per "
                f"objective: {', '.join(self.objectives)}), got {list(rewards.shape)}"
            )

    def _checked_gradients(self, grads: torch.Tensor) -> torch.Tensor:
        """Shape check of per-objective gradients [M, P]; a row with a non-finite entry becomes a zero gradient
        (guarded)."""
        if grads.dim() != 2 or grads.shape[0] != self.num_objectives:
            raise UserError(
                f"weighting {self.name!r}: gradients must have shape [{self.num_objectives}, num_params], "
                f"got {list(grads.shape)}"
            )
        broken = ~torch.isfinite(grads).all(dim=1)
        if bool(broken.any()):
            self.num_guarded += 1
            grads = torch.where(broken[:, None], torch.zeros_like(grads), grads)
        return grads

    def _weighted_advantages(self, per_objective: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j A_bj for per-objective advantages [B, M]; non-finite results become 0 (guarded)."""
        combined = per_objective.double() @ weights.to(per_objective.device)
        return self._finite(combined, torch.zeros_like(combined)).to(per_objective.dtype)

    def _per_objective(
        self, values: torch.Tensor, prefix: str, objectives: Optional[Sequence[str]] = None
    ) -> dict[str, float]:
        """``{prefix}/{objective}`` metrics; objectives without a finite value (no data this step) are left out."""
        names = self.objectives if objectives is None else objectives
        return {f"{prefix}/{o}": float(v) for o, v in zip(names, values) if math.isfinite(float(v))}

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), **self._diagnostics, "num_guarded": float(self.num_guarded)}

    def update(self, stats: StepStats) -> dict[str, float]:
        return self.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {name: _clone_state(getattr(self, name)) for name in ("num_guarded", *self.state_fields)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"num_guarded", *self.state_fields}
        if set(state) != expected:
            raise UserError(
                f"weighting {self.name!r}: checkpoint state has keys {sorted(state)}, expected {sorted(expected)}; "
                "was it saved by a different weighting?"
            )
        for name, value in state.items():
            setattr(self, name, _clone_state(value))


class GradientWeighting(StatefulWeighting):
    """Gradient-level family: per-objective policy gradients G = [g_1; …; g_M] ∈ R^{M×P} on a parameter subset are
    combined into one direction d = Σ_j w_j g_j, with weights w = ``solve_weights(GGᵀ)`` read off the M×M Gram
    matrix (every method here needs only inner products of gradients). The g_j may be gradients of the
    per-objective losses or of the objectives themselves, as long as they share one sign convention: the weights
    depend on G only through GGᵀ, which does not change when every row flips sign.

    ``weights`` are the effective weights of the last ``combine`` (before any call: ``initial_weights()``).
    ``advantages()`` returns Σ_j w_j A_j with per-objective advantages A_j, the training signal for the parameters
    outside the chosen subset: their gradient is then Σ_j w_j ∇J_j, the same combination as on the subset. The
    engine must therefore call ``combine`` before ``advantages`` in a step.

    Robustness: rows of G with a non-finite entry count as zero gradients, and non-finite weights or directions
    are replaced (initial weights, zero direction), each counted in ``num_guarded``.
    """

    family = "gradient"
    cost = "one extra forward and M backward passes on the chosen parameters (weighting.gradient_params)"
    state_fields: ClassVar[tuple[str, ...]] = ("_weights",)

    def __init__(self, objectives: Sequence[str], params=None, **kwargs: Any):
        super().__init__(objectives, params, **kwargs)
        self._weights = self.initial_weights()

    def initial_weights(self) -> torch.Tensor:
        """Weights before the first ``combine`` and the fallback for non-finite ones. Default: uniform 1/M."""
        return torch.full((self.num_objectives,), 1.0 / self.num_objectives, dtype=torch.float64)

    @property
    def weights(self) -> torch.Tensor:
        return self._weights

    @abstractmethod
    def solve_weights(self, gram: torch.Tensor, stats: StepStats) -> torch.Tensor:
        """Weights [M] (float64) from the Gram matrix G_ij = ⟨g_i, g_j⟩ (float64, CPU)."""

    def combine(self, grads: torch.Tensor, stats: StepStats) -> torch.Tensor:
        grads = self._checked_gradients(grads)
        weights = self._finite(self.solve_weights(gram_matrix(grads), stats), self.initial_weights())
        self._weights = weights
        direction = weights.to(device=grads.device, dtype=grads.dtype) @ grads
        return self._finite(direction, torch.zeros_like(direction))

    def advantages(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, estimator: Estimator, response_mask: torch.Tensor
    ) -> torch.Tensor:
        self._check_rewards(rewards)
        per_objective = per_objective_advantages(rewards, group_ids, estimator, response_mask)
        return self._weighted_advantages(per_objective, self.weights)
