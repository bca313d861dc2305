"""Studies: grid expansion and naming, dry runs of the presets, resuming, the results table, findings and the report.

Run directories are written by hand here in the engine's format (``config.yaml``, ``metrics.jsonl``,
``summary.json``) with per-prompt scores chosen so that every expected number can be computed on paper.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from moalign.config import TrainConfig, dump_config
from moalign.errors import UserError
from moalign.study import findings, grid, runner
from moalign.study.report import render_markdown, write_report
from moalign.models.sft import SFTRecipe, sft_answer, sft_examples

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
MATH500 = REPO.parent / "shared" / "data" / "math500"
OBJECTIVES = ["accuracy", "conciseness", "clarity"]


def study_tree(**extra) -> dict:
    tree = {"name": "t", "base": {"model": "tiny", "steps": 3, "weighting": {"name": "ctwa", "tau": 0.5}},
            "grid": {"weighting": ["linear", "ctwa"], "seed": [0, 1]}}
    tree.update(extra)
    return tree


def expand(tree: dict, overrides: list[str] | None = None, study_dir: Path = Path("s")) -> list[grid.PlannedRun]:
    return grid.expand(grid.parse_study(grid.apply_overrides(tree, overrides or [])), study_dir)


# ------------------------------------------------------------------------------------------------ grid


def test_grid_expands_with_seeds_slowest_and_names_runs():
    runs = expand(study_tree(), study_dir=Path("studies/t"))
    assert [r.name for r in runs] == ["tiny__linear__grpo__s0", "tiny__ctwa__grpo__s0",
                                      "tiny__linear__grpo__s1", "tiny__ctwa__grpo__s1"]
    assert runs[0].run_dir == Path("studies/t/runs/tiny__linear__grpo__s0")
    assert runs[1].factors == {"weighting": "ctwa", "seed": "0"}
    # Switching the algorithm drops the base's parameters of another one; keeping it keeps them.
    assert runs[0].config.weighting.params() == {}
    assert runs[1].config.weighting.params() == {"tau": 0.5}


def test_runs_differ_only_in_their_factors():
    runs = expand(study_tree())
    dumps = [r.config.model_dump(mode="json") for r in runs]
    differing = {k for d in dumps for k in d if d[k] != dumps[0][k]}
    assert differing == {"weighting", "seed", "run_dir"}


def test_per_value_overrides_and_weighting_params_apply_only_where_the_value_is_taken():
    tree = study_tree(grid={"weighting": ["linear", "ctwa"], "estimator": ["grpo", "reinforce_pp"]},
                      weighting_params={"ctwa": {"lambda_lr": 0.07}},
                      per_value={"estimator": {"reinforce_pp": {"loss.clip_eps_low": 100, "loss.dual_clip": 100}}})
    runs = {r.name: r.config for r in expand(tree)}
    assert set(runs) == {"tiny__linear__grpo__s0", "tiny__linear__reinforce_pp__s0", "tiny__ctwa__grpo__s0",
                         "tiny__ctwa__reinforce_pp__s0"}
    assert runs["tiny__ctwa__grpo__s0"].weighting.params() == {"tau": 0.5, "lambda_lr": 0.07}
    assert runs["tiny__linear__grpo__s0"].weighting.params() == {}
    assert (runs["tiny__ctwa__reinforce_pp__s0"].loss.clip_eps_low, runs["tiny__ctwa__reinforce_pp__s0"].loss.dual_clip
            ) == (100, 100)
    assert (runs["tiny__ctwa__grpo__s0"].loss.clip_eps_low, runs["tiny__ctwa__grpo__s0"].loss.dual_clip) == (0.2, 3.0)


def test_other_varied_factors_are_named_and_names_are_sanitized():
    tree = study_tree(grid={"model": ["Qwen/Qwen2.5-1.5B"], "objectives": [["accuracy", "clarity"], OBJECTIVES],
                            "optim.lr": [1e-5]})
    names = [r.name for r in expand(tree)]
    # optim.lr has one value, so it is not in the name; the objectives set has two.
    assert names == ["Qwen-Qwen2.5-1.5B__ctwa__grpo__s0__objectives-accuracy+clarity",
                     "Qwen-Qwen2.5-1.5B__ctwa__grpo__s0__objectives-accuracy+conciseness+clarity"]
    assert grid.sanitize("../a b/c") == "a-b-c"


def test_command_line_overrides_set_the_base_or_the_study():
    runs = expand(study_tree(), ["steps=7", "grid.seed=[5]", "rollout.group_size=2"])
    assert [r.name for r in runs] == ["tiny__linear__grpo__s5", "tiny__ctwa__grpo__s5"]
    assert all(r.config.steps == 7 and r.config.rollout.group_size == 2 for r in runs)


@pytest.mark.parametrize("tree, message", [
    (study_tree(grid={"weighting": ["linear", "nope"]}), "unknown weighting 'nope'"),
    (study_tree(grid={"weighting": []}), "grid.weighting is empty"),
    (study_tree(grid={"bogus": [1]}), "grid key 'bogus' is not a TrainConfig key"),
    (study_tree(per_value={"weighting": {"cwta": {"steps": 1}}}), "cwta not among grid.weighting"),
    (study_tree(per_value={"estimator": {"grpo": {"steps": 1}}}), "'estimator' is not a grid key"),
    (study_tree(weighting_params={"ctwa": {"bogus": 1}}), "unknown parameter(s) bogus"),
    (study_tree(grid={"model": ["a/b", "a-b"]}), "would share the directory"),
])
def test_bad_studies_fail_with_a_message_naming_the_problem(tree, message):
    with pytest.raises(UserError, match=re.escape(message)):
        expand(tree)


# ------------------------------------------------------------------------------------------------ dry runs


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    import moalign.engine.trainer  # noqa: F401  (imported first, so that its own binding is patched and restored)

    for where in ("moalign.models.loading", "moalign.models", "moalign.engine.trainer"):
        monkeypatch.setattr(f"{where}.load_model", refuse)


@pytest.mark.parametrize("preset", ["quick", "smol", "paper"])
def test_presets_validate_in_a_dry_run_without_loading_models(preset, tmp_path, no_model_loading, capsys):
    overrides = []
    if preset == "paper":
        if not MATH500.is_dir():
            pytest.skip(f"{MATH500} (the paper's MATH-500 split) is not here")
        overrides = [f"data.path={MATH500}"]
    out = tmp_path / preset
    assert runner.run_study(preset, out_dir=out, dry_run=True, overrides=overrides) == out
    assert not out.exists()  # a dry run writes nothing
    printed = capsys.readouterr().out
    spec, _, runs = grid.load_study(preset, out, overrides)
    assert f"{len(runs)} runs" in printed
    if preset == "quick":
        from moalign.weighting import WEIGHTINGS

        assert {r.config.weighting.name for r in runs} == set(WEIGHTINGS.names())
        assert len(runs) == 5 * len(WEIGHTINGS.names())
        # the design of the power computation (docs/reproducing.md), two runs at a time
        cfg = runs[0].config
        assert (cfg.steps, cfg.eval.num_prompts, cfg.eval.samples, cfg.data.num_val, cfg.data.num_test) == (
            100, 48, 4, 48, 48)
        assert cfg.eval.mode == "both" and cfg.threads == 1 and spec.jobs == 2
    if preset == "paper":
        assert "train 300, val 100, test 100" in printed
        cfg = runs[0].config
        assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.optim.lr,
                cfg.optim.mini_batches, cfg.eval.every, cfg.steps) == (32, 16, 1024, 1e-6, 2, 5, 810)
        assert (cfg.eval.mode, cfg.eval.samples) == ("both", 4)  # the paper's greedy tables and expected rewards
        for r in runs:
            eps = 100 if r.config.estimator.name == "reinforce_pp" else 0.2
            assert r.config.loss.clip_eps_low == r.config.loss.clip_eps_high == eps
            expected = ["model.layers.2[67].*", "model.norm.*"] if r.config.weighting.name in (
                "dynamic", "mgda", "gradnorm", "nash_mtl") else None  # gradient-level: the top blocks only
            assert r.config.weighting.gradient_params == expected
            assert r.config.objectives == ["accuracy", "conciseness", "clarity"]  # clarity: the paper's rule
            if r.config.weighting.name in ("tchebycheff", "smooth_tchebycheff"):  # z: the authors' running max
                assert r.config.weighting.params().get("ideal_point") is None
                assert r.config.weighting.params().get("ideal_mode", "running_max") == "running_max"


def test_dry_run_reports_missing_data():
    with pytest.raises(UserError, match="folder not found"):
        runner.run_study("paper", dry_run=True, overrides=["data.path=/does/not/exist"])


# ------------------------------------------------------------------------------------------------ synthetic runs


def objective_curves(start: np.ndarray, end: np.ndarray, num_evals: int) -> list[np.ndarray]:
    """Per-prompt scores at ``num_evals`` evaluations, moving from ``start`` to ``end`` a block of prompts at a time."""
    changed = np.flatnonzero(start != end)
    rows = []
    for t in range(num_evals):
        row = start.copy()
        k = round(len(changed) * t / (num_evals - 1))
        row[changed[:k]] = end[changed[:k]]
        rows.append(row)
    return rows


def tiny_config(weighting: str, seed: int, steps: int = 4, eval_every: int = 2, **extra) -> TrainConfig:
    return TrainConfig(model={"name": "tiny"}, weighting={"name": weighting}, seed=seed, steps=steps,
                       eval={"every": eval_every}, **extra)


def write_run(run_dir: Path, cfg: TrainConfig, curves: dict[str, tuple[np.ndarray, np.ndarray]],
              score_gain: float = 0.5, law: dict[str, list[float]] | None = None, step_s: float = 1.0,
              finished: bool = True, extra: dict[int, dict] | None = None) -> None:
    """A run directory in the engine's format for ``cfg``: val evaluated at step 0, every ``cfg.eval.every`` steps and
    at the end, test at 0 and at the end; ``curves[objective] = (start, end)`` per-prompt scores (val and test alike).
    ``extra[step]`` is added to that step's line. ``config.yaml`` is written unless the directory already has one
    (the runner writes it before training)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"objectives": list(curves), "run_dir": str(run_dir)})
    if not (run_dir / "config.yaml").is_file():
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    steps = cfg.steps
    eval_steps = sorted({0, *range(cfg.eval.every or steps, steps, cfg.eval.every or steps), steps})
    per_eval = {o: objective_curves(s, e, len(eval_steps)) for o, (s, e) in curves.items()}
    lines = []
    for t, step in enumerate(eval_steps):
        record = {"step": step}
        for split in ("val", "test") if step in (0, steps) else ("val",):
            for o in curves:
                record[f"eval/{split}/sampled/{o}/mean"] = float(per_eval[o][t].mean())
                record[f"eval/{split}/sampled/{o}/per_prompt"] = per_eval[o][t].tolist()
        lines.append(record)
    for step in range(1, steps + 1):
        record = {"step": step, "train/score/mean": score_gain * step / steps, "perf/step_s": step_s,
                  "time/sample_s": step_s / 2}
        for j, o in enumerate(curves):
            record[f"weight/{o}"] = 1.0 / len(curves) + 0.01 * j * step
            record[f"train/{o}/mean"] = 0.5
        for key, values in (law or {}).items():  # e.g. law["cov_w/accuracy"][step - 1] -> law/cov_w/accuracy
            if values[step - 1] is not None:
                record[f"law/{key}"] = values[step - 1]
        lines.append(record)
    for step, values in (extra or {}).items():
        lines.append({"step": step, **values})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"steps": steps}))


