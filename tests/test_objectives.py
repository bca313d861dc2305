"""Objectives: box extraction, accuracy, conciseness, clarity, gated variants and user functions."""

import math
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from moalign.errors import UserError  # noqa: E402
from moalign.objectives import (  # noqa: E402
    DEFAULT_OBJECTIVES,
    OBJECTIVES,
    Objective,
    Sample,
    ScoringBatch,
    UserObjective,
    load_objective,
)
from moalign.objectives import accuracy as accuracy_module  # noqa: E402
from moalign.objectives.accuracy import Accuracy, answers_equivalent  # noqa: E402
from moalign.objectives.boxed import last_boxed_content  # noqa: E402
from moalign.objectives.clarity import (  # noqa: E402
    Clarity,
    ClarityRefined,
    paper_step_markers,
    refined_step_markers,
)
from moalign.objectives.conciseness import Conciseness  # noqa: E402
from moalign.objectives.gated import Gated  # noqa: E402


def sample(completion: str, answer: str = "", num_tokens: int = 10, prompt: str = "What is it?") -> Sample:
    return Sample(prompt, completion, answer, num_tokens)


def scores(objective: Objective, *samples: Sample) -> list[float]:
    return objective.score(ScoringBatch(list(samples))).values.tolist()


def lengths_batch(*num_tokens: int) -> ScoringBatch:
    return ScoringBatch([sample("text", num_tokens=n) for n in num_tokens])


# ------------------------------------------------------------------------------------------------ boxes


@pytest.mark.parametrize("text, content", [
    (r"so \boxed{8}.", "8"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{\sqrt{\frac{a}{b^{2}}}} end", r"\sqrt{\frac{a}{b^{2}}}"),
    (r"\boxed{}", ""),  # empty box: a box, empty content
    (r"first \boxed{3}, finally \boxed{8}", "8"),  # several boxes: the last wins
    (r"\boxed {x+1}", "x+1"),  # space before the brace
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are content
    (r"\boxed{\boxed{5}}", "5"),  # the last \boxed is the inner one
    ("no box here: 8", None),
    (r"\boxed{8} then cut off \boxed{\frac{1}{2", None),  # last box unclosed: no answer
])
def test_last_boxed_content(text, content):
    assert last_boxed_content(text) == content


# ------------------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("completion, answer, expected", [
    (r"The answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac12}", "0.5", 1.0),
    (r"\boxed{\frac12}", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.5}", r"\boxed{\frac{1}{2}}", 1.0),  # boxed ground truth
    (r"\boxed{8}", "8", 1.0),
    (r"\boxed{9}", "8", 0.0),  # wrong
    (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
    ("The answer is 8.", "8", 0.0),  # no box
    (r"\boxed{}", "0", 0.0),  # empty box
    (r"\boxed{ }", "0", 0.0),
    (r"first \boxed{3}, corrected: \boxed{8}", "8", 1.0),  # several boxes: the last one counts
    (r"first \boxed{8}, corrected: \boxed{3}", "8", 0.0),
    (r"\boxed{8} and then \boxed{9", "8", 0.0),  # truncated final box
])
def test_accuracy(completion, answer, expected):
    assert scores(Accuracy(), sample(completion, answer)) == [expected]


