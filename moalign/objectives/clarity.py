"""Clarity: a boxed final answer reached through visible steps (METHOD §5, the authors' definition).

    clarity(y) = 1  iff  y has a non-empty box  and  (#enumerators(y) ≥ 2  or  #ordinal words(y) ≥ 2)

- non-empty box: ``\\boxed{``, optional whitespace, a character that is neither whitespace nor ``}``, …, ``}``
  (``\\boxed{ }`` and ``\\boxed{}`` are empty; ``\\boxed{ 5}`` is not — leading blanks are tolerated, as in
  the authors' code).
- enumerator: optional ``step`` (any case, optional spaces), then digits, a roman numeral (i … xxxix) or one
  letter, then one of ``) . : -``; it must start the text/line or follow whitespace or ``(``. So ``1.``,
  ``2)``, ``Step 3:``, ``a)``, ``(i)``, ``ii.``, ``IV-`` all count.
- bullet (also an enumerator): ``-``, ``*`` or ``•`` followed by whitespace.
- ordinal word: first … tenth, next, then (whole words, any case).

Two refinements of the literal definition, both so that ordinary mathematics is not read as structure:

1. An enumerator's punctuation must not be followed by a letter or digit. Literally, the `` 3.`` in
   ``x = 3.5``, ``3-`` in ``3-4``, ``1:`` in ``1:30`` and `` e.`` in ``e.g.`` would be enumerators; with the
   refinement they are not. A number ending a sentence ("the sum is 5. ...") still counts: without a
   parser it is indistinguishable from "5. ...".
2. A bullet must begin its line (after optional indentation). Literally any `` - `` or `` * `` between
   spaces would count, i.e. the minus in ``5 - 3`` and the product in ``a * b``, and two subtractions would
   make any boxed answer "clear".
"""

from __future__ import annotations

import re

from moalign.objectives.base import OBJECTIVES, Objective, Sample

NON_EMPTY_BOX = re.compile(r"\\boxed\{\s*[^\s}][^}]*\}")

ENUMERATOR = re.compile(
    r"""
    (?<![^\s(])                                 # left boundary: start, after whitespace (so line start) or "("
    (?:step[ \t]*)?                             # optional "Step" / "step"
    (?:
        \d+                                     # 1  2  10
      | (?=[ivx])x{0,3}(?:ix|iv|v?i{0,3})       # roman numeral i … xxxix: ii  iv  IX
      | [a-z]                                   # one letter: a  B
    )
    [).:\-]                                     # closing punctuation
    (?!\w)                                      # refinement 1: not 3.5, 3-4, 1:30, e.g.
    """,
    re.IGNORECASE | re.VERBOSE,
)

BULLET = re.compile(r"^[ \t]*[-*•](?=\s)", re.MULTILINE)  # refinement 2: only at the start of a line

ORDINAL_WORD = re.compile(r"\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|next|then)\b",
                          re.IGNORECASE)

MIN_STEPS = 2


def has_non_empty_box(text: str) -> bool:
    return NON_EMPTY_BOX.search(text) is not None


def shows_steps(text: str) -> bool:
    """≥ 2 enumerators (bullets included) or ≥ 2 ordinal words."""
    num_enumerators = len(ENUMERATOR.findall(text)) + len(BULLET.findall(text))
    return num_enumerators >= MIN_STEPS or len(ORDINAL_WORD.findall(text)) >= MIN_STEPS


@OBJECTIVES.register("clarity")
class Clarity(Objective):
    """1 iff the response has a non-empty ``\\boxed{}`` and shows at least two enumerated steps or ordinal words."""

    name = "clarity"
    description = "1 if the response has a non-empty \\boxed{} and enumerated steps (or ordinal words), else 0"

    def score_one(self, sample: Sample) -> float:
        return float(has_non_empty_box(sample.completion) and shows_steps(sample.completion))