N = 20  # evaluation prompts
ZEROS, ONES = np.zeros(N), np.ones(N)
HALF = np.array([1.0] * 10 + [0.0] * 10)
# linear: accuracy 0.5 -> 1.0 (prompts 10–19 solved), conciseness 0.5 -> 0.8 (prompts 10–15), clarity 0.5 -> 0.3
# (prompts 0–3 lost); the uniform fixed scalarization rises by (0.5 + 0.3 − 0.2)/3 = 0.2: interference.
# ctwa: accuracy 0.5 -> 1.0, conciseness 0.5 -> 0.8, clarity 0.5 -> 0.6: dominates linear, nothing degrades.
LINEAR = {"accuracy": (HALF, ONES), "conciseness": (HALF, np.array([1.0] * 16 + [0.0] * 4)),
          "clarity": (HALF, np.array([0.0] * 4 + [1.0] * 6 + [0.0] * 10))}
CTWA = {"accuracy": (HALF, ONES), "conciseness": (HALF, np.array([1.0] * 16 + [0.0] * 4)),
        "clarity": (HALF, np.array([1.0] * 12 + [0.0] * 8))}


@pytest.fixture
def study_dir(tmp_path) -> Path:
    """Two algorithms × two seeds, identical seeds (so the intervals are the paired t over the prompts), plus one
    run that never finished."""
    root = tmp_path / "study"
    for seed in (0, 1):
        write_run(root / "runs" / f"tiny__linear__grpo__s{seed}", tiny_config("linear", seed), LINEAR, step_s=1.0)
        write_run(root / "runs" / f"tiny__ctwa__grpo__s{seed}", tiny_config("ctwa", seed), CTWA, step_s=1.5)
    write_run(root / "runs" / "tiny__mgda__grpo__s0", tiny_config("mgda", 0), LINEAR, finished=False)
    (root / "study.yaml").write_text(yaml.safe_dump({"name": "synthetic"}))
    return root


