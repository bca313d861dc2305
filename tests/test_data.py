"""Data sources: the arithmetic generator, MATH-500 (verl folder, hub split), generic JSONL/parquet tables, and
the errors bad data gives."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from moalign.data import (
    DEFAULT_PROMPT_SUFFIX,
    DataConfig,
    Example,
    generate_problems,
    load_data,
    solution_steps,
)
from moalign.data.arithmetic import split_of
from moalign.data.files import holdout_split, paper_split
from moalign.errors import UserError

MATH500 = Path("/work/shared/data/math500")
STEP = re.compile(r"^(\d+) ([-+×÷]) (\d+) = (\d+)$")
APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y, "÷": lambda x, y: x / y}


# ---- arithmetic ---------------------------------------------------------------------------------------------

def _prompts(splits) -> dict[str, set[str]]:
    return {name: {ex.prompt for ex in examples} for name, examples in splits.items()}


def test_arithmetic_is_deterministic_per_seed_and_differs_across_seeds():
    first, again = load_data(DataConfig(seed=3)), load_data(DataConfig(seed=3))
    other = load_data(DataConfig(seed=4))
    assert first == again
    assert [ex.prompt for ex in first.train] != [ex.prompt for ex in other.train]
    assert [len(x) for _, x in first.items()] == [256, 32, 32]


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arithmetic_splits_are_disjoint_even_across_seeds(difficulty):
    a = _prompts(load_data(DataConfig(difficulty=difficulty, seed=0)))
    b = _prompts(load_data(DataConfig(difficulty=difficulty, seed=1)))
    for x, y in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not a[x] & a[y]
        assert not a[x] & b[y] and not b[x] & a[y]  # a model warmed up on any train split never saw a test prompt
    assert all(len(prompts) == n for prompts, n in zip(a.values(), [256, 32, 32]))  # no duplicates within a split


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arithmetic_answers_follow_from_the_steps(difficulty):
    """Recompute every step, check the chain (each step uses the previous result), that the other operands are
    numbers of the question, and that the answer is the last result."""
    problems = generate_problems(difficulty, 200, seed=7, split="train")
    for problem in problems:
        question_numbers = set(re.findall(r"\d+", problem.question))
        previous = None
        for line in solution_steps(problem):
            left, op, right, result = STEP.match(line).groups()
            assert APPLY[op](int(left), int(right)) == int(result), line
            operands = {left, right}
            if previous is not None:
                assert previous in operands, (problem.question, line)
                operands.discard(previous)
            assert operands <= question_numbers, (problem.question, line)
            previous = result
        assert str(problem.answer) == previous
        assert split_of(problem.question) == "train"


@pytest.mark.parametrize("difficulty,num_steps,needs_op", [(1, {1}, None), (2, {2}, None), (3, {1, 2}, "×"),
                                                          (4, {3}, "×"), (5, {1, 2}, None)])
def test_each_difficulty_has_its_shape(difficulty, num_steps, needs_op):
    problems = generate_problems(difficulty, 100, seed=0, split="train")
    assert {len(p.steps) for p in problems} == num_steps
    ops = [{s.op for s in p.steps} for p in problems]
    if needs_op:
        assert all(needs_op in o for o in ops)
    if difficulty <= 2:
        assert all(o <= {"+", "-"} for o in ops)
    if difficulty == 5:
        assert any("÷" in o for o in ops) and any(max(s.result for s in p.steps) >= 100 for p in problems)
    assert all(p.answer >= 0 for p in problems)
    assert len({p.question.split(" ")[1] for p in problems}) > 3  # varied templates, not one sentence


def test_arithmetic_examples_carry_answer_and_suffix():
    cfg = DataConfig(difficulty=2, num_train=5, num_val=1, num_test=1, seed=2)
    problems = generate_problems(2, 5, seed=2, split="train")
    examples = load_data(cfg).train
    assert [ex.prompt for ex in examples] == [p.question + DEFAULT_PROMPT_SUFFIX for p in problems]
    assert [ex.answer for ex in examples] == [str(p.answer) for p in problems]
    assert len({ex.id for ex in examples}) == 5


def test_max_examples_truncates_every_split():
    splits = load_data(DataConfig(max_examples=4))
    assert [len(x) for _, x in splits.items()] == [4, 4, 4]
    assert splits.train == load_data(DataConfig()).train[:4]


# ---- config validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,field", [({"difficulty": 0}, "difficulty"), ({"difficulty": 6}, "difficulty"),
                                       ({"num_train": 0}, "num_train"), ({"num_val": -1}, "num_val"),
                                       ({"source": "csv"}, "source"), ({"sizes": 3}, "sizes"),
                                       ({"max_examples": 0}, "max_examples")])
def test_bad_config_values_name_the_field(bad, field):
    with pytest.raises(ValidationError, match=field):
        DataConfig(**bad)


@pytest.mark.parametrize("source", ["math500", "files"])
def test_file_sources_need_a_path(source):
    with pytest.raises(ValidationError, match="data.path"):
        DataConfig(source=source)


# ---- MATH-500 -----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not MATH500.is_dir(), reason="shared MATH-500 files not present")
def test_math500_loads_the_paper_split():
    splits = load_data(DataConfig(source="math500", path=str(MATH500)))
    assert [len(x) for _, x in splits.items()] == [300, 100, 100]
    first = splits.train[0]
    assert first.prompt.startswith("If $t(x) = 3-g(x)$ and $g(x) = \\sqrt{x}$")
    assert first.prompt.count("Let's think step by step") == 1 and first.prompt.endswith(DEFAULT_PROMPT_SUFFIX)
    assert first.answer == "1" and first.id == "test/algebra/1529.json"
    ids = [ex.id for _, xs in splits.items() for ex in xs]
    assert len(set(ids)) == 500


def test_paper_split_matches_hf_train_test_split():
    """The authors split with datasets' train_test_split(test_size=0.4, seed=42), then the held-out part with
    test_size=0.5: its 'train' half is test and its 'test' half is val."""
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"i": list(range(500))})
    first = table.train_test_split(test_size=0.4, seed=42, shuffle=True)
    second = first["test"].train_test_split(test_size=0.5, seed=42, shuffle=True)
    train, val, test = paper_split(list(range(500)))
    assert train == first["train"]["i"] and test == second["train"]["i"] and val == second["test"]["i"]
    assert (len(train), len(val), len(test)) == (300, 100, 100)
    assert sorted(train + val + test) == list(range(500))


def test_holdout_split_sizes_round_the_held_out_part_up():
    train, held = holdout_split(list(range(11)), 0.2, seed=0)
    assert len(held) == 3 and len(train) == 8  # ⌈0.2·11⌉ = 3
    assert sorted(train + held) == list(range(11))


def _fake_math500_rows(n=500):
    return [{"problem": f"What is {i} + 1?", "answer": str(i + 1), "unique_id": f"test/x/{i}.json"}
            for i in range(n)]


def test_hub_source_splits_300_100_100_and_appends_the_suffix(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: calls.append((hub_id, split))
                        or _fake_math500_rows())
    splits = load_data(DataConfig(source="hub"))
    assert calls == [("HuggingFaceH4/MATH-500", "test")]
    assert [len(x) for _, x in splits.items()] == [300, 100, 100]
    train_ids = [f"test/x/{i}.json" for i in paper_split(list(range(500)))[0]]
    assert [ex.id for ex in splits.train] == train_ids
    ex = splits.train[0]
    i = int(ex.id.split("/")[-1].split(".")[0])
    assert ex == Example(ex.id, f"What is {i} + 1?" + DEFAULT_PROMPT_SUFFIX, str(i + 1))


def test_hub_without_network_says_to_use_a_local_folder(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="HuggingFaceH4/MATH-500.*data.source='math500'"):
        load_data(DataConfig(source="hub"))


def test_hub_without_datasets_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UserError, match="datasets.*local|datasets.*math500"):
        load_data(DataConfig(source="hub"))


# ---- generic files ------------------------------------------------------------------------------------------

def _rows(n, start=0):
    return [{"prompt": f"What is {i} times 2?", "answer": str(2 * i)} for i in range(start, start + n)]


def _write(path: Path, rows) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
def test_a_single_file_is_split_80_10_10_with_the_seed(tmp_path, ext):
    path = _write(tmp_path / f"data{ext}", _rows(40))
    splits = load_data(DataConfig(source="files", path=str(path), seed=5))
    assert [len(x) for _, x in splits.items()] == [32, 4, 4]
    all_prompts = [ex.prompt for _, xs in splits.items() for ex in xs]
    assert sorted(all_prompts) == sorted(r["prompt"] + DEFAULT_PROMPT_SUFFIX for r in _rows(40))
    assert all(ex.answer == str(2 * int(ex.prompt.split()[2])) for ex in splits.train)
    again = load_data(DataConfig(source="files", path=str(path), seed=5))
    other = load_data(DataConfig(source="files", path=str(path), seed=6))
    assert again == splits and other.train != splits.train


def test_a_folder_with_mixed_formats_loads_each_split(tmp_path):
    _write(tmp_path / "train.jsonl", _rows(5))
    _write(tmp_path / "val.parquet", _rows(2, start=100))
    _write(tmp_path / "test.jsonl", [{"prompt": "Say 7." + DEFAULT_PROMPT_SUFFIX, "answer": 7, "id": "q7"}])
    splits = load_data(DataConfig(source="files", path=str(tmp_path)))
    assert [len(x) for _, x in splits.items()] == [5, 2, 1]
    assert splits.val[0] == Example("val-0", "What is 100 times 2?" + DEFAULT_PROMPT_SUFFIX, "200")
    assert splits.test[0] == Example("q7", "Say 7." + DEFAULT_PROMPT_SUFFIX, "7")  # suffix not doubled, 7 → "7"


def test_an_empty_suffix_leaves_prompts_unchanged(tmp_path):
    _write(tmp_path / "train.jsonl", _rows(3))
    _write(tmp_path / "val.jsonl", _rows(1))
    _write(tmp_path / "test.jsonl", _rows(1))
    splits = load_data(DataConfig(source="files", path=str(tmp_path), prompt_suffix=""))
    assert [ex.prompt for ex in splits.train] == [r["prompt"] for r in _rows(3)]


# ---- bad data -----------------------------------------------------------------------------------------------

def _load_files(path: Path):
    return load_data(DataConfig(source="files", path=str(path)))


def _expect_error(fn, *fragments):
    with pytest.raises(UserError) as info:
        fn()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return str(info.value)


def test_missing_file_and_folder(tmp_path):
    _expect_error(lambda: _load_files(tmp_path / "nope.jsonl"), "nope.jsonl", "not found")
    _expect_error(lambda: load_data(DataConfig(source="math500", path=str(tmp_path / "gone"))), "gone",
                  "folder not found")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\n")
    _expect_error(lambda: _load_files(path), "data.csv", ".jsonl or .parquet")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_rows(1)[0]) + "\n\n{not json\n")
    _expect_error(lambda: _load_files(path), "data.jsonl line 3", "invalid JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('["a", "b"]\n')
    _expect_error(lambda: _load_files(path), "data.jsonl line 1", "JSON object")


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"this is not parquet")
    _expect_error(lambda: _load_files(path), "data.parquet", "cannot read")


def test_missing_column_lists_the_valid_and_found_names(tmp_path):
    path = _write(tmp_path / "data.jsonl", [{"question": "1+1?", "answer": "2"}] * 12)
    _expect_error(lambda: _load_files(path), "data.jsonl line 1", "missing column 'prompt'", "'answer'",
                  "found: question, answer")


def test_empty_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n")
    _expect_error(lambda: _load_files(path), "data.jsonl", "no rows")


@pytest.mark.parametrize("ext,where", [(".jsonl", "line 3"), (".parquet", "row 2")])
def test_empty_answer_names_file_row_and_column(tmp_path, ext, where):
    rows = _rows(12)
    rows[2]["answer"] = "  "
    path = _write(tmp_path / f"data{ext}", rows)
    _expect_error(lambda: _load_files(path), f"data{ext} {where}", "column 'answer' is empty")


def test_null_answer_in_parquet_is_empty(tmp_path):
    rows = _rows(12)
    rows[4]["answer"] = None
    path = _write(tmp_path / "data.parquet", rows)
    _expect_error(lambda: _load_files(path), "data.parquet row 4", "column 'answer' is empty")


def test_non_string_prompt(tmp_path):
    rows = _rows(12)
    rows[1]["prompt"] = 42
    path = _write(tmp_path / "data.jsonl", rows)
    _expect_error(lambda: _load_files(path), "data.jsonl line 2", "column 'prompt' must be a string, got int")


def test_too_few_rows_to_split(tmp_path):
    path = _write(tmp_path / "data.jsonl", _rows(5))
    _expect_error(lambda: _load_files(path), "data.jsonl", "too few", "80/10/10")


def test_folder_missing_a_split(tmp_path):
    _write(tmp_path / "train.jsonl", _rows(3))
    _write(tmp_path / "test.jsonl", _rows(1))
    _expect_error(lambda: _load_files(tmp_path), str(tmp_path), "missing val.jsonl / val.parquet")


def test_folder_with_two_files_for_one_split(tmp_path):
    for split in ("train", "val", "test"):
        _write(tmp_path / f"{split}.jsonl", _rows(2))
    _write(tmp_path / "val.parquet", _rows(2))
    _expect_error(lambda: _load_files(tmp_path), "both val.jsonl / val.parquet")


def _verl_rows(n, **override):
    rows = [{"prompt": [{"role": "user", "content": f"Problem {i}."}], "reward_model": {"ground_truth": str(i)},
             "unique_id": f"p{i}"} for i in range(n)]
    rows[0].update(override)
    return rows


def _write_verl(folder: Path, train_rows) -> Path:
    folder.mkdir()
    for split, rows in [("train", train_rows), ("val", _verl_rows(2)), ("test", _verl_rows(2))]:
        pd.DataFrame(rows).to_parquet(folder / f"{split}.parquet")
    return folder


def test_verl_folder_loads_prompts_as_is(tmp_path):
    folder = _write_verl(tmp_path / "verl", _verl_rows(3))
    splits = load_data(DataConfig(source="math500", path=str(folder)))
    assert splits.train[1] == Example("p1", "Problem 1.", "1")


@pytest.mark.parametrize("override,fragments", [
    ({"prompt": []}, ["row 0", "column 'prompt' must be a list with one chat message"]),
    ({"reward_model": {"style": "rule"}}, ["row 0", "reward_model", "ground_truth"]),
    ({"reward_model": {"ground_truth": ""}}, ["row 0", "column 'reward_model.ground_truth' is empty"]),
])
def test_bad_verl_rows(tmp_path, override, fragments):
    folder = _write_verl(tmp_path / "verl", _verl_rows(3, **override))
    _expect_error(lambda: load_data(DataConfig(source="math500", path=str(folder))), "train.parquet", *fragments)


def test_verl_folder_missing_a_file(tmp_path):
    folder = _write_verl(tmp_path / "verl", _verl_rows(3))
    (folder / "test.parquet").unlink()
    _expect_error(lambda: load_data(DataConfig(source="math500", path=str(folder))), "test.parquet", "not found")
