"""Update rules for a training signal on an exact problem, and a loop that runs any moalign weighting on one.

For a signal s(x, y) (the weighting's advantage A = s − E_π[s|x] in the exact rules):

    tilt      π'(y|x) ∝ π(y|x)·exp(η s(x,y))        KL-proximal step; as θ' = θ + η d with Φd = s + const_x
    natural   θ' = θ + η F⁺ ∇J_s                     equals the tilt for every η when the model spans all policies
    vanilla   θ' = θ + η ∇J_s
    clipped   n sampled responses per prompt, GRPO advantages, `epochs` gradient steps of size η on the clipped
              surrogate of moalign.rl.loss (each completion is one token)

First-order laws (METHOD §2), checked by ``moalign.theory.lab.covariance_law``:
    tilt, natural (complete model):  d/dη J_j = E_x Cov_{y~π}(r_j, s)
    vanilla:                         d/dη J_j = ⟨∇J_j, ∇J_s⟩
    clipped:                         sign(ΔJ_j) ≈ sign Cov(r_j, w), w the clipped training signal of the batch

Weightings run unchanged. Reward- and advantage-level ones get a batch of (prompt, response) pairs: every pair once,
with the exact baseline as the estimator, for the exact rules; sampled groups with GRPO for the clipped rule.
Gradient-level ones get the exact per-objective gradients G [M, D] through ``combine(G, stats)``. Every step also
samples ``group_size`` responses per prompt from the current policy: that on-policy batch is the ``StepStats`` a
weighting's ``update`` reads, as in a real run.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from moalign.errors import UserError
from moalign.rl.estimators import grpo
from moalign.rl.loss import aggregate, policy_loss
from moalign.theory.problem import DTYPE, SoftmaxProblem, centred
from moalign.weighting.base import (
    StepStats,
    Weighting,
    fill_missing,
    per_objective_advantages,
)


@dataclass(frozen=True)
class Batch:
    """Completions as (prompt, response) index pairs; a completion is a single token, so masks are [B, 1] ones."""

    prompts: torch.Tensor  # [B] long; doubles as the group id
    responses: torch.Tensor  # [B] long
    rewards: torch.Tensor  # [B, M]

    @property
    def group_ids(self) -> torch.Tensor:
        return self.prompts

    @property
    def response_mask(self) -> torch.Tensor:
        return torch.ones(self.prompts.numel(), 1, dtype=DTYPE)

    def take(self, table: torch.Tensor) -> torch.Tensor:
        """Entries of a [P, K] table at the batch's pairs, [B]."""
        return table[self.prompts, self.responses]

    def log_probs(self, problem: SoftmaxProblem, theta: torch.Tensor) -> torch.Tensor:
        """log π_θ(y_b|x_b) as per-token log-probs [B, 1]."""
        return self.take(problem.log_probs(theta))[:, None]


def all_pairs(problem: SoftmaxProblem) -> Batch:
    """Every (prompt, response) pair once, prompt-major (so a [P·K] vector reshapes to the [P, K] table)."""
    P, K = problem.num_prompts, problem.num_responses
    prompts = torch.arange(P).repeat_interleave(K)
    responses = torch.arange(K).repeat(P)
    return Batch(prompts, responses, problem.rewards.reshape(P * K, -1))


def sample_groups(problem: SoftmaxProblem, probs: torch.Tensor, group_size: int,
                  generator: Optional[torch.Generator] = None) -> Batch:
    """``group_size`` responses per prompt drawn from π (with replacement), grouped by prompt."""
    if group_size < 1:
        raise UserError(f"group_size must be ≥ 1, got {group_size}")
    responses = torch.multinomial(probs, group_size, replacement=True, generator=generator).reshape(-1)
    prompts = torch.arange(problem.num_prompts).repeat_interleave(group_size)
    return Batch(prompts, responses, problem.rewards[prompts, responses])


class ExactBaseline:
    """Estimator for the all-pairs batch: A(x, y) = s(x, y) − E_{y'~π}[s(x, y')].

    No std division: the exact rules follow the signal itself (none of them sees per-prompt constants).
    """

    def __init__(self, probs: torch.Tensor):
        self.probs = probs

    def __call__(self, scores: torch.Tensor, group_ids: torch.Tensor, response_mask=None) -> torch.Tensor:
        if scores.numel() != self.probs.numel():
            raise ValueError("ExactBaseline works on the all-pairs batch only (see all_pairs)")
        return centred(self.probs, scores.to(DTYPE).reshape(self.probs.shape)).reshape(-1)