def test_results_table_has_one_row_per_run_split_step_and_objective(study_dir):
    loaded = findings.load_study(study_dir)
    assert [name for name, _ in loaded.skipped] == ["tiny__mgda__grpo__s0"]
    table = findings.results_table(loaded.runs, loaded.name)
    assert list(table.columns) == findings.RESULT_COLUMNS
    # per run: val at steps 0, 2, 4 and test at 0, 4 -> 5 evaluations × 3 objectives
    assert len(table) == 4 * 5 * 3
    row = table[(table.run == "tiny__linear__grpo__s1") & (table.split == "test") & (table.objective == "clarity")]
    assert row.step.tolist() == [0, 4] and row.value.tolist() == pytest.approx([0.5, 0.3])
    middle = table[(table.run == "tiny__linear__grpo__s0") & (table.step == 2) & (table.objective == "accuracy")]
    assert middle.split.tolist() == ["val"] and middle.value.tolist() == pytest.approx([0.75])  # 5 of 10 solved
    assert set(table["mode"]) == {"sampled"}
    assert set(table.algorithm) == {"linear", "ctwa"} and set(table.seed) == {0, 1}
    assert set(table.study) == {"synthetic"} and set(table.objective_set) == {"accuracy+conciseness+clarity"}


def test_findings_on_hand_built_runs(study_dir):
    f = findings.Findings(findings.load_study(study_dir))
    assert (f.split, f.selection_split) == ("test", "val")
    by_algorithm = {c.label: c for c in f.configs}
    linear = by_algorithm["linear"].reports["test"]
    assert [round(ch.change, 6) for ch in linear.changes] == [0.5, 0.3, -0.2]
    assert linear.score.change == pytest.approx(0.2) and linear.score_rises
    assert linear.degraded_objectives == ["clarity"] and linear.interference is True
    assert by_algorithm["ctwa"].reports["test"].interference is False
    assert by_algorithm["ctwa"].reports["test"].verdict == "improvement"
    assert findings.own_verdicts([by_algorithm["linear"]], "test") == (2, 2)
    assert findings.own_verdicts([by_algorithm["ctwa"]], "test") == (0, 2)

    (pareto,) = f.pareto.values()
    assert [c.label for c, on in zip(pareto.configs, pareto.on_front) if on] == ["ctwa"]
    # Starts (0.5, 0.5, 0.5); ends linear (1.0, 0.8, 0.3), ctwa (1.0, 0.8, 0.6). Reference: each objective's lowest
    # value minus 10% of its range: (0.5 − 0.05, 0.5 − 0.03, 0.3 − 0.03); ideal (1.0, 0.8, 0.6); box 0.55·0.33·0.33.
    assert pareto.reference == pytest.approx([0.45, 0.47, 0.27])
    box = 0.55 * 0.33 * 0.33
    assert pareto.of(by_algorithm["linear"]) == pytest.approx((0.05 * 0.03 * 0.23 / box, 0.55 * 0.33 * 0.03 / box))
    assert pareto.hypervolume == pytest.approx(1.0)  # ctwa's end is the ideal point: it fills the box
    assert pareto.start == pytest.approx([0.5, 0.5, 0.5])

    (finding,) = f.findings()
    assert finding.head.startswith("**tiny** (grpo; objectives accuracy+conciseness+clarity; test split; 2 seed(s)")
    assert finding.overview == "Verdicts (seeds pooled): interference under linear; improvement under ctwa."
    assert [c.split(",")[0] for c in finding.clauses] == ["Under linear", "Under ctwa"]  # the baseline first
    # identical seeds: no seed variance; the interval is the paired t over the 20 prompts (4 of them lose 1)
    clarity = -np.array([1.0] * 4 + [0.0] * 16)
    ci = stats.ttest_1samp(clarity, 0.0).confidence_interval(0.95)
    clarity_text = f"−0.200 [−{-ci.low:.3f}, −{-ci.high:.3f}]"
    assert finding.clauses[0].startswith(f"Under linear, clarity ({clarity_text}) degrades on held-out prompts while "
                                         f"accuracy (+0.500 [")
    assert "the λ0-scalarized score rises (+0.200 [" in finding.clauses[0]
    assert finding.clauses[0].endswith(": **interference**; 2 of 2 runs interfere on their own.")
    assert finding.clauses[1].endswith(": **improvement**; 0 of 2 runs interfere on their own.")
    gain = stats.ttest_1samp(np.array([0.0] * 10 + [1.0] * 2 + [0.0] * 8), 0.0).confidence_interval(0.95)
    assert finding.contrast == (f"Clarity, which degrades under linear ({clarity_text}): no effect detected under ctwa "
                                f"(+0.100 [−{-gain.low:.3f}, +{gain.high:.3f}]).")
    assert "Chosen on val by hypervolume: ctwa (1.000)" in finding.summary


