"""Correctness-gated objectives: a style reward that only counts when the answer is right.

    gated(y) = inner(y)  if gate(y) = 1,    0  if gate(y) ≠ 1,    missing (NaN) if gate(y) is missing

With gate = accuracy this removes the cheap route to conciseness (answer short and wrong) or clarity
(enumerate anything and box anything): METHOD §5's guard against reward hacking. The paper's runs use the
ungated objectives. The wrapper forwards ``observe`` and checkpoint state, so a gated conciseness keeps its
own running mean exactly like the plain one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moalign.objectives.accuracy import Accuracy
from moalign.objectives.base import (
    OBJECTIVES,
    Objective,
    Sample,
    ScoreResult,
    ScoringBatch,
)
from moalign.objectives.clarity import Clarity, ClarityRefined
from moalign.objectives.conciseness import Conciseness


class Gated(Objective):
    """``inner`` where ``gate`` is 1, else 0 (NaN where the gate itself failed)."""

    def __init__(self, inner: Objective, gate: Objective) -> None:
        self.inner = inner
        self.gate = gate
        if not hasattr(self, "name"):  # the registered subclasses name themselves; an ad-hoc wrapper is derived
            self.name = f"gated_{inner.name}"

    def observe(self, batch: ScoringBatch) -> None:
        self.inner.observe(batch)
        self.gate.observe(batch)

    def score(self, batch: ScoringBatch) -> ScoreResult:
        inner, gate = self.inner.score(batch), self.gate.score(batch)
        values = torch.where(gate.values == 1, inner.values, torch.zeros_like(inner.values))
        values[torch.isnan(gate.values)] = math.nan  # unknown correctness: unknown reward
        errors = [f"{self.name} <- {e}" for e in gate.errors + inner.errors]
        return ScoreResult(values, errors)

    def score_one(self, sample: Sample) -> float:
        return self.score(ScoringBatch([sample])).values.item()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "gate": self.gate.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self.gate.load_state_dict(state.get("gate", {}))


@OBJECTIVES.register("gated_conciseness")
class GatedConciseness(Gated):
    name = "gated_conciseness"
    description = "conciseness if the answer is correct (accuracy = 1), else 0"

    def __init__(self) -> None:
        super().__init__(inner=Conciseness(), gate=Accuracy())


@OBJECTIVES.register("gated_clarity")
class GatedClarity(Gated):
    name = "gated_clarity"
    description = "clarity (the paper's rule) if the answer is correct (accuracy = 1), else 0"

    def __init__(self) -> None:
        super().__init__(inner=Clarity(), gate=Accuracy())


@OBJECTIVES.register("gated_clarity_refined")
class GatedClarityRefined(Gated):
    name = "gated_clarity_refined"
    description = "clarity_refined if the answer is correct (accuracy = 1), else 0"

    def __init__(self) -> None:
        super().__init__(inner=ClarityRefined(), gate=Accuracy())