def exact_advantages(problem: SoftmaxProblem, probs: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """The weighting's training signal on every pair with the exact baseline, [P, K].

    Gradient-level weightings have no signal of their own; like the engine, their effective weights combine the
    per-objective advantages (used for ``StepStats`` only — their step follows ``combine``).
    """
    pairs = all_pairs(problem)
    baseline = ExactBaseline(probs)
    if weighting.family == "gradient":
        per_objective = per_objective_advantages(pairs.rewards, pairs.group_ids, baseline, pairs.response_mask)
        advantages = per_objective @ weighting.weights.to(DTYPE)
    else:
        advantages = weighting.advantages(pairs.rewards, pairs.group_ids, baseline, pairs.response_mask)
    return advantages.to(DTYPE).reshape(probs.shape)


def batch_scores(weighting: Weighting, batch: Batch) -> torch.Tensor:
    """Scalarized scores of a batch for ``StepStats`` (the engine's rule: scalarize, else the weights' sum)."""
    if weighting.family == "reward":
        return weighting.scalarize(batch.rewards, batch.group_ids).to(DTYPE)
    return fill_missing(batch.rewards) @ weighting.weights.to(DTYPE)


def tilt(probs: torch.Tensor, signal: torch.Tensor, eta: float) -> torch.Tensor:
    """The exponential tilt π'(y|x) ∝ π(y|x)·exp(η s(x,y)), [P, K]."""
    return torch.softmax(torch.log(probs) + eta * signal, dim=-1)


def clipped_update(problem: SoftmaxProblem, theta: torch.Tensor, batch: Batch, advantages: torch.Tensor,
                   eta: float, clip_eps: float, epochs: int, dual_clip: Optional[float] = 3.0) -> torch.Tensor:
    """``epochs`` gradient-descent steps of size η on the token-mean clipped surrogate, π_old = π_θ."""
    old_logprobs = batch.log_probs(problem, theta)
    mask = batch.response_mask
    current = theta.detach().clone()
    for _ in range(epochs):
        current.requires_grad_(True)
        out = policy_loss(batch.log_probs(problem, current), old_logprobs, advantages, mask, clip_eps, clip_eps,
                          dual_clip)
        (grad,) = torch.autograd.grad(aggregate(out.per_token, mask, "token-mean"), current)
        current = (current - eta * grad).detach()
    return current


# ---------------------------------------------------------------------- rules


class UpdateRule(ABC):
    """One policy step driven by a weighting. ``clip_eps`` is what ``StepStats`` reports (inf: never clips)."""

    name: ClassVar[str]
    clip_eps: float = math.inf

    @abstractmethod
    def batch_advantages(self, problem: SoftmaxProblem, theta: torch.Tensor, weighting: Weighting,
                         batch: Batch) -> torch.Tensor:
        """The advantages this rule gives the batch's completions, [B]."""

    @abstractmethod
    def step(self, problem: SoftmaxProblem, theta: torch.Tensor, weighting: Weighting, batch: Batch,
             stats: StepStats, eta: float) -> torch.Tensor:
        """θ after one step of size η."""


class ExactRule(UpdateRule):
    """A rule that moves θ along an exact direction: precondition(∇J_s), or precondition(combine(G))."""

    def batch_advantages(self, problem, theta, weighting, batch):
        return batch.take(exact_advantages(problem, problem.probs(theta), weighting))

    def step(self, problem, theta, weighting, batch, stats, eta):
        if weighting.family == "gradient":
            combined = weighting.combine(problem.objective_grads(theta), stats).to(DTYPE)
            return theta + eta * self.precondition(problem, theta, combined)
        return theta + eta * self.direction(problem, theta, exact_advantages(problem, problem.probs(theta), weighting))

    def direction(self, problem: SoftmaxProblem, theta: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """The step direction d for signal [P, K] (θ' = θ + η d)."""
        return self.precondition(problem, theta, problem.grad(theta, signal))

    @abstractmethod
    def precondition(self, problem: SoftmaxProblem, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Map an ascent gradient [D] to the step direction [D]."""


class Vanilla(ExactRule):
    name = "vanilla"

    def precondition(self, problem, theta, grad):
        return grad


class Natural(ExactRule):
    """θ' = θ + η F⁺ g. F⁺ (pseudo-inverse) because F is singular along per-prompt constant logits."""

    name = "natural"

    def precondition(self, problem, theta, grad):
        return torch.linalg.pinv(problem.fisher(theta), rtol=1e-10, hermitian=True) @ grad


class Tilt(ExactRule):
    """The tilt in parameter space: d solves Φd = s + const_x, so π_{θ+ηd} ∝ π_θ·exp(η s) exactly, for every η."""

    name = "tilt"

    def direction(self, problem, theta, signal):
        if not problem.spans_all_policies:
            raise UserError("the tilt rule needs a model that spans all policies (e.g. tabular or full-rank "
                            "features); use the natural rule, its projection onto the model")
        return problem.logit_params(signal)

    def precondition(self, problem, theta, grad):
        raise UserError("gradient-level weightings have no signal to tilt by; use the vanilla or natural rule")


@dataclass
class Clipped(UpdateRule):
    """PPO/GRPO: GRPO advantages of the sampled groups, then ``epochs`` steps on the clipped surrogate."""

    clip_eps: float = 0.2
    epochs: int = 4
    dual_clip: Optional[float] = 3.0
    name: ClassVar[str] = "clipped"

    def __post_init__(self) -> None:
        if self.clip_eps <= 0 or self.epochs < 1:
            raise UserError(f"clipped rule needs clip_eps > 0 and epochs ≥ 1, got {self.clip_eps}, {self.epochs}")

    def batch_advantages(self, problem, theta, weighting, batch):
        if weighting.family == "gradient":
            raise UserError("the clipped rule takes reward- or advantage-level weightings; gradient-level ones "
                            "run with the vanilla or natural rule")
        return weighting.advantages(batch.rewards, batch.group_ids, grpo, batch.response_mask).to(DTYPE)

    def step(self, problem, theta, weighting, batch, stats, eta):
        return clipped_update(problem, theta, batch, stats.advantages, eta, self.clip_eps, self.epochs, self.dual_clip)


RULES: dict[str, type[UpdateRule]] = {rule.name: rule for rule in (Tilt, Natural, Vanilla, Clipped)}


def make_rule(name: str, **params) -> UpdateRule:
    if name not in RULES:
        raise UserError(f"unknown update rule {name!r}; valid: {', '.join(RULES)}")
    return RULES[name](**params)


# ---------------------------------------------------------------------- the loop


@dataclass
class Trajectory:
    """What ``run`` saw: row t is the state after t steps (row 0 = the start)."""

    thetas: torch.Tensor  # [T+1, D]
    objective_values: torch.Tensor  # [T+1, M] exact J_j
    weights: torch.Tensor  # [T+1, M] the weighting's weights
    metrics: list[dict[str, float]] = field(default_factory=list)  # what weighting.update returned, per step


def run(problem: SoftmaxProblem, weighting: Weighting, rule: UpdateRule | str, steps: int, eta: float,
        theta0: Optional[torch.Tensor] = None, group_size: int = 16, seed: int = 0) -> Trajectory:
    """Train the problem's policy for ``steps`` steps of size η with a weighting and an update rule."""
    rule = make_rule(rule) if isinstance(rule, str) else rule
    if weighting.num_objectives != problem.num_objectives:
        raise UserError(f"weighting has {weighting.num_objectives} objectives, the problem "
                        f"{problem.num_objectives}; build the weighting with problem.objectives")
    generator = torch.Generator().manual_seed(seed)
    theta = problem.zero_params() if theta0 is None else theta0.to(DTYPE)
    thetas, values, weights, metrics = [theta], [problem.objective_values(problem.probs(theta))], [], []
    weights.append(weighting.weights.detach().to(DTYPE).clone())
    for t in range(steps):
        batch = sample_groups(problem, problem.probs(theta), group_size, generator)
        advantages = rule.batch_advantages(problem, theta, weighting, batch)
        stats = StepStats(t, batch.rewards, batch.group_ids, batch_scores(weighting, batch), advantages,
                          batch.response_mask, batch.log_probs(problem, theta), None, rule.clip_eps, rule.clip_eps)
        theta = rule.step(problem, theta, weighting, batch, stats, eta).detach()
        stats.new_logprobs = batch.log_probs(problem, theta)
        metrics.append(weighting.update(stats))
        thetas.append(theta)
        values.append(problem.objective_values(problem.probs(theta)))
        weights.append(weighting.weights.detach().to(DTYPE).clone())
    return Trajectory(torch.stack(thetas), torch.stack(values), torch.stack(weights), metrics)