def test_algorithms_that_move_nothing_share_one_clause(tmp_path):
    flat = {"accuracy": (HALF, HALF), "clarity": (HALF, HALF)}
    for weighting in ("famo", "linear", "pama"):
        write_run(tmp_path / "runs" / weighting, tiny_config(weighting, 0), flat if weighting != "linear" else
                  {"accuracy": (HALF, ONES), "clarity": (HALF, HALF)})
    (finding,) = findings.Findings(findings.load_study(tmp_path)).findings()
    assert len(finding.clauses) == 2
    # one seed: the paired t over the 20 prompts, 10 of which gain 1: 0.5 ± t_19 · 0.513/√20
    assert finding.clauses[0] == ("Under linear, accuracy (+0.500 [+0.260, +0.740]) rises on held-out prompts; no "
                                  "effect detected on clarity (+0.000 [+0.000, +0.000]); the λ0-scalarized score "
                                  "rises (+0.250 [+0.130, +0.370]): **improvement**.")
    assert finding.clauses[1] == ("Under famo and pama, no effect detected on any objective or on the λ0-scalarized "
                                  "score (every interval contains 0).")
    assert finding.overview == "Verdicts: improvement under linear; no effect detected under famo and pama."


def test_cost_rows_average_step_seconds(study_dir):
    rows = {r["algorithm"]: r for r in findings.cost_rows(findings.load_study(study_dir).runs)}
    assert rows["linear"]["perf/step_s"] == 1.0 and rows["ctwa"]["perf/step_s"] == 1.5
    assert rows["ctwa"]["time/sample_s"] == 0.75 and rows["ctwa"]["runs"] == 2


