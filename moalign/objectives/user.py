"""User objectives: any Python function ``fn(prompt, completion, answer) -> float``, named ``package.module:fn``.

A function that also declares a ``num_tokens`` parameter receives the response length in tokens. Each call is
time-bounded: it runs in a worker thread and a sample whose call takes longer than ``timeout_s`` gets a missing
reward (NaN) with the message "timed out after Xs", like a call that raises or returns a non-number (see
``base``). Python cannot stop a thread, so a timed-out call is abandoned, still running, in a daemon thread (it
cannot keep the process from exiting); a function that hangs on every sample costs ``timeout_s`` per sample.
Because calls run outside the main thread, the function cannot rely on ``signal`` (e.g. math-verify's default
timeouts: pass ``parsing_timeout=None, timeout_seconds=None`` there).
"""

from __future__ import annotations

import importlib
import inspect
import threading
from concurrent.futures import Future
from concurrent.futures import (
    TimeoutError as FutureTimeout,  # an alias of the builtin one only from 3.11
)
from typing import Any, Callable, Optional

from moalign.errors import UserError
from moalign.objectives.base import Objective, Sample

DEFAULT_TIMEOUT_S = 10.0
SPEC_FORM = "package.module:function"


class UserObjective(Objective):
    """Wraps ``fn(prompt, completion, answer[, num_tokens=...]) -> float``; ``timeout_s=None`` disables the bound."""

    def __init__(self, fn: Callable[..., Any], name: str, timeout_s: Optional[float] = DEFAULT_TIMEOUT_S) -> None:
        self.fn = fn
        self.name = name
        self.description = f"user function {getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', name)}"
        self.timeout_s = timeout_s
        self.wants_num_tokens = _declares_parameter(fn, "num_tokens")

    def score_one(self, sample: Sample) -> float:
        kwargs = {"num_tokens": sample.num_tokens} if self.wants_num_tokens else {}
        return call_with_timeout(self.fn, (sample.prompt, sample.completion, sample.answer), kwargs, self.timeout_s)


def call_with_timeout(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], timeout_s: Optional[float]) -> Any:
    """``fn(*args, **kwargs)``, raising TimeoutError if it has not returned within ``timeout_s`` seconds.

    A worker thread rather than ``signal.alarm``: signals only work in the main thread and the engine may score
    from another one.
    """
    if timeout_s is None:
        return fn(*args, **kwargs)
    outcome: Future = Future()

    def work() -> None:
        try:
            outcome.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # also SystemExit & co., so they surface here instead of as a timeout
            outcome.set_exception(exc if isinstance(exc, Exception) else RuntimeError(f"raised {exc!r}"))

    threading.Thread(target=work, name=f"objective:{getattr(fn, '__name__', 'fn')}", daemon=True).start()
    try:
        return outcome.result(timeout=timeout_s)
    except FutureTimeout:
        if outcome.done():  # it raised TimeoutError itself, or finished just after the deadline
            return outcome.result()
        raise TimeoutError(f"timed out after {timeout_s:g}s") from None


def load_user_objective(spec: str, name: Optional[str] = None,
                        timeout_s: Optional[float] = DEFAULT_TIMEOUT_S) -> UserObjective:
    """The objective for ``spec`` = ``package.module:function``; its name is ``name`` or the function's name as the
    spec writes it (what readers of a run derive from its config, ``diagnostics.runs``)."""
    fn = import_function(spec)
    return UserObjective(fn, name or spec.rpartition(":")[2].strip(), timeout_s)


def import_function(spec: str) -> Callable[..., Any]:
    """Import ``package.module:function`` and check that it can be called as ``fn(prompt, completion, answer)``."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise UserError(f"objective {spec!r} is neither a built-in objective nor of the form {SPEC_FORM}; "
                        f"write it as e.g. my_rewards.math:politeness")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, or the module itself fails to import
        raise UserError(f"objective {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
                        f"install it or add its folder to PYTHONPATH") from exc
    if not hasattr(module, attribute):
        raise UserError(f"objective {spec!r}: module {module_name!r} has no attribute {attribute!r}; "
                        f"check the function name after the colon")
    fn = getattr(module, attribute)
    if not callable(fn):
        raise UserError(f"objective {spec!r}: {attribute!r} is a {type(fn).__name__}, not a function; "
                        f"point to a function fn(prompt, completion, answer) -> float")
    _check_signature(spec, fn)
    return fn


def _check_signature(spec: str, fn: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-ins have no introspectable signature: trust the user
        return
    kwargs = {"num_tokens": 0} if "num_tokens" in signature.parameters else {}
    try:
        signature.bind("prompt", "completion", "answer", **kwargs)
    except TypeError as exc:
        raise UserError(f"objective {spec!r}: signature {signature} cannot be called as "
                        f"fn(prompt, completion, answer) ({exc}); change the function's parameters") from exc


def _declares_parameter(fn: Callable[..., Any], parameter: str) -> bool:
    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
