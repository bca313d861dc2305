"""Interference metrics on synthetic curves with hand-computed answers, and reading run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml

from moalign.diagnostics.interference import (
    InterferenceReport,
    IntervalSettings,
    ObjectiveChange,
    area_under_degradation,
    bootstrap_best_change,
    curve_means,
    format_interference_table,
    hypervolume,
    interference_summary,
    interference_table,
    score_gain,
    t_interval,
)
from moalign.diagnostics.runs import choose_split, load_run, read_metrics
from moalign.errors import UserError
from scipy import stats

SETTINGS = IntervalSettings()
T_975_DF2 = 4.302653  # Student t quantile 0.975 with 2 degrees of freedom (printed tables)

# 50 binary prompts, half solved at the start (mean 0.5). "improves": 10 unsolved prompts become solved (end 0.7);
# "degrades": 10 solved prompts become unsolved (end 0.3); "flat": nothing changes (end 0.5).
START = np.array([1.0] * 25 + [0.0] * 25)
IMPROVES = np.array([1.0] * 35 + [0.0] * 15)
DEGRADES = np.array([0.0] * 10 + [1.0] * 15 + [0.0] * 25)
# The per-prompt differences are 10 ones (or minus ones) among 50: mean ±0.2, standard deviation
# sqrt(10 · 0.8² + 40 · 0.2²) / 7 = sqrt(0.2 · 0.8 · 50 / 49); one run's interval is the paired t over prompts.
T_HALF_WIDTH = stats.t.ppf(0.975, 49) * np.sqrt(0.2 * 0.8 * 50 / 49) / np.sqrt(50)


def curves(*rows: np.ndarray) -> np.ndarray:
    return np.stack(rows)


def change_of(objective: str, per_prompt: np.ndarray) -> ObjectiveChange:
    return ObjectiveChange.from_runs(objective, [per_prompt], SETTINGS)


# ------------------------------------------------------------------------------------------------ pure metrics


def test_change_and_paired_t_interval_over_prompts():
    improves = change_of("accuracy", curves(START, IMPROVES))
    degrades = change_of("conciseness", curves(START, DEGRADES))
    flat = change_of("clarity", curves(START, START))

    assert (improves.start, improves.end, improves.change) == pytest.approx((0.5, 0.7, 0.2))
    assert (degrades.start, degrades.end, degrades.change) == pytest.approx((0.5, 0.3, -0.2))
    assert flat.change == 0.0

    assert improves.change_ci == pytest.approx((0.2 - T_HALF_WIDTH, 0.2 + T_HALF_WIDTH))
    assert degrades.change_ci == pytest.approx((-0.2 - T_HALF_WIDTH, -0.2 + T_HALF_WIDTH))
    assert improves.change_ci[0] > 0 and degrades.change_ci[1] < 0
    assert flat.change_ci == (0.0, 0.0)  # every prompt has identical start and end

    assert [c.degrades for c in (improves, degrades, flat)] == [False, True, False]
    assert [c.rises for c in (improves, degrades, flat)] == [True, False, False]


def test_pairing_matters():
    # The same marginal means (0.5 -> 0.7) but prompts shuffled at the end: unpaired noise widens the interval.
    shuffled_end = np.random.default_rng(1).permutation(IMPROVES)
    paired = change_of("a", curves(START, IMPROVES)).change_ci
    unpaired = change_of("a", curves(START, shuffled_end)).change_ci
    assert unpaired[1] - unpaired[0] > paired[1] - paired[0]


def test_intervals_are_exact_for_constant_shifts_and_best_is_the_peak():
    start = np.random.default_rng(0).uniform(size=40)
    per_prompt = curves(start, start + 0.3, start + 0.1)  # peak in the middle, ends +0.1 above the start
    assert bootstrap_best_change(per_prompt, SETTINGS) == pytest.approx((0.3, 0.3))
    change = change_of("a", per_prompt)
    assert (change.change, change.best_change) == pytest.approx((0.1, 0.3))
    assert change.change_ci == pytest.approx((0.1, 0.1)) and change.best_change_ci == pytest.approx((0.3, 0.3))


def test_bootstrap_is_seeded():
    per_prompt = np.random.default_rng(0).uniform(size=(2, 30))  # continuous scores: quantiles move with the draw
    assert bootstrap_best_change(per_prompt, SETTINGS) == bootstrap_best_change(per_prompt, SETTINGS)
    assert bootstrap_best_change(per_prompt, IntervalSettings(seed=1)) != bootstrap_best_change(per_prompt, SETTINGS)


def test_missing_prompt_scores_are_left_out():
    per_prompt = np.array([[1.0, np.nan, 0.0], [1.0, 1.0, np.nan]])
    assert curve_means(per_prompt) == pytest.approx([0.5, 1.0])


def test_area_under_degradation_hand_curve():
    # max(0, 0.5 − m_t) = 0, 0.1, 0, 0.2, 0
    assert area_under_degradation(np.array([0.5, 0.4, 0.6, 0.3, 0.5])) == pytest.approx(0.3)
    assert area_under_degradation(np.array([0.5, 0.6, 0.7])) == 0.0
    # Through the per-prompt path: two prompts whose mean curve is 0.5, 0.25, 0.75, 0.0 -> 0.25 + 0.5
    per_prompt = np.array([[1.0, 0.0], [0.5, 0.0], [1.0, 0.5], [0.0, 0.0]])
    assert change_of("a", per_prompt).area_under_degradation == pytest.approx(0.75)


def test_score_gain_uses_first_and_last_tenth():
    assert score_gain(np.arange(20.0)) == pytest.approx(18.5 - 0.5)  # k = 2: means of {0, 1} and {18, 19}
    assert score_gain(np.array([3.0, 9.0, 9.0, 9.0, 5.0])) == pytest.approx(2.0)  # n = 5 -> k = 1
    assert score_gain(np.arange(30.0)[::-1]) == pytest.approx(1.0 - 28.0)  # k = 3, falling
    assert score_gain(np.array([0.4])) == 0.0


def test_hypervolume_is_the_box_between_start_and_end():
    assert hypervolume(np.array([0.5, 0.5]), np.array([0.7, 0.6])) == pytest.approx(0.2 * 0.1)
    assert hypervolume(np.array([0.5, 0.5, 0.2]), np.array([0.7, 0.6, 0.5])) == pytest.approx(0.2 * 0.1 * 0.3)
    assert hypervolume(np.array([0.5, 0.5, 0.5]), np.array([0.7, 0.3, 0.5])) == 0.0  # one objective fell
    assert hypervolume(np.array([0.5, 0.5]), np.array([0.7, 0.5])) == 0.0  # one objective unchanged


def test_t_interval_hand_case():
    half_width = T_975_DF2 * 0.1 / np.sqrt(3)  # s of (0.1, 0.2, 0.3) is 0.1
    assert t_interval(np.array([0.1, 0.2, 0.3]), 0.95) == pytest.approx((0.2 - half_width, 0.2 + half_width))
    with pytest.raises(ValueError):
        t_interval(np.array([0.1]), 0.95)


def report(score_end: np.ndarray, *changes: ObjectiveChange, train_gain: Optional[float] = 0.4) -> InterferenceReport:
    """A report whose fixed-scalarization score moves from START to ``score_end`` on the 50 prompts."""
    score = change_of("score", curves(START, score_end))
    weights = {c.objective: 1.0 / len(changes) for c in changes}
    return InterferenceReport("val", "sampled", list(changes), score, weights, train_gain, 1, 0.95)


def test_interference_needs_a_rising_fixed_score_and_a_degrading_objective():
    improves = change_of("accuracy", curves(START, IMPROVES))
    degrades = change_of("conciseness", curves(START, DEGRADES))
    flat = change_of("clarity", curves(START, START))

    rising = report(IMPROVES, improves, degrades, flat)
    assert rising.interference is True and rising.degraded_objectives == ["conciseness"]
    assert rising.verdict == "interference" and rising.improved_objectives == ["accuracy"]
    assert (rising.worst.objective, rising.worst.change) == ("conciseness", pytest.approx(-0.2))
    assert rising.hypervolume == 0.0
    nothing_degrades = report(IMPROVES, improves, flat)
    assert nothing_degrades.interference is False and nothing_degrades.verdict == "improvement"
    # the fixed score does not rise: no interference, whatever the training score did
    flat_score = report(START, improves, degrades, train_gain=0.9)
    assert flat_score.interference is False and flat_score.verdict == "degradation"
    assert report(DEGRADES, improves, degrades).verdict == "degradation"
    assert report(START, flat).verdict == "no effect detected"
    assert report(DEGRADES, flat).verdict == "degradation"  # the score itself falls


# ------------------------------------------------------------------------------------------------ run directories

OBJECTIVES = ["accuracy", "conciseness", "clarity"]


def eval_line(step: int, split: str, per_prompt: dict[str, np.ndarray], mode: Optional[str] = "sampled") -> dict:
    """An evaluation line as the engine writes it (``mode=None``: keys without a mode, read as greedy)."""
    line: dict = {"step": step}
    prefix = f"eval/{split}" if mode is None else f"eval/{split}/{mode}"
    for objective, scores in per_prompt.items():
        line[f"{prefix}/{objective}/mean"] = float(np.mean(scores))
        line[f"{prefix}/{objective}/per_prompt"] = [float(s) for s in scores]
    return line


def write_run(run_dir: Path, lines: list[dict], seed: int = 1, torn: bool = False, **config) -> Path:
    run_dir.mkdir(parents=True)
    config = {"objectives": OBJECTIVES, "seed": seed, "weighting": "linear", **config}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if torn:
        text += '{"step": 99, "train/score/me'
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def train_lines(scores: list[float]) -> list[dict]:
    return [{"step": step, "train/score/mean": s, "weight/accuracy": 0.33, "train/accuracy/mean": 0.5, "lr": 1e-6}
            for step, s in enumerate(scores)]


LAMBDA0 = {"scalarization/accuracy": 0.8, "scalarization/conciseness": 0.1, "scalarization/clarity": 0.1}


def standard_run(run_dir: Path, torn: bool = False) -> Path:
    """Training score 0.2 -> 0.8; fixed scalarization λ0 = (0.8, 0.1, 0.1); val at steps 0, 5, 9 (accuracy up,
    conciseness down, clarity flat); test at 0 and 9."""
    val = [eval_line(0, "val", {"accuracy": START, "conciseness": START, "clarity": START}) | LAMBDA0,
           eval_line(5, "val", {"accuracy": START, "conciseness": DEGRADES, "clarity": START}),
           eval_line(9, "val", {"accuracy": IMPROVES, "conciseness": DEGRADES, "clarity": START})]
    test = [eval_line(0, "test", {o: np.array([0.5, 0.5]) for o in OBJECTIVES}),
            eval_line(9, "test", {o: np.array([0.6, 0.6]) for o in OBJECTIVES})]
    return write_run(run_dir, train_lines([0.2] * 5 + [0.8] * 5) + val + test, torn=torn)


def test_reading_a_run_directory_with_a_torn_last_line(tmp_path):
    run = load_run(standard_run(tmp_path / "run", torn=True))
    assert run.objectives == OBJECTIVES and run.seed == 1
    np.testing.assert_array_equal(run.train_score, [0.2] * 5 + [0.8] * 5)  # the torn step-99 line is skipped
    val = run.evaluations_for("val")
    np.testing.assert_array_equal(val.steps, [0, 5, 9])
    np.testing.assert_array_equal(val.per_prompt["conciseness"], curves(START, DEGRADES, DEGRADES))
    np.testing.assert_array_equal(run.evaluations_for("test").steps, [0, 9])
    assert run.mode == "sampled" and run.scalarization == {"accuracy": 0.8, "conciseness": 0.1, "clarity": 0.1}


def test_keys_without_a_mode_are_greedy_and_sampled_evaluations_are_preferred(tmp_path):
    greedy_only = [eval_line(step, "val", {o: START for o in OBJECTIVES}, mode=None) for step in (0, 9)]
    run = load_run(write_run(tmp_path / "greedy", greedy_only))
    assert run.mode == "greedy" and set(run.evaluations_by_mode) == {"greedy"}
    assert run.scalarization == pytest.approx({o: 1 / 3 for o in OBJECTIVES})  # no λ0 logged: uniform

    both = [eval_line(s, "val", {o: START for o in OBJECTIVES}, mode="greedy")
            | eval_line(s, "val", {o: (IMPROVES if s else START) for o in OBJECTIVES}) for s in (0, 9)]
    run = load_run(write_run(tmp_path / "both", both))
    assert run.mode == "sampled" and set(run.evaluations_by_mode) == {"sampled", "greedy"}
    summary = interference_summary(tmp_path / "both")
    assert summary["mode"] == "sampled" and summary["objectives"]["accuracy"]["change"] == pytest.approx(0.2)


def test_per_completion_rewards_are_read_as_a_table(tmp_path):
    lines = []
    for step, rewards in ((0, [[1, 0, 0], [1, 1, None]]), (9, [[1, 1, 0], [0, 1, 1]])):
        line = eval_line(step, "val", {"accuracy": np.array([np.mean([r for r in row if r is not None])
                                                             for row in rewards])})
        line["eval/val/sampled/accuracy/per_sample"] = rewards
        lines.append(line)
    run = load_run(write_run(tmp_path / "run", lines, objectives=["accuracy"]))
    table = run.evaluations["val"].per_sample["accuracy"]
    assert table.shape == (2, 2, 3) and np.isnan(table[0, 1, 2]) and table[1, 1].tolist() == [0, 1, 1]
    ragged = [line | {"eval/val/sampled/accuracy/per_sample": [[1, 0], [1]]} for line in lines]
    with pytest.raises(UserError, match="numbers of completions"):
        load_run(write_run(tmp_path / "ragged", ragged, objectives=["accuracy"]))


def test_lines_of_one_step_are_merged_later_keys_winning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 0, "a": 0}\n{"step": 1, "b": 2}\n{"step": 1, "a": 3}\n')
    assert read_metrics(path) == [{"step": 0, "a": 0}, {"step": 1, "a": 3, "b": 2}]


def test_summary_of_a_run(tmp_path):
    summary = interference_summary(standard_run(tmp_path / "run"), split="val")
    json.dumps(summary)  # must be JSON-ready for summary.json
    assert summary["split"] == "val" and summary["train_score_gain"] == pytest.approx(0.6)
    # the fixed score: 10 prompts gain 0.8 (accuracy), 10 lose 0.1 (conciseness)
    assert summary["score_change"] == pytest.approx(0.8 * 0.2 - 0.1 * 0.2) and summary["score_rises"] is True
    assert summary["interference"] is True and summary["degraded_objectives"] == ["conciseness"]
    assert summary["verdict"] == "interference"
    assert (summary["worst_objective"], summary["worst_change"]) == ("conciseness", pytest.approx(-0.2))
    conciseness = summary["objectives"]["conciseness"]
    assert conciseness["area_under_degradation"] == pytest.approx(0.2 + 0.2)
    assert conciseness["change_ci"][1] < 0
    assert summary["objectives"]["accuracy"]["best_change"] == pytest.approx(0.2)
    assert summary["hypervolume"] == 0.0


def test_split_is_test_only_when_evaluated_at_start_and_end(tmp_path):
    both = load_run(standard_run(tmp_path / "both"))
    assert choose_split([both]) == "test"
    summary = interference_summary(tmp_path / "both")
    assert summary["split"] == "test" and summary["hypervolume"] == pytest.approx(0.1 ** 3)

    val = [eval_line(step, "val", {o: START for o in OBJECTIVES}) for step in (0, 9)]
    test_at_end_only = [eval_line(9, "test", {o: START for o in OBJECTIVES})]
    end_only = load_run(write_run(tmp_path / "end_only", train_lines([0.1] * 10) + val + test_at_end_only))
    assert choose_split([end_only]) == "val"
    assert choose_split([both, end_only]) == "val"  # one split for the whole table
    with pytest.raises(UserError, match="one 'test' evaluation"):
        choose_split([end_only], "test")


def seed_run(run_dir: Path, seed: int, accuracy_gain: float, clarity_gain: float, **config) -> Path:
    """Constant per-prompt shifts, so each seed's change is exact."""
    low, half = np.full(8, 0.2), np.full(8, 0.5)
    lines = [eval_line(0, "val", {"accuracy": low, "conciseness": half, "clarity": half}),
             eval_line(10, "val", {"accuracy": low + accuracy_gain, "conciseness": half,
                                   "clarity": half + clarity_gain})]
    return write_run(run_dir, train_lines([0.1] * 10 + [0.5] * 10) + lines, seed=seed, **config)