def test_pareto_front_and_hypervolume_by_hand():
    points = np.array([[0.6, 0.2], [0.2, 0.6], [0.1, 0.1], [0.6, 0.1]])
    assert findings.pareto_front(points).tolist() == [True, True, False, False]
    # union of the boxes [0, .6]×[0, .2] and [0, .2]×[0, .6] above the reference (0, 0): 0.12 + 0.12 − 0.04
    assert findings.front_hypervolume(np.zeros(2), points) == pytest.approx(0.20)


# ------------------------------------------------------------------------------------------------ report


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]


def test_report_of_a_study_embeds_figures_and_tables(study_dir, tmp_path):
    path = write_report(study_dir, out=tmp_path / "rep")
    html = path.read_text()
    pngs = embedded_pngs(html)
    assert len(pngs) == 4 and all(p.startswith(b"\x89PNG") for p in pngs)  # curves, weights, Pareto, cost
    for section in ("Findings", "Held-out expected reward", "Per-objective change", "Interference per algorithm",
                    "Weight trajectories", "Pareto front", "Cost", "Runs not included"):
        assert f"<h2>{section}</h2>" in html
    assert "Covariance-law agreement" not in html  # no law/ metrics logged: the section is skipped
    assert "DEGRADES" in html and "tiny__mgda__grpo__s0" in html and "2/2 (100%)" in html
    markdown = (tmp_path / "rep" / "report.md").read_text()
    linked = re.findall(r"\]\((figures/[^)]+\.png)\)", markdown)
    assert len(linked) == 4 and all((tmp_path / "rep" / p).is_file() for p in linked)


