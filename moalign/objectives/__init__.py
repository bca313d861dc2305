"""Objectives: one reward per (prompt, completion, answer) sample.

Built-ins (METHOD §5): ``accuracy``, ``conciseness``, ``clarity`` (the paper's rule), ``clarity_refined`` and the
correctness-gated ``gated_conciseness``, ``gated_clarity``, ``gated_clarity_refined``. Any other objective is a
user function (see ``user``).

``load_objective(spec)`` accepts:

- ``"accuracy"``                      a built-in, by name;
- ``"my_pkg.rewards:politeness"``     a user function, named after the function (``politeness``);
- ``"polite=my_pkg.rewards:politeness"``  the same, named ``polite``;
- ``{"function": "my_pkg.rewards:politeness", "name": "polite", "timeout_s": 5}``  with the optional
  per-sample time bound (default 10 s; None: no bound); ``{"name": "accuracy"}`` is the built-in.
"""

from __future__ import annotations

import math
from typing import Any, Union

from moalign.errors import UserError
from moalign.objectives import accuracy, clarity, conciseness, gated  # noqa: F401  (registers the built-ins)
from moalign.objectives.base import (
    OBJECTIVES,
    Objective,
    Sample,
    ScoreResult,
    ScoringBatch,
)
from moalign.objectives.user import (
    DEFAULT_TIMEOUT_S,
    UserObjective,
    load_user_objective,
)

DEFAULT_OBJECTIVES = ("accuracy", "conciseness", "clarity")

__all__ = ["OBJECTIVES", "DEFAULT_OBJECTIVES", "Objective", "Sample", "ScoringBatch", "ScoreResult",
           "UserObjective", "load_objective"]

_DICT_KEYS = {"name", "function", "timeout_s"}


def load_objective(spec: Union[str, dict[str, Any]]) -> Objective:
    """A fresh objective for ``spec`` (forms in the module docstring); UserError if it cannot be resolved."""
    if isinstance(spec, dict):
        return _load_from_dict(spec)
    if not isinstance(spec, str):
        raise UserError(f"objective {spec!r} must be a name, 'package.module:function' or a dict; got "
                        f"{type(spec).__name__}")
    spec = spec.strip()
    if spec in OBJECTIVES:
        return OBJECTIVES.get(spec)()
    name, equals, function = spec.rpartition("=")  # no "=": name is ""
    if equals and not name.strip():
        raise UserError(f"objective {spec!r} has an empty name before '='; write name=package.module:function")
    if ":" not in function:
        raise UserError(f"unknown objective {spec!r}; valid built-ins: {', '.join(OBJECTIVES.names())}, "
                        f"or give a user function as package.module:function")
    return load_user_objective(function.strip(), name=name.strip() or None)


def _load_from_dict(spec: dict[str, Any]) -> Objective:
    unknown = set(spec) - _DICT_KEYS
    if unknown:
        raise UserError(f"objective {spec!r} has unknown keys {sorted(unknown)}; allowed: {sorted(_DICT_KEYS)}")
    if "function" not in spec:
        if "name" not in spec:
            raise UserError(f"objective {spec!r} needs 'function' (package.module:function) or a built-in 'name'")
        return load_objective(str(spec["name"]))
    timeout_s = spec.get("timeout_s", DEFAULT_TIMEOUT_S)
    if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf):
        raise UserError(f"objective {spec!r}: timeout_s must be a positive, finite number of seconds or null (no bound)")
    return load_user_objective(str(spec["function"]), name=spec.get("name"), timeout_s=timeout_s)
