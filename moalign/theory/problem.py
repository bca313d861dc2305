"""Exact multi-objective softmax-policy problems: the theory lab's "models".

P prompts x (uniform), K candidate responses y per prompt, M objectives with rewards R[x, y, j]. A log-linear
policy with features Φ[x, y, :] ∈ R^D and parameters θ ∈ R^D:

    π_θ(y|x) = softmax_y ⟨Φ(x,y), θ⟩,        J_s(θ) = E_x E_{y~π_θ(·|x)} s(x,y)   for any signal s[P, K].

Everything is a finite sum over the P·K pairs, computed exactly in float64. With s̄_x = E_π[s|x] and c = s − s̄_x:

    ∇J_s   = E_x Σ_y π(y|x) c(x,y) Φ(x,y)
    F      = E_x Cov_{y~π}(Φ, Φ)                                               (Fisher information)
    ∇²J_s  = E_x Φ_xᵀ H_x Φ_x,   H_x = diag(π c) − (π c) πᵀ − π (π c)ᵀ         (H_x: Hessian in the logits)

The tabular policy is the special case Φ = identity (θ = the logits). The feature map plays the role of the model:
it fixes which logit directions a step can reach (a model *spans all policies* when every logit table is Φθ plus
a per-prompt constant), how well conditioned the geometry is, and the kernel ΦΦᵀ through which the objectives'
gradients meet: ⟨∇J_i, ∇J_j⟩ = c_iᵀ ΦΦᵀ c_j with c_j = π ⊙ (r_j − r̄_j) / P flattened over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from moalign.errors import UserError

DTYPE = torch.float64


def centred(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values − E_{y~π}[values | x] for values [P, K, ...] (trailing dims are separate signals)."""
    mean = torch.einsum("xk,xk...->x...", probs, values)
    return values - mean.unsqueeze(1)