def test_report_of_a_single_run(tmp_path):
    write_run(tmp_path / "run", tiny_config("linear", 0), LINEAR, finished=False)
    html = write_report(tmp_path / "run").read_text()
    assert (tmp_path / "run" / "report" / "report.md").is_file()
    assert "1 run(s) in 1 configuration(s)" in html and len(embedded_pngs(html)) >= 2
    assert "Under linear, clarity (−0.200 [" in html


def test_markdown_tables_escape_pipes():
    from moalign.study.report import Table

    md = render_markdown("t", [Table(["a", "b"], [["x|y", "1"]])])
    assert "| x\\|y | 1 |" in md


def test_report_needs_a_run_or_study_directory(tmp_path):
    with pytest.raises(UserError, match="neither a study directory"):
        write_report(tmp_path)


# ------------------------------------------------------------------------------------------------ runner


def fake_trainer(calls: list, fail: set[str] = frozenset(), interrupt: set[str] = frozenset()) -> Callable:
    """A training function that logs its calls and writes a finished synthetic run (or fails / is interrupted)."""
    def train(cfg: TrainConfig, run_dir: Path, resume: bool, on_step) -> dict:
        calls.append((run_dir.name, resume))
        if run_dir.name in fail:
            raise RuntimeError("boom")
        if run_dir.name in interrupt:
            raise KeyboardInterrupt
        for step in range(1, cfg.steps + 1):
            on_step(step)
        write_run(run_dir, cfg, LINEAR if cfg.weighting.name == "linear" else CTWA)
        return {}

    return train


def write_study_file(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_tree(**extra)))
    return path


def runs_csv(study: Path) -> dict[str, dict]:
    with (study / "runs.csv").open() as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_runner_skips_finished_runs_resumes_checkpointed_ones_and_starts_the_rest(tmp_path):
    config = write_study_file(tmp_path)
    out = tmp_path / "out"
    _, _, planned = grid.load_study(config, out)
    done, resumable = planned[0], planned[1]
    write_run(done.run_dir, done.config, LINEAR)
    before = (done.run_dir / "metrics.jsonl").read_bytes()
    (resumable.run_dir / "checkpoints").mkdir(parents=True)
    (resumable.run_dir / "checkpoints" / "step_0000002.pt").write_bytes(b"")
    assert [runner.plan_run(r.run_dir) for r in planned] == ["done", "resume", "start", "start"]
    assert runner.checkpoint_step(resumable.run_dir) == 2

    calls = []
    runner.run_study(config, out_dir=out, train_fn=fake_trainer(calls))
    assert calls == [("tiny__ctwa__grpo__s0", True), ("tiny__linear__grpo__s1", False), ("tiny__ctwa__grpo__s1", False)]
    assert (done.run_dir / "metrics.jsonl").read_bytes() == before  # a finished run is never touched
    assert {name: row["status"] for name, row in runs_csv(out).items()} == {r.name: "done" for r in planned}
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 4 * 4 * 3  # 4 runs; val and test at steps 0 and 3 (eval.every = 0); 3 objectives
    assert pd.read_csv(out / "results.csv").shape == table.shape
    resolved = yaml.safe_load((out / "study.yaml").read_text())
    assert [r["name"] for r in resolved["runs"]] == [r.name for r in planned]

    calls.clear()
    runner.run_study(config, out_dir=out, train_fn=fake_trainer(calls))
    assert calls == []  # everything is done: nothing runs again


