"""Held-out evaluation (engine/evaluation.py) on the `tiny` model: sampled and greedy modes, common random numbers
across the evaluations of a run, the training RNG left alone, objectives never observed, the fixed scalarization
and the cost in the summary."""

import dataclasses

import pytest
import torch

from moalign.diagnostics.runs import eval_cost
from moalign.engine.evaluation import eval_uniforms, fixed_scalarization
from moalign.engine.metrics import read_metrics
from moalign.engine.trainer import Trainer
from test_engine import tiny_config

torch.set_num_threads(1)


def trainer(tmp_path, *extra, name="run") -> Trainer:
    run_dir = tmp_path / name
    run_dir.mkdir()
    return Trainer(tiny_config(*extra), run_dir)


def test_sampled_evaluation_scores_every_completion_and_averages_per_prompt(tmp_path):
    t = trainer(tmp_path, "eval.mode=both", "eval.samples=3")
    record = t.evaluate("val")
    for name in t.objective_names:
        per_sample = record[f"eval/val/sampled/{name}/per_sample"]
        assert len(per_sample) == 4 and all(len(row) == 3 for row in per_sample)
        assert record[f"eval/val/sampled/{name}/per_prompt"] == pytest.approx([sum(r) / 3 for r in per_sample])
        assert record[f"eval/val/sampled/{name}/mean"] == pytest.approx(sum(sum(r) for r in per_sample) / 12)
        assert len(record[f"eval/val/greedy/{name}/per_prompt"]) == 4
        assert f"eval/val/greedy/{name}/per_sample" not in record
    assert record["eval/val/sampled/completions"] == 12 and record["eval/val/greedy/completions"] == 4
    assert record["eval/val/sampled/tokens"] == pytest.approx(12 * record["eval/val/sampled/response_tokens"])
    assert record["eval/val/sampled/seconds"] > 0


@pytest.mark.parametrize("sampler", ["fast", "hf"])
def test_evaluations_of_a_run_share_their_random_numbers_and_leave_the_training_rng_alone(tmp_path, sampler):
    """The same policy evaluated twice draws the same completions (a change between evaluations is the policy's);
    neither evaluation draws from torch's global RNG."""
    t = trainer(tmp_path, f"rollout.sampler={sampler}", "eval.samples=4")
    state = torch.random.get_rng_state()
    first, second = t.evaluate("val"), t.evaluate("val")
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in t.objective_names:
        assert first[f"eval/val/sampled/{name}/per_sample"] == second[f"eval/val/sampled/{name}/per_sample"]
    test = t.evaluate("test")  # another split, another stream
    assert test["eval/test/sampled/sample_text"] != first["eval/val/sampled/sample_text"]


def test_a_prompts_completions_do_not_depend_on_how_many_prompts_are_evaluated(tmp_path):
    t = trainer(tmp_path, "eval.samples=4")
    four = t.evaluate("val")
    t.eval_settings = dataclasses.replace(t.eval_settings, num_prompts=2)
    two = t.evaluate("val")
    for name in t.objective_names:
        assert two[f"eval/val/sampled/{name}/per_sample"] == four[f"eval/val/sampled/{name}/per_sample"][:2]
    assert torch.equal(eval_uniforms(0, "val", 2, 4, 24), eval_uniforms(0, "val", 4, 4, 24)[:8])


def test_evaluation_never_observes_objectives(tmp_path):
    t = trainer(tmp_path, "eval.samples=2")
    conciseness = next(o for o in t.objectives if o.name == "conciseness")
    before = conciseness.state_dict()
    t.evaluate("val")
    assert conciseness.state_dict() == before


def test_the_evaluation_mode_does_not_change_training(tmp_path):
    """Sampled evaluation draws from its own generator: training under eval.mode=sampled and greedy is the same."""
    lines = {}
    for mode in ("sampled", "greedy"):
        t = trainer(tmp_path, f"eval.mode={mode}", "eval.every=1", "steps=3", name=mode)
        t.run()
        lines[mode] = [{k: v for k, v in line.items() if k.startswith(("train/", "loss/", "weight/"))}
                       for line in read_metrics(t.run_dir / "metrics.jsonl")]
    assert lines["sampled"] == lines["greedy"] and any(lines["sampled"])


def test_start_line_holds_the_fixed_scalarization_and_the_summary_the_cost(tmp_path):
    t = trainer(tmp_path, "weighting=lagrangian", "eval.samples=2", "eval.test_at_end=false", "steps=1")
    summary = t.run()
    start = read_metrics(t.run_dir / "metrics.jsonl")[0]
    # the Lagrangian's initial weights: the primary objective 1, the duals 0
    assert {k: v for k, v in start.items() if k.startswith("scalarization/")} == {
        "scalarization/accuracy": 1.0, "scalarization/conciseness": 0.0, "scalarization/clarity": 0.0}
    assert summary["eval_cost"]["sampled"]["evaluations"] == 2  # val at the start and the end
    assert summary["eval_cost"]["sampled"]["completions"] == 2 * 4 * 2
    assert set(summary["eval"]["val"]) == {"sampled"}


def test_fixed_scalarization_normalises_the_initial_weights():
    names = ["a", "b", "c"]
    assert fixed_scalarization(names, torch.tensor([1.0, 1.0, 2.0])) == {
        "scalarization/a": 0.25, "scalarization/b": 0.25, "scalarization/c": 0.5}
    assert fixed_scalarization(names, torch.zeros(3)) == pytest.approx(
        {"scalarization/a": 1 / 3, "scalarization/b": 1 / 3, "scalarization/c": 1 / 3})


def test_eval_cost_adds_up_the_evaluations_of_each_mode():
    records = [{"step": 0, "eval/val/sampled/seconds": 1.5, "eval/val/sampled/completions": 8,
                "eval/val/sampled/tokens": 80, "eval/test/sampled/seconds": 0.5, "eval/test/sampled/completions": 8,
                "eval/test/sampled/tokens": 40, "eval/val/greedy/seconds": 0.25},
               {"step": 1, "train/score/mean": 0.3},
               {"step": 2, "eval/val/sampled/seconds": 1.0, "eval/val/sampled/completions": 8,
                "eval/val/sampled/tokens": 60}]
    assert eval_cost(records) == {"sampled": {"evaluations": 3, "seconds": 3.0, "completions": 24, "tokens": 180},
                                  "greedy": {"evaluations": 1, "seconds": 0.25, "completions": 0, "tokens": 0}}