def test_accuracy_fast_path_needs_no_sympy(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("math-verify called for strings that are equal up to whitespace")

    monkeypatch.setattr(accuracy_module, "parse", fail)
    assert answers_equivalent(r"\frac {1}{2}", r"\frac{1}{2}")


def test_accuracy_outside_the_main_thread():
    """math-verify's signal-based timeouts must be switched off in worker threads (else every sample is NaN)."""
    batch = ScoringBatch([sample(r"\boxed{0.5}", r"\frac{1}{2}"), sample(r"\boxed{2}", "3")])
    results = []
    worker = threading.Thread(target=lambda: results.append(Accuracy().score(batch)))
    worker.start()
    worker.join(timeout=60)
    assert results[0].values.tolist() == [1.0, 0.0]
    assert results[0].errors == []


# ------------------------------------------------------------------------------------------------ conciseness


def test_conciseness_before_any_statistic_everything_scores_one():
    assert scores(Conciseness(), sample("x", num_tokens=1), sample("x", num_tokens=10_000)) == [1.0, 1.0]


def test_conciseness_running_mean_includes_the_current_batch():
    objective = Conciseness()
    first = lengths_batch(10, 20, 30, 40)  # mean 100/4 = 25
    objective.observe(first)
    assert objective.score(first).values.tolist() == [1.0, 1.0, 0.0, 0.0]
    second = lengths_batch(25, 5)  # mean over both batches (100 + 30)/6 = 21.67
    objective.observe(second)
    assert objective.mean_length == pytest.approx(130 / 6)
    assert objective.score(second).values.tolist() == [0.0, 1.0]


def test_conciseness_length_equal_to_mean_is_not_concise():
    objective = Conciseness()
    batch = lengths_batch(10, 20, 30)  # mean exactly 20
    objective.observe(batch)
    assert objective.score(batch).values.tolist() == [1.0, 0.0, 0.0]


def test_conciseness_threshold_is_exact_for_fractional_means():
    objective = Conciseness()
    objective.observe(lengths_batch(1, 1, 2))  # mean 4/3
    assert scores(objective, sample("x", num_tokens=1), sample("x", num_tokens=2)) == [1.0, 0.0]


def test_conciseness_evaluation_does_not_change_the_state():
    objective = Conciseness()
    objective.observe(lengths_batch(10, 30))
    before = objective.state_dict()
    objective.score(lengths_batch(1000, 1000, 1000))  # evaluation: score only
    assert objective.state_dict() == before == {"count": 2, "total_tokens": 40}
    assert scores(objective, sample("x", num_tokens=19)) == [1.0]


def test_conciseness_state_round_trip_resumes_exactly():
    uninterrupted, first_half = Conciseness(), Conciseness()
    for objective in (uninterrupted, first_half):
        objective.observe(lengths_batch(7, 8, 9))
    resumed = Conciseness()
    resumed.load_state_dict(first_half.state_dict())
    assert resumed.state_dict() == {"count": 3, "total_tokens": 24}
    later = lengths_batch(3, 20)  # mean (24 + 23)/5 = 9.4
    for objective in (uninterrupted, resumed):
        objective.observe(later)
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.score(later).values.tolist() == uninterrupted.score(later).values.tolist() == [1.0, 0.0]


def test_conciseness_rejects_a_damaged_state():
    with pytest.raises(UserError, match="conciseness state"):
        Conciseness().load_state_dict({"count": 3})


# ------------------------------------------------------------------------------------------------ clarity

BOX = r" So the answer is \boxed{4}."


@pytest.mark.parametrize("rule", [Clarity, ClarityRefined])
@pytest.mark.parametrize("text", [
    "1. Add the numbers.\n2. Divide by two.",
    "1) Add the numbers\n2) Divide by two",
    "Step 1: add. Step 2: divide.",
    "step1. add\nstep2. divide",
    "**Step 1:** add\n**Step 2:** divide",  # bold markers: the digits are still whitespace-bounded
    "a) add\nb) divide",
    "(i) add (ii) divide",
    "ii. add\niii. divide",
    "IV. add\nV. divide",
    "- add\n- divide",
    "* add\n* divide",
    "• add\n• divide",
    "  - indented bullet\n  - another",
    "1. add\n- a remark",  # numbered and bulleted enumerators are counted together
    "First add the numbers, then divide.",
    "Second, divide. Next, round.",
    "The sum is 8. Halving gives 4.",  # sentence-final numbers read as enumerators (documented ambiguity)
])
def test_clarity_steps_and_box_score_one(rule, text):
    assert scores(rule(), sample(text + BOX)) == [1.0]


@pytest.mark.parametrize("rule", [Clarity, ClarityRefined])
@pytest.mark.parametrize("text", [
    "1. Add the numbers and divide by two.",  # a single step
    "First, add the numbers and halve.",  # a single ordinal
    "Firstly, we add; thenceforth we divide",  # ordinals are whole words
    "Did mix the civil numbers",  # no closing punctuation
])
def test_clarity_without_two_steps_scores_zero(rule, text):
    assert scores(rule(), sample(text + BOX)) == [0.0]


@pytest.mark.parametrize("text", [
    "x = 3.5 and y = 0.5, so x + y = 4",  # " 3." and " 0.": decimals
    "Times 3-4 and 1:30 e.g. here, i.e. there",  # punctuation followed by a letter or digit
    "We get 9 - 3 - 2 = 4 and 2 * 2 = 4",  # inline minus and times read as bullets
    "Did mix. the civil. numbers",  # any run of the letters i v x l c d m is a numeral
])
def test_the_papers_rule_counts_mathematics_the_refined_rule_does_not(text):
    """The authors' pattern takes these for steps (clarity 1); the refinements exclude them (clarity 0)."""
    assert scores(Clarity(), sample(text + BOX)) == [1.0]
    assert scores(ClarityRefined(), sample(text + BOX)) == [0.0]


def test_the_papers_rule_counts_non_overlapping_matches():
    """The paper's boundary (and a bullet's trailing blanks) belong to the match: in "- 1." the bullet consumes
    the space before "1.", which then has no boundary of its own: one marker. The refined rule looks behind and
    counts two. Across a line break both count: the next line starts at its own "^"."""
    assert paper_step_markers("- 1. add") == 1 and refined_step_markers("- 1. add") == 2
    assert scores(Clarity(), sample("- 1. add" + BOX)) == [0.0]
    assert scores(ClarityRefined(), sample("- 1. add" + BOX)) == [1.0]
    assert paper_step_markers("-\n1. add") == 2
    assert paper_step_markers("1. 2. 3.") == 3  # the blank before "2." is that marker's boundary
    assert paper_step_markers("- - x") == 1  # the first bullet took the blank the second needed


@pytest.mark.parametrize("completion, expected", [
    ("1. add\n2. divide\nthe answer is 4", 0.0),  # box missing
    ("1. add\n2. divide " + r"\boxed{ }", 0.0),  # empty box
    ("1. add\n2. divide " + r"\boxed{}", 0.0),
    ("1. add\n2. divide " + r"\boxed{ 4}", 1.0),  # leading blank tolerated
    ("1. add\n2. divide " + r"\boxed{\frac{1}{2}}", 1.0),
])
@pytest.mark.parametrize("rule", [Clarity, ClarityRefined])
def test_clarity_needs_a_non_empty_box(rule, completion, expected):
    assert scores(rule(), sample(completion)) == [expected]


MATH500 = Path("/work/shared/data/math500")


@pytest.mark.skipif(not MATH500.is_dir(), reason="shared MATH-500 files not present")
def test_clarity_rules_on_the_math500_reference_solutions():
    """The 500 reference solutions: the paper's rule 302/500 = 0.604, the refined one 238/500 = 0.476; the 64 texts
    where they differ all score 0 under the refined rule."""
    import pandas as pd

    texts = [t for split in ("train", "val", "test") for t in pd.read_parquet(MATH500 / f"{split}.parquet")["solution"]]
    paper = scores(Clarity(), *[sample(t) for t in texts])
    refined = scores(ClarityRefined(), *[sample(t) for t in texts])
    assert (len(texts), sum(paper), sum(refined)) == (500, 302.0, 238.0)
    assert all(r == 0.0 for p, r in zip(paper, refined) if p != r)


# ------------------------------------------------------------------------------------------------ gated


class Raising(Objective):
    name = "raising"

    def score_one(self, sample: Sample) -> float:
        raise RuntimeError("broken scorer")


def test_gated_conciseness_is_zero_unless_correct_and_observes_through_the_wrapper():
    objective = OBJECTIVES.get("gated_conciseness")()
    batch = ScoringBatch([
        sample(r"\boxed{2}", "2", num_tokens=5),  # correct, short
        sample(r"\boxed{2}", "2", num_tokens=50),  # correct, long
        sample(r"\boxed{3}", "2", num_tokens=5),  # wrong, short
    ])  # mean length 60/3 = 20: conciseness [1, 0, 1], accuracy [1, 1, 0]
    objective.observe(batch)
    assert objective.score(batch).values.tolist() == [1.0, 0.0, 0.0]
    assert objective.state_dict() == {"inner": {"count": 3, "total_tokens": 60}, "gate": {}}
    resumed = OBJECTIVES.get("gated_conciseness")()
    resumed.load_state_dict(objective.state_dict())
    assert resumed.state_dict() == objective.state_dict()


@pytest.mark.parametrize("name", ["gated_clarity", "gated_clarity_refined"])
def test_gated_clarity_is_zero_unless_correct(name):
    steps = "1. add\n2. divide\n"
    objective = OBJECTIVES.get(name)()
    assert scores(objective,
                  sample(steps + r"\boxed{4}", "4"),  # clear, correct
                  sample(steps + r"\boxed{4}", "5"),  # clear, wrong
                  sample(r"just \boxed{4}", "4"),  # correct, no steps
                  ) == [1.0, 0.0, 0.0]
    decimals = "x = 3.5 and y = 0.5 " + r"\boxed{4}"  # steps for the paper's rule only
    assert scores(objective, sample(decimals, "4")) == [1.0 if name == "gated_clarity" else 0.0]


def test_gated_missing_gate_is_missing_and_missing_inner_only_matters_when_correct():
    failing_gate = Gated(inner=Clarity(), gate=Raising())
    result = failing_gate.score(ScoringBatch([sample("1. a\n2. b " + r"\boxed{4}", "4")]))
    assert math.isnan(result.values[0]) and result.num_missing == 1
    assert "broken scorer" in result.errors[0] and result.errors[0].startswith("gated_clarity")
    failing_inner = Gated(inner=Raising(), gate=Accuracy())
    values = scores(failing_inner, sample(r"\boxed{4}", "4"), sample(r"\boxed{5}", "4"))
    assert math.isnan(values[0]) and values[1] == 0.0


# ------------------------------------------------------------------------------------------------ user objectives

USER_MODULE = '''
import threading
RELEASE = threading.Event()
NOT_CALLABLE = 3

def length_tenths(prompt, completion, answer):
    return len(completion) / 10

def twice_tokens(prompt, completion, answer, num_tokens):
    return 2 * num_tokens

def boom(prompt, completion, answer):
    raise ValueError("bad input")

def own_timeout(prompt, completion, answer):
    raise TimeoutError("upstream API")

def not_a_number(prompt, completion, answer):
    return float("nan")

def words(prompt, completion, answer):
    return "high"

def two_args(prompt, completion):
    return 1.0

def hang(prompt, completion, answer):
    RELEASE.wait(30)
    return 1.0
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh importable module holding the user functions; returns its name."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    module = sys.modules.get(name)
    if module is not None:
        module.RELEASE.set()  # let an abandoned hanging call finish


def test_load_builtins_gives_fresh_instances():
    assert DEFAULT_OBJECTIVES == ("accuracy", "conciseness", "clarity")
    assert set(OBJECTIVES.names()) == {"accuracy", "conciseness", "clarity", "clarity_refined", "gated_conciseness",
                                       "gated_clarity", "gated_clarity_refined"}
    first, second = load_objective("conciseness"), load_objective({"name": "conciseness"})
    first.observe(lengths_batch(10))
    assert first.state_dict() == {"count": 1, "total_tokens": 10}
    assert second.state_dict() == {"count": 0, "total_tokens": 0}
    assert isinstance(load_objective(" accuracy "), Accuracy)


def test_user_function_scores_and_is_named_after_the_function(user_module):
    objective = load_objective(f"{user_module}:length_tenths")
    assert isinstance(objective, UserObjective) and objective.name == "length_tenths"
    assert scores(objective, sample("abcde"), sample("")) == [0.5, 0.0]


def test_user_function_named_and_given_num_tokens(user_module):
    renamed = load_objective(f"tokens={user_module}:twice_tokens")
    assert renamed.name == "tokens"
    assert scores(renamed, sample("x", num_tokens=7)) == [14.0]
    from_dict = load_objective({"function": f"{user_module}:twice_tokens", "name": "t2", "timeout_s": 1})
    assert from_dict.name == "t2" and from_dict.timeout_s == 1


@pytest.mark.parametrize("function, message", [
    ("boom", "ValueError: bad input"),
    ("own_timeout", "TimeoutError: upstream API"),  # the function's own error, not our time bound
    ("not_a_number", "non-finite"),
    ("words", "returned str"),
])
def test_user_function_failures_are_missing_with_a_message(user_module, function, message):
    result = load_objective(f"{user_module}:{function}").score(ScoringBatch([sample("x"), sample("y")]))
    assert torch.isnan(result.values).all() and result.num_missing == 2
    assert len(result.errors) == 2 and message in result.errors[0] and result.errors[0].startswith(function)


def test_hanging_user_function_times_out(user_module):
    objective = load_objective({"function": f"{user_module}:hang", "timeout_s": 0.2})
    start = time.monotonic()
    result = objective.score(ScoringBatch([sample("x")]))
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 2.0
    assert result.num_missing == 1 and "timed out after 0.2s" in result.errors[0]


@pytest.mark.parametrize("spec, message", [
    ("no_such_objective", "unknown objective 'no_such_objective'.*package.module:function"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'.*PYTHONPATH"),
    ("{module}:absent", "has no attribute 'absent'"),
    ("{module}:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a function"),
    ("{module}:two_args", "cannot be called as fn\\(prompt, completion, answer\\)"),
    (":boom", "nor of the form package.module:function"),
    ("{module}:", "nor of the form package.module:function"),
    ("={module}:boom", "empty name"),
    ({"function": "{module}:boom", "timeout_s": -1}, "timeout_s must be a positive"),
    ({"function": "{module}:boom", "timeout_s": float("inf")}, "timeout_s must be a positive, finite number"),
    ({"function": "{module}:boom", "weight": 2}, "unknown keys \\['weight'\\]"),
    ({"timeout_s": 3}, "needs 'function'"),
])
def test_bad_specs_raise_one_line_user_errors(user_module, spec, message):
    if isinstance(spec, dict):
        spec = {k: v.format(module=user_module) if isinstance(v, str) else v for k, v in spec.items()}
    else:
        spec = spec.format(module=user_module)
    with pytest.raises(UserError, match=message) as excinfo:
        load_objective(spec)
    assert "\n" not in str(excinfo.value)