def test_runner_records_failures_and_goes_on(tmp_path):
    config = write_study_file(tmp_path)
    out = tmp_path / "out"
    calls = []
    with pytest.raises(UserError, match=r"1 run\(s\) failed: tiny__linear__grpo__s0"):
        runner.run_study(config, out_dir=out, train_fn=fake_trainer(calls, fail={"tiny__linear__grpo__s0"}))
    assert len(calls) == 4
    rows = runs_csv(out)
    assert rows["tiny__linear__grpo__s0"]["status"] == "failed" and rows["tiny__linear__grpo__s0"]["error"] == "boom"
    assert "RuntimeError: boom" in (out / "runs" / "tiny__linear__grpo__s0" / "error.txt").read_text()
    assert [rows[n]["status"] for n in rows if n != "tiny__linear__grpo__s0"] == ["done"] * 3
    calls.clear()
    runner.run_study(config, out_dir=out, train_fn=fake_trainer(calls))  # the retry runs only the failed run
    assert calls == [("tiny__linear__grpo__s0", False)]
    assert not (out / "runs" / "tiny__linear__grpo__s0" / "error.txt").exists()


def test_an_interrupted_study_says_so_in_runs_csv(tmp_path):
    config = write_study_file(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt, match="run the same `moalign study` command again"):
        runner.run_study(config, out_dir=out, train_fn=fake_trainer([], interrupt={"tiny__ctwa__grpo__s0"}))
    statuses = {n: r["status"] for n, r in runs_csv(out).items()}
    assert statuses == {"tiny__linear__grpo__s0": "done", "tiny__ctwa__grpo__s0": "interrupted",
                        "tiny__linear__grpo__s1": "pending", "tiny__ctwa__grpo__s1": "pending"}


def test_jobs_train_runs_in_worker_processes_and_record_them_alike(tmp_path):
    import study_workers

    config = write_study_file(tmp_path, jobs=2)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"1 run\(s\) failed: tiny__ctwa__grpo__s1"):
        runner.run_study(config, out_dir=out, train_fn=study_workers.pretend_to_train)
    rows = runs_csv(out)
    assert {n: r["status"] for n, r in rows.items()} == {"tiny__linear__grpo__s0": "done", "tiny__ctwa__grpo__s0": "done",
                                                         "tiny__linear__grpo__s1": "done",
                                                         "tiny__ctwa__grpo__s1": "failed"}
    assert rows["tiny__ctwa__grpo__s1"]["error"] == "boom in a worker"
    assert "RuntimeError: boom in a worker" in (out / "runs" / "tiny__ctwa__grpo__s1" / "error.txt").read_text()
    assert all(rows[n]["steps_done"] == "3" for n in rows if rows[n]["status"] == "done")  # steps reported back
    pids = {json.loads((out / "runs" / n / "worker.json").read_text())["pid"] for n in rows if rows[n]["status"] == "done"}
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_run_dir_from_a_different_config_stops_the_study_before_anything_runs(tmp_path):
    config = write_study_file(tmp_path)
    out = tmp_path / "out"
    _, _, planned = grid.load_study(config, out, ["steps=9"])
    planned[2].run_dir.mkdir(parents=True)
    (planned[2].run_dir / "config.yaml").write_text(dump_config(planned[2].config))
    calls = []
    with pytest.raises(UserError, match="different config .*steps"):
        runner.run_study(config, out_dir=out, train_fn=fake_trainer(calls))
    assert calls == []
    # threads, logging and the run directory do not count as a different config
    _, _, same = grid.load_study(config, out, ["threads=3", "log.progress=false"])
    (planned[2].run_dir / "config.yaml").write_text(dump_config(same[2].config))
    runner.run_study(config, out_dir=out, train_fn=fake_trainer(calls))
    assert len(calls) == 4


