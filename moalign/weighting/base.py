"""The weighting interface: how several objectives become one training signal.

Three families share one interface (the engine asks ``family`` which path to take):

* ``reward``    — ``scalarize(R, groups) -> s``; the estimator turns ``s`` into advantages (linear, CTWA, ...).
* ``advantage`` — ``advantages(R, groups, estimator, mask) -> A``; per-objective advantages combined
                  (Lagrangian, GDPO, PAMA ...). The default implementation is ``estimator(scalarize(R))``.
* ``gradient``  — ``combine(G, stats) -> d``: per-objective policy gradients ``G`` [M, P] on a parameter subset
                  combined into one direction (MGDA, Nash-MTL, ...), or only setting the weights of a score that
                  the update trains on (``trains_on_score``: dynamic reweighting).

After the policy step the engine calls ``update(stats)``, which returns metrics to log. Weightings see tensors
only — never a model or a trainer — so the same objects run in the native engine, inside TRL and in the theory lab.

Missing rewards (``NaN``, a sample whose objective failed) count as 0 in the training signal (a failure earns no
reward) and are left out of every statistic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Protocol, Sequence

import torch
from pydantic import BaseModel, ConfigDict

from moalign.errors import UserError
from moalign.registry import Registry


class Estimator(Protocol):
    """Advantage estimator: sequence scores -> one advantage per sequence (constant over its tokens)."""

    def __call__(self, scores: torch.Tensor, group_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StepStats:
    """What a weighting may read after the policy step. Tensors are on CPU, float32 unless noted."""

    step: int
    rewards: torch.Tensor  # [B, M], NaN = missing
    group_ids: torch.Tensor  # [B] long, samples of one prompt share an id
    scores: torch.Tensor  # [B] scalarized scores used this step (NaN-free)
    advantages: torch.Tensor  # [B] sequence advantages used in the loss
    response_mask: torch.Tensor  # [B, T] 1 on response tokens
    old_logprobs: torch.Tensor  # [B, T] log pi_old (the sampling policy)
    new_logprobs: Optional[torch.Tensor] = None  # [B, T] log pi after the update (if ``needs_post_update_logprobs``)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2


class WeightingParams(BaseModel):
    """Hyperparameters of a weighting. Subclasses add fields with the authors' defaults. Every number must be finite
    (``.inf`` / ``.nan`` are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def fill_missing(rewards: torch.Tensor) -> torch.Tensor:
    """Missing rewards count as 0 in the training signal."""
    return torch.nan_to_num(rewards, nan=0.0)


def per_objective_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, estimator: Estimator, response_mask: torch.Tensor
) -> torch.Tensor:
    """Advantages [B, M]: column j is the estimator applied to objective j alone (missing rewards count as 0)."""
    filled = fill_missing(rewards)
    columns = [estimator(filled[:, j], group_ids, response_mask) for j in range(filled.shape[1])]
    return torch.stack(columns, dim=1)


FLOAT32_LIMIT = 1e38  # the largest user value accepted where it enters float32 arithmetic (float32 max ≈ 3.4e38)


def user_vector(values: Optional[Sequence[float]], length: int, field: str, per: str = "objective") -> torch.Tensor:
    """A user-given list as a float64 tensor of ``length`` entries, one per ``per``; ``None`` means uniform 1/length."""
    if values is None:
        return torch.full((length,), 1.0 / length, dtype=torch.float64)
    if len(values) != length:
        raise UserError(f"{field} has {len(values)} values but needs {length}: give one value per {per}")
    too_large = [v for v in values if abs(v) > FLOAT32_LIMIT]
    if too_large:  # the training signal is float32: such a value becomes inf and every advantage NaN
        raise UserError(f"{field}: {too_large[0]:g} is too large to compute with (the training signal is float32, "
                        f"which ends at 3.4e38); use values of at most {FLOAT32_LIMIT:g}")
    return torch.tensor(list(values), dtype=torch.float64)


class Weighting(ABC):
    name: ClassVar[str]
    family: ClassVar[Literal["reward", "advantage", "gradient"]] = "reward"
    description: ClassVar[str] = ""
    cost: ClassVar[str] = "none"  # extra cost per step beyond linear, in words
    needs_post_update_logprobs: ClassVar[bool] = False
    # gradient-level only: True when the per-objective gradients only set the weights and the update trains on
    # ``advantages()``, one advantage of the weighted score (dynamic reweighting), not on Σ_j w_j L_j
    trains_on_score: ClassVar[bool] = False
    Params: ClassVar[type[WeightingParams]] = WeightingParams

    def __init__(self, objectives: Sequence[str], params: Optional[WeightingParams] = None, **kwargs: Any):
        self.objectives = list(objectives)
        self.params = params if params is not None else self.Params(**kwargs)
        self.num_objectives = len(self.objectives)

    @property
    @abstractmethod
    def weights(self) -> torch.Tensor:
        """Current per-objective weights (or duals), shape [M], for logging as ``weight/<objective>``."""

    def scalarize(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-sample scalar scores [B] from rewards [B, M]. Reward-level weightings must implement it."""
        raise NotImplementedError(f"{self.name} is {self.family}-level and has no scalarize()")

    def advantages(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, estimator: Estimator, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Sequence advantages [B]. Default: estimator applied to the scalarized score."""
        return estimator(self.scalarize(rewards, group_ids), group_ids, response_mask)

    def combine(self, grads: torch.Tensor, stats: StepStats) -> torch.Tensor:
        """Gradient-level weightings: per-objective *ascent* gradients ∇J_j, [M, P] -> one ascent direction [P].
        The engine flips signs around it (it minimizes losses); ``weights`` must give the effective weights."""
        raise NotImplementedError(f"{self.name} is {self.family}-level and has no combine()")

    def update(self, stats: StepStats) -> dict[str, float]:
        """Adapt internal state after the policy step; return metrics to log. Default: nothing to adapt."""
        return {}

    def named_weights(self) -> dict[str, float]:
        """``weight/<objective>`` → current weight (a run summary's ``final_weights``)."""
        return {f"weight/{o}": float(w) for o, w in zip(self.objectives, self.weights)}

    def metrics(self) -> dict[str, float]:
        return self.named_weights()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


WEIGHTINGS: Registry[type[Weighting]] = Registry("weighting")


def make_weighting(name: str, objectives: Sequence[str], **params: Any) -> Weighting:
    cls = WEIGHTINGS.get(name)
    return cls(objectives, cls.Params(**params))
