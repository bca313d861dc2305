"""Planning a study (moalign.study.power): variance components read from a pilot's run directories, their envelope,
the cost model and the design table, on hand-built runs."""

import json

import numpy as np
import pytest
import yaml

from moalign.diagnostics.crossed import Design, VarianceComponents, power
from moalign.study.findings import load_study
from moalign.study.power import Costs, design_table, envelope, pilot_components

OBJECTIVES = ["accuracy", "clarity"]


def write_pilot_run(root, algorithm: str, seed: int, start: dict, end: dict, step_s: float, wall_s: float) -> None:
    """A finished run with sampled val evaluations at steps 0 and 10: per-completion rewards [P, K] per objective."""
    run_dir = root / "runs" / f"tiny__{algorithm}__grpo__s{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"objectives": OBJECTIVES, "seed": seed,
                                                         "weighting": {"name": algorithm}, "model": {"name": "tiny"}}))
    lines = []
    for step, tables in ((0, start), (10, end)):
        line = {"step": step, "eval/val/sampled/seconds": 0.5, "eval/val/sampled/completions": 100}
        for objective, table in tables.items():
            line[f"eval/val/sampled/{objective}/per_prompt"] = table.mean(axis=1).tolist()
            line[f"eval/val/sampled/{objective}/per_sample"] = table.tolist()
        lines.append(line)
    lines[0] |= {"scalarization/accuracy": 0.75, "scalarization/clarity": 0.25}
    lines[1:1] = [{"step": s, "perf/step_s": step_s} for s in range(1, 11)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "summary.json").write_text("{}")
    with (root / "runs.csv").open("a") as f:
        if f.tell() == 0:
            f.write("run,status,wall_s,steps_done\n")
        f.write(f"{run_dir.name},done,{wall_s},10\n")


def test_pilot_components_are_the_estimates_on_each_algorithms_seeds(tmp_path):
    rng = np.random.default_rng(0)
    tables = {}
    for algorithm, step_s in (("linear", 0.1), ("mgda", 0.3)):
        for seed in range(3):
            start = {o: rng.integers(0, 2, (6, 4)).astype(float) for o in OBJECTIVES}
            end = {o: rng.integers(0, 2, (6, 4)).astype(float) for o in OBJECTIVES}
            tables[(algorithm, seed)] = (start, end)
            write_pilot_run(tmp_path, algorithm, seed, start, end, step_s, wall_s=10 * step_s + 2 * 0.5 + 1.5)
    runs = load_study(tmp_path).runs
    components = pilot_components(runs)
    assert set(components) == {(a, o) for a in ("linear", "mgda") for o in (*OBJECTIVES, "score")}
    for algorithm in ("linear", "mgda"):
        start = {o: np.stack([tables[(algorithm, s)][0][o] for s in range(3)]) for o in OBJECTIVES}
        end = {o: np.stack([tables[(algorithm, s)][1][o] for s in range(3)]) for o in OBJECTIVES}
        assert components[(algorithm, "clarity")] == VarianceComponents.estimate(start["clarity"], end["clarity"])
        score = [0.75 * t["accuracy"] + 0.25 * t["clarity"] for t in (start, end)]
        assert components[(algorithm, "score")] == pytest.approx(VarianceComponents.estimate(*score))

    costs = Costs.measure(runs)
    assert costs.step == pytest.approx({"linear": 0.1, "mgda": 0.3})
    assert costs.completion == pytest.approx(0.5 / 100)
    assert costs.run == pytest.approx(1.5)  # wall − steps − evaluations, the median over runs


def test_envelope_takes_each_components_maximum():
    a = VarianceComponents(seed=0.001, prompt=0.02, interaction=0.0, sample=0.2)
    b = VarianceComponents(seed=0.003, prompt=0.01, interaction=0.004, sample=0.1)
    assert envelope([a, b]) == VarianceComponents(seed=0.003, prompt=0.02, interaction=0.004, sample=0.2)


def test_cost_model_by_hand():
    costs = Costs({"a": 0.1, "b": 0.2}, completion=0.001, run=1.0)
    # per seed: a: 100·0.1 + 5·(10·3)·0.001 + 1 = 11.15, b: 21.15; 2 seeds, 2 jobs
    assert costs.minutes(Design(2, 10, 3), steps=100, evaluations_per_run=5, jobs=2) == pytest.approx(32.3 / 60)
    # and one greedy completion per prompt more in every evaluation: 10 · 5 · 0.001 = 0.05 per run
    assert costs.minutes(Design(2, 10, 3), 100, 5, 2, greedy_too=True) == pytest.approx(32.4 / 60)


def test_design_table_is_cheapest_first_with_the_powers_of_each_design():
    planning = VarianceComponents(seed=0.001, prompt=0.01, interaction=0.002, sample=0.2)
    costs = Costs({"a": 0.1}, completion=0.001, run=0.0)
    rows = design_table(planning, costs, 0.1, steps=100, evaluations_per_run=4, jobs=1, seeds=(2, 3),
                        prompts=(16, 32), samples=(1, 2))
    assert len(rows) == 8
    minutes = [r["minutes"] for r in rows]
    assert minutes == sorted(minutes)
    row = next(r for r in rows if (r["seeds"], r["prompts"], r["samples"]) == (3, 32, 2))
    assert row["power"] == power(planning, Design(3, 32, 2), 0.1)
    assert row["minutes"] == pytest.approx(3 * (100 * 0.1 + 4 * 64 * 0.001) / 60)
