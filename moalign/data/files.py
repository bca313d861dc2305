"""Data from files: verl-format parquet folders (MATH-500), generic JSONL/parquet tables, and MATH-500 from the
Hugging Face Hub.

Every problem with the data raises one ``UserError`` naming the file, the row when it is row-level (``line N`` of
a JSONL file, counting from 1 as editors do; ``row N`` of a parquet file, counting from 0 as pandas does) and
the column.

Splitting follows the paper's preprocessing (``scripts/math500.py`` of the authors' code, HF ``datasets``
``train_test_split``): draw a permutation π of the n rows from ``numpy.random.default_rng(seed)``; the first
⌈h·n⌉ rows of π are held out and the next n − ⌈h·n⌉ are train; the held-out rows are split again the same way
with h = 0.5, its first half becoming val and its second half test. MATH-500 uses h = 0.4, seed 42
(300/100/100); a single generic file uses h = 0.2 and ``data.seed`` (80/10/10).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np

from moalign.data.base import SPLIT_NAMES, Example, Splits, make_example, with_suffix
from moalign.errors import UserError

TABLE_FORMATS = (".jsonl", ".parquet")
GENERIC_COLUMNS = "each row needs 'prompt' (the question text) and 'answer' (the ground truth)"
T = TypeVar("T")

Row = tuple[str, dict[str, Any]]  # (where: "file line N" / "file row N", the row's columns)


# ---- reading tables -----------------------------------------------------------------------------------------

def read_rows(path: Path) -> list[Row]:
    """The rows of a ``.jsonl`` or ``.parquet`` file, each with its location for error messages."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
    if not rows:
        raise UserError(f"{path}: the file has no rows")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the file ({exc})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object with columns, got {type(row).__name__}")
        rows.append((where, row))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt or foreign files
        raise UserError(f"{path}: cannot read the parquet file ({type(exc).__name__}: {exc})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(frame.to_dict("records"))]


def column(row: Row, name: str, hint: str) -> Any:
    """The value of column ``name``, or a ``UserError`` listing the columns the row has."""
    where, values = row
    if name not in values:
        raise UserError(f"{where}: missing column {name!r}; {hint} (found: {', '.join(map(str, values)) or 'none'})")
    return values[name]


# ---- splitting ----------------------------------------------------------------------------------------------

def holdout_split(items: Sequence[T], holdout_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """``(train, held_out)`` exactly as HF ``Dataset.train_test_split(test_size=h, seed=seed)``."""
    n_held = math.ceil(holdout_fraction * len(items))
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order[n_held:]], [items[i] for i in order[:n_held]]


def three_way_split(items: Sequence[T], holdout_fraction: float, seed: int) -> tuple[list[T], list[T], list[T]]:
    """``(train, val, test)`` as the paper's preprocessing splits MATH-500 (see the module docstring)."""
    train, held_out = holdout_split(items, holdout_fraction, seed)
    test, val = holdout_split(held_out, 0.5, seed)
    return train, val, test


def paper_split(items: Sequence[T]) -> tuple[list[T], list[T], list[T]]:
    """The paper's MATH-500 split: 300 train / 100 val / 100 test of the 500 problems."""
    return three_way_split(items, 0.4, seed=42)


# ---- verl parquet folders (MATH-500) ------------------------------------------------------------------------

def verl_example(row: Row, default_id: str) -> Example:
    """One verl row: ``prompt`` = [{role: user, content: ...}], ``reward_model`` = {ground_truth: ...}."""
    where, values = row
    messages = column(row, "prompt", "verl rows need 'prompt' and 'reward_model'")
    if not isinstance(messages, (list, tuple, np.ndarray)) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise UserError(f"{where}: column 'prompt' must be a list with one chat message "
                        "{'role': 'user', 'content': ...}")
    reward_model = column(row, "reward_model", "verl rows need 'prompt' and 'reward_model'")
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise UserError(f"{where}: column 'reward_model' must be a dict with a 'ground_truth' key")
    return make_example(where, str(values.get("unique_id") or default_id), messages[0].get("content"),
                        reward_model["ground_truth"], prompt_column="prompt[0].content",
                        answer_column="reward_model.ground_truth")


def load_verl_folder(folder: Path) -> Splits:
    """A folder with verl-format ``train.parquet``, ``val.parquet`` and ``test.parquet`` (prompts used as is)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found; data.source='math500' needs a folder with "
                        "train.parquet, val.parquet and test.parquet")
    splits = []
    for split in SPLIT_NAMES:
        rows = read_rows(folder / f"{split}.parquet")
        splits.append([verl_example(row, default_id=f"{split}-{i}") for i, row in enumerate(rows)])
    return Splits(*splits)


# ---- generic prompt/answer tables ---------------------------------------------------------------------------

def table_examples(path: Path, prompt_suffix: str) -> list[Example]:
    """The examples of one JSONL/parquet file with ``prompt`` and ``answer`` columns (an ``id`` column is
    optional)."""
    examples = []
    for i, row in enumerate(read_rows(path)):
        where, values = row
        prompt = column(row, "prompt", GENERIC_COLUMNS)
        answer = column(row, "answer", GENERIC_COLUMNS)
        example = make_example(where, str(values.get("id") or f"{path.stem}-{i}"), prompt, answer)
        examples.append(suffixed(example, prompt_suffix))
    return examples


def suffixed(example: Example, prompt_suffix: str) -> Example:
    return dataclasses.replace(example, prompt=with_suffix(example.prompt, prompt_suffix))


def _split_file(folder: Path, split: str) -> Path:
    candidates = [folder / f"{split}{ext}" for ext in TABLE_FORMATS]
    found = [p for p in candidates if p.is_file()]
    if len(found) != 1:
        problem = "both" if found else "missing"
        raise UserError(f"{folder}: {problem} {split}.jsonl / {split}.parquet; a data folder needs exactly one "
                        "train, val and test file each (or pass a single file to split it 80/10/10)")
    return found[0]


def load_tables(path: Path, prompt_suffix: str, seed: int) -> Splits:
    """A folder with train/val/test files, or one file split 80/10/10 with ``seed``."""
    if path.is_dir():
        return Splits(*(table_examples(_split_file(path, split), prompt_suffix) for split in SPLIT_NAMES))
    examples = table_examples(path, prompt_suffix)
    if len(examples) < 10:
        raise UserError(f"{path}: {len(examples)} rows are too few to split 80/10/10 (need ≥ 10); add rows or "
                        "give a folder with train, val and test files")
    return Splits(*three_way_split(examples, 0.2, seed))


# ---- MATH-500 from the Hugging Face Hub ---------------------------------------------------------------------

def load_hub(hub_id: str, prompt_suffix: str) -> Splits:
    """MATH-500 (``problem``/``answer``/``unique_id`` columns, one ``test`` split of 500) split as in the paper."""
    local_hint = ("download it once and use data.source='math500' with data.path=<folder of verl parquet "
                  "files> (or data.source='files')")
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.source='hub' needs the `datasets` package (pip install 'moalign[hub]'); or "
                        f"{local_hint}") from None
    try:
        table = datasets.load_dataset(hub_id, split="test")
    except Exception as exc:  # no network, unknown id, ...: all fixed the same way
        raise UserError(f"could not load {hub_id!r} from the Hugging Face Hub ({type(exc).__name__}); "
                        f"{local_hint}") from None
    hint = "MATH-500 rows have 'problem' and 'answer'"
    examples = []
    for i, values in enumerate(table):
        row = (f"{hub_id} row {i}", values)
        example = make_example(row[0], str(values.get("unique_id") or f"math500-{i}"), column(row, "problem", hint),
                               column(row, "answer", hint), prompt_column="problem")
        examples.append(suffixed(example, prompt_suffix))
    return Splits(*paper_split(examples))