# ------------------------------------------------------------------------------------------------ SFT data


def test_sft_answers_earn_accuracy_and_clarity():
    from moalign.data.arithmetic import generate_problems
    from moalign.objectives import ScoringBatch, load_objective

    problems = generate_problems(1, 4, 0, "train") + generate_problems(2, 4, 0, "train")
    answers = [sft_answer(p) for p in problems]
    assert answers[-1].splitlines()[-1] == f"Step 3: The answer is \\boxed{{{problems[-1].answer}}}."
    batch = ScoringBatch.from_lists(["q"] * 8, answers, [str(p.answer) for p in problems], [30] * 8)
    for name in ("accuracy", "clarity"):
        assert load_objective(name).score(batch).values.tolist() == [1.0] * 8


def test_sft_examples_come_from_the_train_split():
    from moalign.data.arithmetic import split_of
    from moalign.data.base import DEFAULT_PROMPT_SUFFIX

    prompts, answers = sft_examples(SFTRecipe(problems=((1, 5), (2, 3))))
    assert len(prompts) == len(answers) == 8
    assert all(split_of(p.removesuffix(DEFAULT_PROMPT_SUFFIX)) == "train" for p in prompts)


# ------------------------------------------------------------------------------------------------ end to end


def tiny_is_built() -> bool:
    from moalign.models.cache import cache_root
    from moalign.models.tiny import TinyRecipe, recipe_hash

    return (cache_root() / f"tiny-{recipe_hash(TinyRecipe(), 0)}").is_dir()


@pytest.mark.slow
@pytest.mark.skipif(not tiny_is_built(), reason="the tiny model is not built yet (it is built on first use)")
def test_a_small_study_on_the_tiny_model_runs_resumes_and_reports(tmp_path):
    study = {"name": "e2e", "base": {"model": "tiny", "steps": 2, "device": "cpu", "threads": 1,
                                     "data": {"num_train": 16, "num_val": 6, "num_test": 6},
                                     "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 32},
                                     "eval": {"num_prompts": 6}},
             "grid": {"weighting": ["linear", "ctwa"], "seed": [0]}}
    config = tmp_path / "e2e.yaml"
    config.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    calls = []

    def spy(cfg, run_dir, resume, on_step):
        calls.append(run_dir.name)
        return runner.train_run(cfg, run_dir, resume, on_step)

    runner.run_study(config, out_dir=out, train_fn=spy)
    assert calls == ["tiny__linear__grpo__s0", "tiny__ctwa__grpo__s0"]
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 2 * 4 * 3  # 2 runs; val and test at steps 0 and 2; 3 objectives
    assert table.value.between(0, 1).all()
    runner.run_study(config, out_dir=out, train_fn=spy)
    assert len(calls) == 2  # finished runs are not trained again
    html = write_report(out).read_text()
    findings_list = html.split("<h2>Findings</h2>")[1].split("</ul>")[0]
    assert "linear" in findings_list and "ctwa" in findings_list and len(embedded_pngs(html)) == 4


def test_a_study_run_writes_its_warnings_to_its_directory_not_the_terminal(tmp_path, capsys, monkeypatch):
    from moalign.diagnostics.law import LawMonitor

    monkeypatch.setattr(LawMonitor, "warnings", lambda self: ["clarity is likely to degrade", "accuracy too"])
    cfg = TrainConfig(model={"name": "tiny"}, steps=2, eval={"every": 0, "test_at_end": False, "num_prompts": 2},
                      rollout={"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8},
                      diagnostics={"probe_prompts": 0})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runner.train_run(cfg, run_dir, False, lambda step: None)
    assert "warning" not in capsys.readouterr().out
    assert (run_dir / runner.WARNINGS_FILE).read_text().splitlines() == [
        "step 1: warning: clarity is likely to degrade", "step 1: warning: accuracy too",
        "step 2: warning: clarity is likely to degrade", "step 2: warning: accuracy too"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["law/warning"] for r in records if "law/warning" in r] == ["clarity is likely to degrade; accuracy too"] * 2