def test_seeds_of_one_configuration_share_a_row_with_an_interval_over_seeds(tmp_path):
    dirs = [seed_run(tmp_path / f"linear-s{seed}", seed, gain, clarity_gain, output_dir=str(tmp_path / str(seed)))
            for seed, gain, clarity_gain in ((1, 0.5, -0.3), (2, 0.6, -0.2), (3, 0.7, -0.25))]
    other = seed_run(tmp_path / "ctwa", 1, 0.1, 0.0, weighting="ctwa")
    rows = interference_table(dirs + [other, dirs[0]])  # dirs[0] twice: still three seeds

    assert [row["name"] for row in rows] == ["linear-s*", "ctwa"]
    linear = rows[0]
    assert [r["seed"] for r in linear["runs"]] == [1, 2, 3]
    assert linear["ci_method"] == "crossed seeds × prompts (3 × 8), Satterthwaite t"
    # every prompt of a seed moved alike: no prompt variance, and the interval is Student's t over the 3 seeds
    accuracy = linear["objectives"]["accuracy"]
    half_width = T_975_DF2 * 0.1 / np.sqrt(3)
    assert accuracy["change"] == pytest.approx(0.6)
    assert accuracy["change_ci"] == pytest.approx([0.6 - half_width, 0.6 + half_width])
    clarity = linear["objectives"]["clarity"]
    half_width = T_975_DF2 * 0.05 / np.sqrt(3)  # s of (−0.3, −0.2, −0.25) is 0.05
    assert clarity["change_ci"] == pytest.approx([-0.25 - half_width, -0.25 + half_width])
    assert clarity["degrades"] is True
    # uniform λ0 (none logged): the score moves by (0.5 − 0.3)/3, (0.6 − 0.2)/3, (0.7 − 0.25)/3
    score_changes = np.array([0.2, 0.4, 0.45]) / 3
    half_width = T_975_DF2 * score_changes.std(ddof=1) / np.sqrt(3)
    assert linear["score_change_ci"] == pytest.approx([score_changes.mean() - half_width,
                                                       score_changes.mean() + half_width])
    assert linear["score_rises"] is True and linear["interference"] is True
    assert linear["train_score_gain"] == pytest.approx(0.4)

    ctwa = rows[1]
    assert ctwa["ci_method"] == "paired t over 8 prompts (one run)" and ctwa["interference"] is False
    assert ctwa["verdict"] == "improvement"  # accuracy +0.1 on every prompt
    assert ctwa["hypervolume"] == 0.0  # conciseness and clarity unchanged

    text = format_interference_table(rows)
    for expected in ("linear-s*", "ctwa", "1,2,3", "clarity", "interference", "improvement", "-0.250", "score"):
        assert expected in text


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp_path)
    with pytest.raises(UserError, match="no evaluation lines"):
        load_run(write_run(tmp_path / "no_eval", train_lines([0.1, 0.2])))
    missing_clarity = [eval_line(s, "val", {"accuracy": START, "conciseness": START}) for s in (0, 9)]
    with pytest.raises(UserError, match="eval/val/sampled/clarity/per_prompt"):
        load_run(write_run(tmp_path / "missing", missing_clarity))
    resized = [eval_line(0, "val", {o: START for o in OBJECTIVES}), eval_line(9, "val", {o: START[:10] for o in OBJECTIVES})]
    with pytest.raises(UserError, match="same non-empty prompt set"):
        load_run(write_run(tmp_path / "resized", resized))
    corrupt = write_run(tmp_path / "corrupt", train_lines([0.1]))
    (corrupt / "metrics.jsonl").write_text("{not json\n" + json.dumps({"step": 1}) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:1 is not valid JSON"):
        load_run(corrupt)
    val_only = load_run(write_run(tmp_path / "val_only", [eval_line(s, "val", {o: START for o in OBJECTIVES})
                                                            for s in (0, 9)]))
    with pytest.raises(UserError, match="no 'test' evaluations"):
        choose_split([val_only], "test")
    with pytest.raises(UserError, match="unknown evaluation split"):
        choose_split([val_only], "train")
    with pytest.raises(UserError, match="no run directories"):
        interference_table([])
