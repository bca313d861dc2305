"""Clarity: a boxed final answer reached through visible steps (METHOD §5).

    clarity(y) = 1  iff  y has a non-empty box  and  (#step markers(y) ≥ 2  or  #ordinal words(y) ≥ 2)

- non-empty box: ``\\boxed{``, optional whitespace, a character that is neither whitespace nor ``}``, …, ``}``
  (``\\boxed{ }`` and ``\\boxed{}`` are empty; ``\\boxed{ 5}`` is not — leading blanks are tolerated).
- ordinal word: first … tenth, next, then (whole words, any case).

Two rules count step markers; both are registered by name.

``clarity`` — the paper's rule, exactly as the authors' code counts (github.com/yining610/ctwa): the number of
non-overlapping leftmost matches of one pattern with two alternatives, case-insensitive, ``^`` at every line start:

- enumerator: a left boundary (line start, or one whitespace character or ``(``, which the match consumes), an
  optional ``step`` (with optional spaces), then digits, one letter or a run of the roman letters i v x l c d m,
  then one of ``) . : -``;
- bullet: a left boundary (line start or one whitespace character, consumed), ``-`` ``*`` or ``•``, then one or
  more whitespace characters (consumed).

Because the boundary and the blanks after a bullet belong to the match, a marker right after another one may not
count: in ``- 1.`` the bullet takes the space before ``1.``, so that is one marker, not two.

``clarity_refined`` — the same definition read so that ordinary mathematics is not taken for structure:

1. an enumerator's punctuation must not be followed by a letter or digit (the `` 3.`` in ``x = 3.5``, ``3-`` in
   ``3-4``, ``1:`` in ``1:30`` and `` e.`` in ``e.g.`` are not steps), and its roman numeral is one of i … xxxix
   (``mix.`` is a word, not a numeral);
2. a bullet must begin its line, after optional indentation (the minus in ``5 - 3`` and the product in ``a * b``
   are not bullets: two subtractions would otherwise make any boxed answer "clear");

markers are found by look-behind, so none hides another. A number ending a sentence ("the sum is 5. ...") still
counts: without a parser it is indistinguishable from "5. ...". On the 500 MATH-500 reference solutions the paper's
rule scores 0.604 and the refined one 0.476 (docs/algorithms.md).
"""

from __future__ import annotations

import re

from moalign.objectives.base import OBJECTIVES, Objective, Sample

NON_EMPTY_BOX = re.compile(r"\\boxed\{\s*[^\s}][^}]*\}")

ORDINAL_WORD = re.compile(r"\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|next|then)\b",
                          re.IGNORECASE)

# the paper's rule: one pattern, boundaries and the blanks after a bullet consumed by the match
PAPER_STEP_MARKER = re.compile(
    r"(?:^|[\s(])(?:\bstep\s*)?(?:\d+|[a-z]|[ivxlcdm]+)[).:-]"  # enumerator
    r"|(?:^|\s)[-*•]\s+",  # bullet
    re.IGNORECASE | re.MULTILINE,
)

REFINED_ENUMERATOR = re.compile(
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

REFINED_BULLET = re.compile(r"^[ \t]*[-*•](?=\s)", re.MULTILINE)  # refinement 2: only at the start of a line

MIN_STEPS = 2


def has_non_empty_box(text: str) -> bool:
    return NON_EMPTY_BOX.search(text) is not None


def paper_step_markers(text: str) -> int:
    return len(PAPER_STEP_MARKER.findall(text))


def refined_step_markers(text: str) -> int:
    return len(REFINED_ENUMERATOR.findall(text)) + len(REFINED_BULLET.findall(text))


def shows_steps(text: str, refined: bool = False) -> bool:
    """≥ 2 step markers (enumerators and bullets together) or ≥ 2 ordinal words."""
    markers = refined_step_markers(text) if refined else paper_step_markers(text)
    return markers >= MIN_STEPS or len(ORDINAL_WORD.findall(text)) >= MIN_STEPS


@OBJECTIVES.register("clarity")
class Clarity(Objective):
    """The paper's clarity: a non-empty ``\\boxed{}`` and at least two step markers or ordinal words, counted as
    the authors' code counts them."""

    name = "clarity"
    description = "the paper's rule: 1 if the response has a non-empty \\boxed{} and ≥ 2 step markers or ordinal words"
    refined = False

    def score_one(self, sample: Sample) -> float:
        text = sample.completion
        return float(has_non_empty_box(text) and shows_steps(text, self.refined))


@OBJECTIVES.register("clarity_refined")
class ClarityRefined(Clarity):
    """Clarity whose step markers exclude decimals, ranges, times, abbreviations and inline operators."""

    name = "clarity_refined"
    description = ("clarity whose step markers exclude decimals, 3-4, 1:30, e.g. and inline - or * (bullets start "
                   "a line)")
    refined = True
