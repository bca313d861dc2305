"""User objectives that misbehave, for the reliability tests (``bad_objectives:<function>``; pytest puts tests/ on
sys.path).

Each has the user-objective signature ``fn(prompt, completion, answer) -> float``; the engine must turn every
failure into a missing reward (NaN) and keep training."""

import time


def raises(prompt: str, completion: str, answer: str) -> float:
    raise ValueError("this objective always fails")


def returns_nan(prompt: str, completion: str, answer: str) -> float:
    return float("nan")


def returns_text(prompt: str, completion: str, answer: str) -> str:
    return "very good"


def hangs(prompt: str, completion: str, answer: str) -> float:
    time.sleep(5.0)  # far beyond the test's timeout_s; the abandoned thread ends by itself soon after
    return 1.0


def always_zero(prompt: str, completion: str, answer: str) -> float:
    return 0.0


def always_one(prompt: str, completion: str, answer: str) -> float:
    return 1.0


def accuracy(prompt: str, completion: str, answer: str) -> float:
    """Shares its name with the built-in ``accuracy`` objective."""
    return float(answer in completion)
