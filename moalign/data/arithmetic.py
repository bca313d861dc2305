"""Seeded arithmetic word problems, with their worked solutions.

Difficulty levels:

1. one addition or subtraction of small numbers;
2. two additions/subtractions;
3. a multiplication (alone or with one addition/subtraction);
4. three steps, one of them a multiplication;
5. larger numbers and/or an exact division.

A problem is a ``Template`` (story text with number slots and a program of steps such as ``"b × c"``,
``"a + _"``, where ``_`` is the previous step's result) filled with a name, an item and random numbers; numbers
are redrawn until every step is valid (no negative results, exact divisions). The answer is the last step's
result, an integer.

**Which split a problem belongs to depends only on its question text**:
``bucket = blake2b(question) mod 10``; bucket 0 → test, 1 → val, 2..9 → train. So splits are disjoint for
every seed and difficulty, and a model warmed up on any train split (the ``tiny`` model) has never seen a
val or test question of any seed. Each split is drawn from its own random stream
(``Random(f"{seed}-{difficulty}-{split}")``), so its content does not depend on the other splits' sizes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from moalign.data.base import DataConfig, Example, Splits
from moalign.errors import UserError

OPERATIONS = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: x - y,
    "×": lambda x, y: x * y,
    "÷": lambda x, y: x // y,
}
PREVIOUS = "_"  # in a template program: the previous step's result

NAMES = [("Tom", "he"), ("Mia", "she"), ("Sam", "he"), ("Ava", "she"), ("Leo", "he"), ("Zoe", "she"),
         ("Ben", "he"), ("Lily", "she"), ("Max", "he"), ("Emma", "she"), ("Omar", "he"), ("Nina", "she")]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "stamps",
         "balloons", "oranges", "coins"]


@dataclass(frozen=True)
class Step:
    """One line of a worked solution: ``left op right = result``."""

    left: int
    op: str
    right: int
    result: int

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.result}"


@dataclass(frozen=True)
class ArithmeticProblem:
    question: str
    steps: tuple[Step, ...]
    difficulty: int

    @property
    def answer(self) -> int:
        return self.steps[-1].result


def solution_steps(problem: ArithmeticProblem) -> list[str]:
    """The worked solution, one equation per step, e.g. ``["3 × 4 = 12", "5 + 12 = 17"]``."""
    return [str(step) for step in problem.steps]


@dataclass(frozen=True)
class Template:
    """Story text with slots ``{name} {he} {He} {item}`` and number slots ``{a} {b} ...``, and its program.

    ``program`` lists the steps in order, each ``"x op y"`` with x, y number slots or ``_`` (previous result).
    ``ranges`` overrides the difficulty's default number range for some slots (e.g. a small divisor).
    """

    text: str
    program: tuple[str, ...]
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    def slots(self) -> list[str]:
        """Number slots, in order of first use in the program."""
        names = [tok for line in self.program for tok in line.split()[::2] if tok != PREVIOUS]
        return list(dict.fromkeys(names))

    def run(self, numbers: dict[str, int]) -> tuple[Step, ...] | None:
        """The steps for these numbers, or ``None`` if a step is invalid (negative result, inexact division)."""
        steps: list[Step] = []
        for line in self.program:
            x, op, y = line.split()
            left = steps[-1].result if x == PREVIOUS else numbers[x]
            right = steps[-1].result if y == PREVIOUS else numbers[y]
            if op == "÷" and (right == 0 or left % right != 0):
                return None
            result = OPERATIONS[op](left, right)
            if result < 0:
                return None
            steps.append(Step(left, op, right, result))
        return tuple(steps)


T = Template
TEMPLATES: dict[int, list[Template]] = {
    1: [
        T("{name} has {a} {item} and buys {b} more. How many {item} does {he} have now?", ("a + b",)),
        T("There are {a} {item} in a box. {name} puts {b} more {item} in the box. "
          "How many {item} are in the box now?", ("a + b",)),
        T("{name} found {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {he} find in total?",
          ("a + b",)),
        T("{name} has {a} {item}. {He} gives {b} {item} to a friend. How many {item} does {he} have left?",
          ("a - b",)),
        T("A shelf holds {a} {item}. {name} takes {b} of them. How many {item} are still on the shelf?",
          ("a - b",)),
        T("{name} had {a} {item} and lost {b} of them. How many {item} does {he} have now?", ("a - b",)),
    ],
    2: [
        T("{name} has {a} {item}. {He} buys {b} more and then gives {c} to a friend. "
          "How many {item} does {he} have now?", ("a + b", "_ - c")),
        T("There are {a} {item} in a box. {name} adds {b} {item} and later adds {c} more. "
          "How many {item} are in the box?", ("a + b", "_ + c")),
        T("{name} had {a} {item}. {He} lost {b} of them and then found {c}. How many {item} does {he} have now?",
          ("a - b", "_ + c")),
        T("A shop has {a} {item}. It sells {b} in the morning and {c} in the afternoon. "
          "How many {item} are left?", ("a - b", "_ - c")),
    ],
    3: [
        T("{name} buys {a} bags with {b} {item} in each bag. How many {item} does {he} buy?", ("a × b",)),
        T("{name} has {a} {item} and buys {b} packs of {c} {item} each. How many {item} does {he} have now?",
          ("b × c", "a + _")),
        T("A box has {a} rows of {b} {item}. {name} takes {c} of them. How many {item} are left in the box?",
          ("a × b", "_ - c")),
        T("{name} collects {a} {item} every day for {b} days. How many {item} does {he} collect?", ("a × b",)),
    ],
    4: [
        T("{name} has {a} {item}. {He} buys {b} packs of {c} {item} each and then gives {d} to a friend. "
          "How many {item} does {he} have now?", ("b × c", "a + _", "_ - d")),
        T("A shop has {a} boxes with {b} {item} in each box. It sells {c} {item} and then gets {d} more. "
          "How many {item} does the shop have now?", ("a × b", "_ - c", "_ + d")),
        T("{name} collects {a} {item} every day for {b} days, then loses {c} and finds {d}. "
          "How many {item} does {he} have?", ("a × b", "_ - c", "_ + d")),
        T("There are {a} {item} in a room. {b} children each bring {c} more {item}, and then {d} {item} are "
          "taken away. How many {item} are in the room now?", ("b × c", "a + _", "_ - d")),
    ],
    5: [
        T("{name} has {a} {item} and shares them equally among {b} friends. How many {item} does each friend get?",
          ("a ÷ b",), {"b": (2, 12)}),
        T("{name} buys {a} packs of {b} {item} each and puts them into {c} equal piles. "
          "How many {item} are in each pile?", ("a × b", "_ ÷ c"), {"a": (2, 20), "b": (2, 20), "c": (2, 12)}),
        T("A warehouse has {a} {item} and receives {b} more. The {item} are packed into boxes of {c}. "
          "How many boxes are filled?", ("a + b", "_ ÷ c"), {"c": (2, 12)}),
        T("A school has {a} classes with {b} students each. {c} students are absent today. "
          "How many students are at school?", ("a × b", "_ - c"), {"a": (10, 40), "b": (15, 35)}),
        T("{name} has {a} {item}, buys {b} more and then sells {c}. How many {item} does {he} have now?",
          ("a + b", "_ - c")),
    ],
}
NUMBER_RANGES = {1: (2, 10), 2: (2, 12), 3: (2, 12), 4: (2, 12), 5: (10, 999)}


def split_of(question: str) -> str:
    """The split a question belongs to, a fixed function of its text (10% test, 10% val, 80% train)."""
    bucket = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big") % 10
    return {0: "test", 1: "val"}.get(bucket, "train")


def _draw(rng: random.Random, difficulty: int) -> ArithmeticProblem:
    """One random valid problem of this difficulty (numbers redrawn until every step is valid)."""
    template = rng.choice(TEMPLATES[difficulty])
    name, he = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    while True:
        numbers = {slot: rng.randint(*template.ranges.get(slot, NUMBER_RANGES[difficulty]))
                   for slot in template.slots()}
        steps = template.run(numbers)
        if steps is not None:
            break
    question = template.text.format(name=name, he=he, He=he.capitalize(), item=item, **numbers)
    return ArithmeticProblem(question, steps, difficulty)


# Draws in a row without a new problem after which the split counts as exhausted (≈ 2 s): while at least 1 in 2000
# draws is new, that many misses in a row has probability < e⁻⁵⁰.
GIVE_UP_AFTER_MISSES = 100_000


def generate_problems(difficulty: int, n: int, seed: int, split: str) -> list[ArithmeticProblem]:
    """``n`` distinct problems of one split (deterministic in ``difficulty, seed, split``)."""
    if difficulty not in TEMPLATES:
        raise UserError(f"arithmetic difficulty must be 1..5, got {difficulty}")
    rng = random.Random(f"{seed}-{difficulty}-{split}")
    problems: list[ArithmeticProblem] = []
    seen: set[str] = set()
    misses = 0  # draws since the last new problem: a finite template space cannot fill an unbounded request
    while len(problems) < n and misses < GIVE_UP_AFTER_MISSES:
        problem = _draw(rng, difficulty)
        if problem.question not in seen and split_of(problem.question) == split:
            seen.add(problem.question)
            problems.append(problem)
            misses = 0
        else:
            misses += 1
    if len(problems) == n:
        return problems
    raise UserError(f"could only generate {len(problems)} distinct difficulty-{difficulty} {split} problems "
                    f"(asked for {n}); lower data.num_{split}")


def to_example(problem: ArithmeticProblem, id: str, prompt_suffix: str) -> Example:
    return Example(id=id, prompt=problem.question + prompt_suffix, answer=str(problem.answer))


def arithmetic_splits(cfg: DataConfig) -> Splits:
    sizes = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    splits = {}
    for split, n in sizes.items():
        problems = generate_problems(cfg.difficulty, n, cfg.seed, split)
        splits[split] = [to_example(p, f"arith-d{cfg.difficulty}-s{cfg.seed}-{split}-{i}", cfg.prompt_suffix)
                         for i, p in enumerate(problems)]
    return Splits(**splits)
