"""Conciseness: is the response shorter than the average training response so far?

    conciseness(y) = 1  if  len(y) < L̄,   else 0,      L̄ = (Σ lengths of all training responses observed) / count

Lengths are ``Sample.num_tokens``. The engine observes each training batch before scoring it, so L̄ includes the
current batch (as the authors do); before the first observation there is no L̄ and every response scores 1.
L̄ is training state: evaluation only scores (never observes), and the state is the exact integer pair
(count, total tokens), so a resumed run continues with exactly the same mean.
"""

from __future__ import annotations

from typing import Any

from moalign.errors import UserError
from moalign.objectives.base import OBJECTIVES, Objective, Sample, ScoringBatch


@OBJECTIVES.register("conciseness")
class Conciseness(Objective):
    """1 iff the response is strictly shorter (in tokens) than the running mean length of training responses."""

    name = "conciseness"
    description = "1 if the response has fewer tokens than the running mean of training responses, else 0"

    def __init__(self) -> None:
        self.count = 0  # training responses observed
        self.total_tokens = 0  # their summed lengths

    def observe(self, batch: ScoringBatch) -> None:
        self.count += len(batch)
        self.total_tokens += sum(s.num_tokens for s in batch.samples)

    @property
    def mean_length(self) -> float:
        return self.total_tokens / self.count if self.count else float("nan")

    def score_one(self, sample: Sample) -> float:
        if self.count == 0:  # no statistic yet
            return 1.0
        # n < total/count, compared in integers so the threshold has no rounding
        return float(sample.num_tokens * self.count < self.total_tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "total_tokens": self.total_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            count, total_tokens = int(state["count"]), int(state["total_tokens"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"conciseness state {state!r} is not {{'count': int, 'total_tokens': int}} ({exc}); "
                            f"the checkpoint is damaged or from another objective: resume from another one") from exc
        self.count, self.total_tokens = count, total_tokens
