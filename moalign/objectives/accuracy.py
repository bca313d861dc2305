"""Accuracy: is the final boxed answer mathematically equal to the ground truth?

    accuracy(y) = 1  if  content(last \\boxed{...} of y)  ≡  ground truth,   else 0   (no box → 0)

≡ is decided by math-verify (``parse`` both sides to sympy, then ``verify``), so ``0.5 ≡ \\frac{1}{2} ≡
\\frac12`` and ``\\{1,2\\} ≡ \\{2,1\\}``; the authors compare normalized strings, which misses such cases.
A ground truth may be bare (``8``, ``\\frac{1}{2}``) or itself boxed; a boxed one is reduced to its content.
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

from moalign.objectives.base import OBJECTIVES, Objective, Sample
from moalign.objectives.boxed import last_boxed_content

# math-verify's own per-call timeouts (seconds). They are implemented with signal.alarm, which only works in
# the main thread; elsewhere they must be off (math-verify raises otherwise) and a pathological expression
# can then take as long as sympy needs.
MATH_VERIFY_TIMEOUT_S = 5


def answers_equivalent(predicted: str, truth: str) -> bool:
    """Whether two LaTeX answers (box contents, no ``$``) denote the same mathematical object."""
    if _normalized(predicted) == _normalized(truth):  # fast path: the common exact match needs no sympy
        return True
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    # Re-boxing the content is the form math-verify's LaTeX extractor reads most reliably (it keeps braces
    # balanced and needs no $ delimiters, which the content might itself contain).
    gold = parse(f"\\boxed{{{truth}}}", parsing_timeout=timeout)
    target = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    return bool(verify(gold, target, timeout_seconds=timeout))  # order matters: gold first


def _normalized(answer: str) -> str:
    return re.sub(r"\s+", "", answer)


@OBJECTIVES.register("accuracy")
class Accuracy(Objective):
    """1 iff the content of the last brace-matched ``\\boxed{...}`` is equivalent to the ground truth."""

    name = "accuracy"
    description = "1 if the last \\boxed{} answer equals the ground truth (math-verify), else 0"

    def score_one(self, sample: Sample) -> float:
        predicted = last_boxed_content(sample.completion)
        if predicted is None or not predicted.strip():
            return 0.0
        truth = last_boxed_content(sample.answer)
        if truth is None:  # the usual case: a bare ground truth
            truth = sample.answer
        return float(answers_equivalent(predicted, truth.strip()))
