"""What every data source produces: ``Example`` rows grouped into train/val/test ``Splits``, configured by
``DataConfig``.

An example is one prompt (the text of the user message; the engine wraps it in the model's chat template) and
its bare ground-truth answer (``"8"``, ``"\\frac{1}{2}"``), which the accuracy objective compares with the
content of the completion's last ``\\boxed{...}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moalign.errors import UserError

DEFAULT_PROMPT_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str  # the user message text
    answer: str  # bare ground truth, e.g. "8" or "\frac{1}{2}"


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def items(self) -> Iterator[tuple[str, list[Example]]]:
        """``(name, examples)`` for train, val and test, in that order."""
        for name in SPLIT_NAMES:
            yield name, getattr(self, name)

    def truncated(self, max_examples: int | None) -> "Splits":
        """The first ``max_examples`` of every split (all of them when ``None``)."""
        if max_examples is None:
            return self
        return Splits(*(examples[:max_examples] for _, examples in self.items()))


MAX_GENERATED = 1_000_000


class DataConfig(BaseModel):
    """Where the prompts come from.

    - ``arithmetic``: generated word problems (``difficulty`` 1..5, sizes ``num_train/num_val/num_test``, ``seed``);
    - ``math500``: a folder with verl-format ``train/val/test.parquet`` (e.g. the paper's MATH-500 split);
    - ``files``: a JSONL/parquet file with ``prompt`` and ``answer`` columns (split 80/10/10 with ``seed``), or a
      folder with ``train``, ``val`` and ``test`` files of that kind;
    - ``hub``: MATH-500 from the Hugging Face Hub (``hub_id``), split 300/100/100 as in the paper.

    ``prompt_suffix`` is appended to arithmetic, generic-file and hub prompts (verl files already contain it).
    ``max_examples`` keeps only the first examples of every split, for quick runs.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: Literal["arithmetic", "math500", "files", "hub"] = "arithmetic"
    path: str | None = None
    difficulty: int = Field(1, ge=1, le=5)
    # arithmetic sizes; above MAX_GENERATED generating takes minutes and the easier difficulties run out of problems
    num_train: int = Field(256, ge=1, le=MAX_GENERATED)
    num_val: int = Field(32, ge=0, le=MAX_GENERATED)
    num_test: int = Field(32, ge=0, le=MAX_GENERATED)
    seed: int = 0
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX
    max_examples: int | None = Field(None, ge=1)
    hub_id: str = "HuggingFaceH4/MATH-500"

    @model_validator(mode="after")
    def _path_given_when_needed(self) -> "DataConfig":
        if self.source in ("math500", "files") and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path (a folder or a file)")
        return self


def make_example(where: str, id: str, prompt: object, answer: object, *, prompt_column: str = "prompt",
                 answer_column: str = "answer") -> Example:
    """Validate one row's fields. ``where`` names the file and row (e.g. ``"data.jsonl line 3"``); a bad field
    raises a ``UserError`` naming ``where`` and the column. Numeric answers (JSON ``8``) become strings."""
    if not isinstance(prompt, str):
        raise UserError(f"{where}: column {prompt_column!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise UserError(f"{where}: column {prompt_column!r} is empty")
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        answer = ""  # a null cell of a table
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise UserError(f"{where}: column {answer_column!r} must be a string or a number, "
                        f"got {type(answer).__name__}")
    if not answer.strip():
        raise UserError(f"{where}: column {answer_column!r} is empty; every row needs a ground-truth answer")
    return Example(id=id, prompt=prompt, answer=answer.strip())


def with_suffix(prompt: str, suffix: str) -> str:
    """Append the instruction ``suffix`` unless the prompt already ends with it."""
    return prompt if prompt.rstrip().endswith(suffix.strip()) else prompt + suffix
