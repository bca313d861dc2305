"""The objective interface.

An objective maps a batch of (prompt, completion, answer) samples to one reward per sample. A sample whose
scoring raises, returns a non-number or a non-finite number gets ``NaN`` (a *missing* reward): the run goes on,
the failure is counted, and the sample is left out of that objective's statistics.

Objectives may keep training-time state (e.g. conciseness's running mean length). The engine calls
``observe(batch)`` on training batches only, before ``score``; evaluation calls ``score`` alone, so evaluation
never changes the state. ``state_dict``/``load_state_dict`` carry that state through checkpoints.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from moalign.registry import Registry


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str
    answer: str
    num_tokens: int  # response length in tokens (EOS excluded)


@dataclass
class ScoringBatch:
    samples: Sequence[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def from_lists(cls, prompts, completions, answers, num_tokens) -> "ScoringBatch":
        return cls([Sample(p, c, a, int(n)) for p, c, a, n in zip(prompts, completions, answers, num_tokens)])


@dataclass
class ScoreResult:
    values: torch.Tensor  # float32 [B], NaN where missing
    errors: list[str] = field(default_factory=list)  # one message per failed sample (for the log)

    @property
    def num_missing(self) -> int:
        return int(torch.isnan(self.values).sum())


class Objective(ABC):
    """Base class. Subclasses implement ``score_one`` (per sample) or override ``score`` (whole batch)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def observe(self, batch: ScoringBatch) -> None:
        """Update training-time state from a training batch (called before ``score``; never on evaluation)."""

    @abstractmethod
    def score_one(self, sample: Sample) -> float: ...

    def score(self, batch: ScoringBatch) -> ScoreResult:
        values, errors = [], []
        for s in batch.samples:
            try:
                v = self.score_one(s)
                v = _as_finite_float(v)
            except Exception as exc:  # one bad sample must not kill the run
                errors.append(f"{self.name}: {type(exc).__name__}: {exc}")
                v = math.nan
            values.append(v)
        return ScoreResult(torch.tensor(values, dtype=torch.float32), errors)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _as_finite_float(v: Any) -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise TypeError(f"objective returned {type(v).__name__}, expected a number")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"objective returned non-finite value {f}")
    return f


OBJECTIVES: Registry[type[Objective]] = Registry("objective")
