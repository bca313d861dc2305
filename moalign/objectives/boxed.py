"""Brace-matched extraction of ``\\boxed{...}`` answers.

A regular expression cannot match nested braces, so ``\\boxed{\\frac{1}{2}}`` is read by counting: from the
``{`` after ``\\boxed`` (spaces allowed between them), depth goes +1 at ``{`` and −1 at ``}``; the box ends where
depth returns to 0. Escaped braces ``\\{`` ``\\}`` (LaTeX set braces) are content, not structure.

"The last box" is the one whose ``\\boxed`` occurs last, as in verl's ``last_boxed_only_string`` (the
authors' grader): in ``\\boxed{\\boxed{5}}`` it is the inner one, and if the last box is never closed (a
response cut off by the length limit) there is no answer, even if an earlier box was complete.
"""

from __future__ import annotations

import re
from typing import Optional

_BOX_OPENING = re.compile(r"\\boxed\s*\{")


def last_boxed_content(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` in ``text`` (may be empty), or None if there is no closed box."""
    openings = list(_BOX_OPENING.finditer(text))
    if not openings:
        return None
    return _content_until_matching_brace(text, openings[-1].end())


def _content_until_matching_brace(text: str, start: int) -> Optional[str]:
    """``text[start:end]``, ``text[end]`` being the ``}`` that closes the ``{`` before ``start``; None if unclosed."""
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":  # skip the escaped character: \{ and \} do not open or close, \\ is a line break
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None
