"""moalign objectives as TRL reward functions."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence, Union

from moalign.errors import UserError
from moalign.objectives import Objective, ScoringBatch

logger = logging.getLogger(__name__)


def message_text(value: Union[str, list[dict[str, Any]]], role: str) -> str:
    """The text of a plain prompt/completion, or of the ``role`` messages of a conversational one (TRL's two
    formats); a user prompt is its last user message, a completion all its assistant messages."""
    if isinstance(value, str):
        return value
    texts = []
    for message in value:
        if message.get("role") != role:
            continue
        content = message.get("content") or ""
        if isinstance(content, list):  # content blocks: keep the text parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        texts.append(content)
    if not texts:
        return ""
    return texts[-1] if role == "user" else "\n".join(texts)


class ObjectiveReward:
    """A moalign ``Objective`` as a TRL reward function ``f(prompts, completions, completion_ids, **columns)``.

    The ground truth comes from the dataset column ``answer_column``. ``Sample.num_tokens`` is the completion length
    without its final EOS, as in the native engine. On training batches the objective first ``observe``s the
    samples of every process (``gather``), then scores this process's samples, so stateful objectives stay
    identical across processes; evaluation batches are only scored. ``MultiObjectiveGRPOTrainer`` sets ``gather``,
    ``eos_token_ids`` and ``observing``.
    """

    def __init__(self, objective: Objective, answer_column: str = "answer"):
        self.objective = objective
        self.__name__ = objective.name  # TRL names reward functions (and their metrics) after __name__
        self.answer_column = answer_column
        self.eos_token_ids: set[int] = set()
        self.gather: Callable[[list], list] = lambda items: items
        self.observing = False
        self._has_state = type(objective).observe is not Objective.observe

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 **columns: Any) -> list[float]:
        if self.answer_column not in columns:
            raise UserError(f"objective {self.objective.name!r} reads the ground truth from the dataset column "
                            f"{self.answer_column!r}, which the dataset lacks; add it or pass "
                            f"ObjectiveReward(objective, answer_column=...)")
        answers = ["" if a is None else str(a) for a in columns[self.answer_column]]
        batch = ScoringBatch.from_lists([message_text(p, "user") for p in prompts],
                                        [message_text(c, "assistant") for c in completions], answers,
                                        [self._num_tokens(ids) for ids in completion_ids])
        if self.observing and self._has_state:
            self.objective.observe(ScoringBatch(self.gather(list(batch.samples))))
        result = self.objective.score(batch)
        if result.errors:  # the run goes on; the samples count as missing rewards (train/<objective>/missing)
            logger.warning("%d sample(s) got no %s reward; first error: %s", len(result.errors),
                           self.objective.name, result.errors[0][:200])
        return result.values.tolist()  # NaN = missing, kept as NaN by TRL

    def _num_tokens(self, ids: Sequence[int]) -> int:
        ends_with_eos = len(ids) > 0 and int(ids[-1]) in self.eos_token_ids
        return len(ids) - int(ends_with_eos)