def expected(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """E_x E_{y~π} values for values [P, K, ...] -> trailing shape."""
    return torch.einsum("xk,xk...->...", probs, values) / probs.shape[0]


def policy_covariance(probs: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """E_x Cov_{y~π(·|x)}(a, b) for a [P, K, ...] and a single signal b [P, K]; the result has a's trailing shape."""
    return torch.einsum("xk,xk...,xk->...", probs, centred(probs, a), centred(probs, b)) / probs.shape[0]


@dataclass(frozen=True)
class SoftmaxProblem:
    """Rewards R [P, K, M] and features Φ [P, K, D] of an exact log-linear softmax policy (see module docstring)."""

    rewards: torch.Tensor
    features: torch.Tensor
    objectives: tuple[str, ...]

    def __post_init__(self) -> None:
        r, phi = self.rewards, self.features
        if r.dim() != 3 or r.shape[1] < 2:
            raise UserError(f"rewards must have shape [prompts, responses ≥ 2, objectives], got {tuple(r.shape)}")
        if phi.dim() != 3 or phi.shape[:2] != r.shape[:2]:
            raise UserError(f"features must have shape [prompts, responses, dim] = [{r.shape[0]}, {r.shape[1]}, D], "
                            f"got {tuple(phi.shape)}")
        if len(self.objectives) != r.shape[2]:
            raise UserError(f"{len(self.objectives)} objective names for {r.shape[2]} reward columns; give one each")
        if not (torch.isfinite(r).all() and torch.isfinite(phi).all()):
            raise UserError("rewards and features must be finite (the theory lab has no missing rewards)")
        object.__setattr__(self, "rewards", r.to(DTYPE))
        object.__setattr__(self, "features", phi.to(DTYPE))
        object.__setattr__(self, "objectives", tuple(self.objectives))

    # ------------------------------------------------------------------ sizes

    @property
    def num_prompts(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_responses(self) -> int:
        return self.rewards.shape[1]

    @property
    def num_objectives(self) -> int:
        return self.rewards.shape[2]

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    @property
    def flat_features(self) -> torch.Tensor:
        """Φ as a [P·K, D] matrix (pairs in prompt-major order)."""
        return self.features.reshape(-1, self.dim)

    def with_features(self, features: torch.Tensor) -> "SoftmaxProblem":
        """The same rewards under another model."""
        return SoftmaxProblem(self.rewards, features, self.objectives)

    def scalarized(self, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """The linear signal s = Σ_j λ_j r_j, [P, K]."""
        return self.rewards @ torch.as_tensor(weights, dtype=DTYPE)

    def zero_params(self) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=DTYPE)

    # ------------------------------------------------------------------ policy and values

    def log_probs(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.features @ theta, dim=-1)

    def probs(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.features @ theta, dim=-1)

    def objective_values(self, probs: torch.Tensor) -> torch.Tensor:
        """J_j = E_x E_π r_j for every objective, [M]."""
        return expected(probs, self.rewards)

    # ------------------------------------------------------------------ derivatives in θ

    def grad(self, theta: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """∇_θ J_s for signal [P, K, ...] (trailing dims give a batch of signals) -> [..., D]."""
        probs = self.probs(theta)
        weights = probs.reshape(*probs.shape, *([1] * (signal.dim() - 2))) * centred(probs, signal)
        return torch.einsum("xk...,xkd->...d", weights, self.features) / self.num_prompts

    def objective_grads(self, theta: torch.Tensor) -> torch.Tensor:
        """G [M, D]: row j is ∇J_j."""
        return self.grad(theta, self.rewards)

    def fisher(self, theta: torch.Tensor) -> torch.Tensor:
        """F = E_x E_{y~π} ∇logπ ∇logπᵀ = E_x Cov_y(Φ, Φ), [D, D]."""
        probs = self.probs(theta)
        phi_c = centred(probs, self.features)
        return torch.einsum("xk,xkd,xke->de", probs, phi_c, phi_c) / self.num_prompts

    def hessian(self, theta: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """∇²_θ J_s for one signal [P, K], [D, D] (formula in the module docstring)."""
        probs = self.probs(theta)
        pc = probs * centred(probs, signal)
        logit_hess = (torch.diag_embed(pc) - pc[:, :, None] * probs[:, None, :] - probs[:, :, None] * pc[:, None, :])
        return torch.einsum("xkd,xkl,xle->de", self.features, logit_hess, self.features) / self.num_prompts

    def smoothness_bound(self, signal: torch.Tensor) -> float:
        """An L with ‖∇²J_s(θ)‖ ≤ L for every θ.

        Per prompt, E_π[s] is (5/2)·range_x(s)-smooth in the logits (Mei et al. 2020, Lemma 2, for rewards in [0, 1];
        the logit Hessian only sees s − s̄, so shift and scale give the range). Then −L_x I ≼ H_x ≼ L_x I gives
        ‖E_x Φ_xᵀ H_x Φ_x‖ ≤ max_x L_x · λ_max(ΦᵀΦ / P).
        """
        spread = (signal.max(-1).values - signal.min(-1).values).max()
        gram = self.flat_features.T @ self.flat_features / self.num_prompts
        return float(2.5 * spread * torch.linalg.eigvalsh(gram)[-1])

    # ------------------------------------------------------------------ what the model can reach

    @property
    def spans_all_policies(self) -> bool:
        """True iff every logit table equals Φθ plus a per-prompt constant (then J*_s = E_x max_y s is the sup)."""
        prompt_indicator = torch.eye(self.num_prompts, dtype=DTYPE).repeat_interleave(self.num_responses, dim=0)
        basis = torch.cat([self.flat_features, prompt_indicator], dim=1)
        return int(torch.linalg.matrix_rank(basis)) == self.num_prompts * self.num_responses

    def logit_params(self, logits: torch.Tensor) -> torch.Tensor:
        """θ with Φθ = logits + a per-prompt constant (least squares; exact when the model spans all policies)."""
        prompt_indicator = torch.eye(self.num_prompts, dtype=DTYPE).repeat_interleave(self.num_responses, dim=0)
        basis = torch.cat([self.flat_features, prompt_indicator], dim=1)
        solution = torch.linalg.lstsq(basis, logits.reshape(-1, 1), driver="gelsd").solution
        return solution[: self.dim, 0]

    def optimum(self, signal: torch.Tensor) -> float:
        """sup over all policies of J_s = E_x max_y s(x, y) (reached only in the limit of deterministic policies)."""
        return float(signal.max(-1).values.mean())


# ---------------------------------------------------------------------- random instances


def correlated_rewards(prompts: int, responses: int, objectives: int, correlation: float = 0.0,
                       binary: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Rewards [P, K, M] through a Gaussian copula.

    z ~ N(0, Σ) per pair with Σ = (1 − ρ) I + ρ 11ᵀ (every two objectives share latent correlation ρ), then
    r = Φ_N(z), uniform on [0, 1], or r = 1[z > 0] for {0, 1} rewards. Σ is a covariance iff −1/(M−1) ≤ ρ ≤ 1.
    """
    lower = -1.0 / (objectives - 1) if objectives > 1 else -1.0
    if not lower <= correlation <= 1.0:
        raise UserError(f"correlation {correlation} impossible for {objectives} objectives; use a value in "
                        f"[{lower:.3f}, 1]")
    sigma = (1 - correlation) * torch.eye(objectives, dtype=DTYPE) + correlation
    evals, evecs = torch.linalg.eigh(sigma)
    root = evecs * evals.clamp(min=0).sqrt()  # root rootᵀ = Σ even when Σ is singular (ρ at either bound)
    z = torch.randn(prompts, responses, objectives, dtype=DTYPE, generator=generator) @ root.T
    return (z > 0).to(DTYPE) if binary else torch.special.ndtr(z)


def tabular_features(prompts: int, responses: int) -> torch.Tensor:
    """Φ = identity: θ is the logit table itself."""
    return torch.eye(prompts * responses, dtype=DTYPE).reshape(prompts, responses, prompts * responses)


def random_features(prompts: int, responses: int, dim: Optional[int] = None, condition: float = 1.0,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Φ = U diag(σ) Vᵀ as [P, K, D]: random orthonormal U, V, singular values log-spaced from 1 to 1/condition.

    dim = P·K (the default) gives a model that spans all policies, with κ(Φ) = condition; smaller dims give a
    restricted model.
    """
    n = prompts * responses
    dim = n if dim is None else dim
    if not 1 <= dim <= n:
        raise UserError(f"feature dim must be in [1, prompts·responses = {n}], got {dim}")
    if condition < 1:
        raise UserError(f"condition number must be ≥ 1, got {condition}")
    u = torch.linalg.qr(torch.randn(n, dim, dtype=DTYPE, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(dim, dim, dtype=DTYPE, generator=generator)).Q
    sigma = torch.logspace(0.0, -torch.log10(torch.tensor(condition)).item(), dim, dtype=DTYPE)
    return ((u * sigma) @ v.T).reshape(prompts, responses, dim)


def stretched_features(direction: torch.Tensor, stretch: float) -> torch.Tensor:
    """A complete model whose kernel ΦΦᵀ = I + stretch·uuᵀ amplifies one logit direction u (direction [P, K]).

    Φ = I + (√(1 + stretch) − 1) uuᵀ. Stretching along c_1/‖c_1‖ − c_2/‖c_2‖ (difference of two objectives' logit
    gradients) makes their parameter gradients conflict more; along the sum, agree more.
    """
    if stretch <= -1:
        raise UserError(f"stretch must be > −1 (the kernel must stay positive definite), got {stretch}")
    u = direction.reshape(-1).to(DTYPE)
    u = u / u.norm()
    n = u.numel()
    phi = torch.eye(n, dtype=DTYPE) + (torch.sqrt(torch.tensor(1.0 + stretch, dtype=DTYPE)) - 1) * torch.outer(u, u)
    return phi.reshape(*direction.shape, n)


def random_problem(prompts: int = 4, responses: int = 5, objectives: int = 2, correlation: float = 0.0,
                   binary: bool = False, features: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> SoftmaxProblem:
    """A problem with copula rewards (see ``correlated_rewards``) and tabular features unless given."""
    rewards = correlated_rewards(prompts, responses, objectives, correlation, binary, generator)
    phi = tabular_features(prompts, responses) if features is None else features
    return SoftmaxProblem(rewards, phi, tuple(f"r{j + 1}" for j in range(objectives)))
