"""What the report says, against hand-built runs whose every number can be computed on paper: the change table's
intervals and verdicts, the generated findings, hypervolumes and their reference point, the covariance law binned by
the size of the prediction (resolved or within noise) at both scales, and the cost of evaluation against training."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

from moalign.diagnostics.law import agreement_bins, wilson_interval
from moalign.study import agreement, findings
from moalign.study.report import evaluation_cost_sentence, write_report
from test_study import HALF, ONES, tiny_config, write_run

N = 20  # evaluation prompts of the hand-built runs
FLAT = (HALF, HALF)
TWELVE = np.array([1.0] * 12 + [0.0] * 8)  # 0.5 -> 0.6: prompts 10 and 11 gain
SIX_LOST = np.array([0.0] * 4 + [1.0] * 6 + [0.0] * 10)  # 0.5 -> 0.3: prompts 0–3 lose


def paired_t(changes: np.ndarray) -> str:
    """"−0.200 [−0.392, −0.008]" from per-prompt changes, by scipy's one-sample t (one run, or identical seeds)."""
    ci = stats.ttest_1samp(changes, 0.0).confidence_interval(0.95)
    return " ".join([f"{changes.mean():+.3f}", f"[{ci.low:+.3f},", f"{ci.high:+.3f}]"]).replace("-", "−")


def markdown_row(markdown: str, *cells: str) -> list[str]:
    """The cells of the first table row that starts with ``cells``, Markdown's backslash escapes removed."""
    for line in markdown.splitlines():
        row = [re.sub(r"\\(.)", r"\1", c.strip()) for c in line.strip().strip("|").split(" | ")]
        if row[:len(cells)] == list(cells):
            return row
    raise AssertionError(f"no row starting with {cells}")


@pytest.fixture
def three_algorithms(tmp_path):
    """linear: accuracy +0.5, conciseness −0.2 (degrades), clarity +0.5; the uniform score rises by 0.267:
    interference. ctwa: accuracy +0.5, conciseness +0.1 (2 of 20 prompts: not detected): improvement. mgda: nothing
    moves. Two identical seeds each (the interval is the paired t over the prompts)."""
    curves = {"linear": {"accuracy": (HALF, ONES), "conciseness": (HALF, SIX_LOST), "clarity": (HALF, ONES)},
              "ctwa": {"accuracy": (HALF, ONES), "conciseness": (HALF, TWELVE), "clarity": FLAT},
              "mgda": {"accuracy": FLAT, "conciseness": FLAT, "clarity": FLAT}}
    for seed in (0, 1):
        for weighting, objective_curves in curves.items():
            write_run(tmp_path / "runs" / f"tiny__{weighting}__grpo__s{seed}", tiny_config(weighting, seed),
                      objective_curves)
    return tmp_path


# ------------------------------------------------------------------------------------------------ table and findings


def test_change_table_shows_the_interval_and_the_verdict_of_a_known_effect(three_algorithms, tmp_path):
    write_report(three_algorithms, out=tmp_path / "rep")
    markdown = (tmp_path / "rep" / "report.md").read_text()
    lost = -np.array([1.0] * 4 + [0.0] * 16)
    linear = markdown_row(markdown, "tiny", "grpo", "linear", "2", "accuracy")
    assert linear[7:10] == [paired_t(np.array([0.0] * 10 + [1.0] * 10)), "rises", "interference"]
    conciseness = markdown_row(markdown, "", "", "", "", "conciseness", "0.500", "0.300")
    assert conciseness[7:9] == [paired_t(lost), "DEGRADES"]
    assert markdown_row(markdown, "tiny", "grpo", "mgda")[9] == "no effect detected"
    interference = markdown_row(markdown, "linear", "tiny", "grpo")
    assert interference[3:] == ["interference", f"conciseness {paired_t(lost)}", "2/2 (100%)"]
    assert markdown_row(markdown, "all algorithms")[-1] == "2/6 (33%)"


def test_findings_are_generated_from_the_verdicts(three_algorithms):
    (finding,) = findings.Findings(findings.load_study(three_algorithms)).findings()
    assert finding.overview == ("Verdicts (seeds pooled): interference under linear; improvement under ctwa; no effect "
                                "detected under mgda.")
    lost = paired_t(-np.array([1.0] * 4 + [0.0] * 16))
    gained = paired_t(np.array([0.0] * 10 + [1.0] * 2 + [0.0] * 8))
    solved = paired_t(np.array([0.0] * 10 + [1.0] * 10))
    assert finding.clauses[0].startswith(f"Under linear, conciseness ({lost}) degrades on held-out prompts while "
                                         f"accuracy ({solved}) and clarity ({solved}) rise; the λ0-scalarized score "
                                         f"rises (")
    assert finding.clauses[0].endswith("): **interference**; 2 of 2 runs interfere on their own.")
    # conciseness's +0.1 (2 of 20 prompts) is not detected: its interval contains 0
    assert finding.clauses[1].startswith(f"Under ctwa, accuracy ({solved}) rises on held-out prompts; no effect "
                                         f"detected on conciseness ({gained}) and clarity (+0.000 [+0.000, +0.000]); "
                                         f"the λ0-scalarized score rises (")
    assert finding.clauses[2] == ("Under mgda, no effect detected on any objective or on the λ0-scalarized score "
                                  "(every interval contains 0); 0 of 2 runs interfere on their own.")
    assert finding.contrast == (f"Conciseness, which degrades under linear ({lost}): no effect detected under ctwa "
                                f"({gained}) and mgda (+0.000 [+0.000, +0.000]).")


def test_a_degradation_shared_by_another_algorithm_is_said_so(tmp_path):
    for weighting in ("linear", "pama"):
        write_run(tmp_path / "runs" / weighting, tiny_config(weighting, 0),
                  {"accuracy": (HALF, ONES), "clarity": (HALF, np.zeros(N))})
    (finding,) = findings.Findings(findings.load_study(tmp_path)).findings()
    lost = paired_t(-HALF)
    assert finding.contrast == f"Clarity, which degrades under linear ({lost}): also degrades under pama ({lost})."
    # the uniform score's change is (0.5 − 0.5)/2 = 0 on every prompt: degradation, not interference
    assert finding.overview == "Verdicts: degradation under linear and pama."


def test_each_algorithm_against_linear_is_a_paired_difference_per_prompt(three_algorithms, tmp_path):
    # ctwa − linear per prompt: accuracy 0; conciseness TWELVE − SIX_LOST (prompts 0–3 and 10–11: +0.3); clarity
    # 0 − (ONES − HALF) (−0.5); identical seeds, so each interval is the paired t over the prompts.
    (finding,) = findings.Findings(findings.load_study(three_algorithms)).findings()
    conciseness = paired_t(TWELVE - SIX_LOST)
    clarity = paired_t(HALF - ONES)
    score = paired_t((TWELVE - SIX_LOST + HALF - ONES) / 3)
    assert finding.against_baseline[0] == (
        f"Against linear (Δ − Δ_linear, 2 seeds paired), ctwa: ends higher on conciseness ({conciseness}); ends lower on "
        f"clarity ({clarity}); no difference detected on accuracy (+0.000 [+0.000, +0.000]) and the λ0-scalarized "
        f"score ({score}).")
    write_report(three_algorithms, out=tmp_path / "rep")
    markdown = (tmp_path / "rep" / "report.md").read_text()
    row = markdown_row(markdown, "ctwa", "tiny", "grpo", "2", "accuracy")
    assert row[5:] == ["+0.500", "+0.500", "+0.000 [+0.000, +0.000]", ""]
    assert markdown_row(markdown, "", "", "", "", "conciseness", "−0.200", "+0.100")[7:] == [conciseness, "higher"]


def test_contrast_pairs_runs_by_seed_and_refuses_what_cannot_be_paired(tmp_path):
    from moalign.diagnostics.crossed import change_interval
    from moalign.diagnostics.interference import contrast
    from moalign.diagnostics.runs import load_run

    def run(weighting, seed, end, prompts=N):
        path = tmp_path / f"{weighting}{seed}-{prompts}"
        write_run(path, tiny_config(weighting, seed), {"accuracy": (np.zeros(prompts), end)})
        return load_run(path)

    rng = np.random.default_rng(0)
    ends = {s: rng.integers(0, 2, N).astype(float) for s in range(5)}
    linear = [run("linear", s, ends[s]) for s in (0, 1, 2)]
    ctwa = [run("ctwa", s, ends[s + 1]) for s in (1, 2, 3)]  # seeds 1 and 2 in common
    accuracy = contrast(linear, ctwa, "val")[0]
    d = np.stack([ends[2] - ends[1], ends[3] - ends[2]])  # seed 1: ctwa ends[2] − linear ends[1]; seed 2 likewise
    by_hand = change_interval(d)
    assert accuracy.estimate.seeds == 2
    assert accuracy.change == pytest.approx(d.mean())
    assert accuracy.change_ci == pytest.approx(by_hand.interval)
    assert contrast(linear[:1], ctwa[-1:], "val") is None  # seed 0 against seed 3: nothing to pair
    assert contrast(linear[:1], [run("ctwa", 0, np.ones(N - 2), prompts=N - 2)], "val") is None  # other prompts


# ------------------------------------------------------------------------------------------------ hypervolume


def test_hypervolume_of_hand_computed_fronts():
    # 3-D: boxes [0,1]×[0,1]×[0,.5] and [0,.5]×[0,.5]×[0,1] over the origin overlap in [0,.5]³: 0.5 + 0.25 − 0.125
    points = np.array([[1.0, 1.0, 0.5], [0.5, 0.5, 1.0]])
    assert findings.front_hypervolume(np.zeros(3), points) == pytest.approx(0.625)
    assert findings.front_hypervolume(np.zeros(3), np.array([1.0, 1.0, -0.1])) == 0.0  # below the reference
    # the reference: lowest value minus 10% of the range, at least 0.01 (the second objective does not vary)
    reference = findings.hypervolume_reference(np.array([[0.2, 0.5], [0.4, 0.5], [0.3, 0.5]]))
    assert reference == pytest.approx([0.18, 0.49])


def test_hypervolumes_are_positive_where_an_objective_falls_and_the_reference_is_stated(three_algorithms, tmp_path):
    f = findings.Findings(findings.load_study(three_algorithms))
    (pareto,) = f.pareto.values()
    # points: start (.5,.5,.5); ends linear (1,.3,1), ctwa (1,.6,.5), mgda (.5,.5,.5)
    # reference = (.5 − .05, .3 − .03, .5 − .05); ideal (1, .6, 1)
    assert pareto.reference == pytest.approx([0.45, 0.27, 0.45])
    box = 0.55 * 0.33 * 0.55
    by_label = {c.label: c for c in pareto.configs}
    assert pareto.of(by_label["linear"]) == pytest.approx((0.05 * 0.23 * 0.05 / box, 0.55 * 0.03 * 0.55 / box))
    assert pareto.of(by_label["ctwa"])[1] == pytest.approx(0.55 * 0.33 * 0.05 / box)
    assert pareto.of(by_label["linear"])[1] > 0  # conciseness fell, yet its volume is not 0
    markdown = (write_report(three_algorithms, out=tmp_path / "rep").parent / "report.md").read_text()
    assert "accuracy 0.450, conciseness 0.270, clarity 0.450" in markdown  # the reference point, stated
    assert markdown_row(markdown, "tiny", "grpo", "linear")[10] == "{:.3f} → {:.3f}".format(*pareto.of(by_label["linear"]))


# ------------------------------------------------------------------------------------------------ covariance law


def test_agreement_bins_resolve_only_changes_above_the_noise():
    # 30 small predictions whose realised changes are pure noise (|r| = se = 0.1, half agreeing in sign), then 30 large
    # ones realised at 0.5 with se 0.1 (signal √(0.25 − 0.01)), 24 of them with the predicted sign
    small = np.linspace(0.01, 0.3, 30)
    large = np.linspace(1.0, 3.0, 30)
    predicted = np.concatenate([small, -large])
    realised = np.concatenate([0.1 * np.where(np.arange(30) % 2 == 0, 1.0, -1.0),
                               -0.5 * np.where(np.arange(30) < 24, 1.0, -1.0)])
    se = np.full(60, 0.1)
    low, high = agreement_bins(predicted, realised, se, num_bins=4, min_pairs=25)  # 60 pairs: two bins of 30
    assert (low.pairs, low.high, high.low) == (30, pytest.approx(0.3), pytest.approx(1.0))
    assert (low.signal, low.resolved) == (0.0, False)
    assert low.sign_agreement == pytest.approx(0.5) and low.noise == pytest.approx(0.1)
    assert high.signal == pytest.approx(math.sqrt(0.24)) and high.resolved is True
    assert high.sign_agreement == pytest.approx(0.8)
    ci = stats.binomtest(24, 30).proportion_ci(0.95, method="wilson")
    assert high.sign_agreement_ci == pytest.approx((ci.low, ci.high))
    fisher = stats.pearsonr(predicted[30:], realised[30:]).confidence_interval(0.95)
    assert high.correlation_ci == pytest.approx((fisher.low, fisher.high))
    assert len(agreement_bins(predicted[:40], realised[:40], se[:40], num_bins=4, min_pairs=25)) == 1
    assert math.isnan(wilson_interval(0, 0)[0])


def test_predictions_of_exactly_zero_form_one_bin():
    from moalign.diagnostics.law import bin_parts
    predicted = np.array([0.0] * 70 + list(np.linspace(0.01, 1.0, 50)))
    parts = bin_parts(predicted, num_bins=4, min_pairs=25)
    assert [len(p) for p in parts] == [70, 25, 25]
    assert np.all(predicted[parts[0]] == 0) and np.all(predicted[parts[1]] < predicted[parts[2]].min())
    assert [len(p) for p in bin_parts(predicted[60:], num_bins=4, min_pairs=25)] == [30, 30]  # 10 zeros: no own bin


def test_evaluation_intervals_pair_summed_predictions_with_the_evaluations_change(tmp_path):
    # val evaluated at steps 0, 2, 4; accuracy 0.5 -> 0.75 -> 1.0 (prompts 10–14, then 15–19, solved)
    law = {"cov_w/accuracy": [1.0, 2.0, -1.0, -0.5]}
    write_run(tmp_path / "r", tiny_config("linear", 0), {"accuracy": (HALF, ONES)}, law=law)
    (run,) = findings.load_study(tmp_path / "r").runs
    pairs = agreement.interval_pairs(run)
    assert pairs.predicted == pytest.approx([3.0, -1.5])
    assert pairs.realised == pytest.approx([0.25, 0.25])
    five = np.array([0.0] * 10 + [1.0] * 5 + [0.0] * 5)
    assert pairs.se == pytest.approx([five.std(ddof=1) / math.sqrt(N)] * 2)
    # a step without a prediction leaves its interval out
    write_run(tmp_path / "s", tiny_config("linear", 0), {"accuracy": (HALF, ONES)},
              law={"cov_w/accuracy": [1.0, None, -1.0, -0.5]})
    (gap,) = findings.load_study(tmp_path / "s").runs
    assert agreement.interval_pairs(gap).predicted == pytest.approx([-1.5])


def test_step_law_below_the_probe_resolution_says_what_probe_would_resolve_it(tmp_path):
    steps = 50
    predicted = np.linspace(0.1, 5.0, steps)
    sign = np.where(np.arange(steps) % 2 == 0, 1.0, -1.0)
    # small predictions: realised at the noise (0.02); large ones at 0.025 with se 0.02: signal 0.015 < noise 0.02
    realised = np.where(np.arange(steps) < 25, 0.02, 0.025) * sign
    law = {"cov_w/accuracy": predicted.tolist(), "realised/accuracy": realised.tolist(),
           "realised_se/accuracy": [0.02] * steps, "probe_completions": [16] * steps}
    write_run(tmp_path / "r", tiny_config("ctwa", 0, steps=steps, eval_every=25), {"accuracy": (HALF, ONES)}, law=law)
    runs = findings.load_study(tmp_path / "r").runs
    evidence = agreement.law_evidence(runs)
    scale = evidence.step
    assert [b.pairs for b in scale.bins] == [25, 25] and scale.completions == 16
    assert scale.bins[1].signal == pytest.approx(0.015) and not scale.resolved_bins
    assert scale.completions_to_resolve() == pytest.approx(16 * (0.02 / 0.015) ** 2)
    sentence = agreement.describe_scale(scale)
    assert "16 completions per measurement: no bin's realised changes exceed their noise" in sentence
    assert "not measurable" in sentence
    assert ("takes ≈ 28 completions per measurement (diagnostics.probe_prompts × diagnostics.probe_group_size, now "
            "16)") in sentence


def test_resolved_bins_report_their_agreement(tmp_path):
    steps = 50
    predicted = np.linspace(0.1, 5.0, steps)
    # the 25 largest predictions are realised at 0.1 (se 0.02), 20 with their sign; the smallest within noise
    agree = np.where(np.arange(steps) < 45, 1.0, -1.0)
    realised = np.where(np.arange(steps) < 25, 0.02 * np.where(np.arange(steps) % 2 == 0, 1.0, -1.0), 0.1 * agree)
    law = {"cov_w/accuracy": predicted.tolist(), "realised/accuracy": realised.tolist(),
           "realised_se/accuracy": [0.02] * steps, "probe_completions": [16] * steps}
    write_run(tmp_path / "r", tiny_config("ctwa", 0, steps=steps, eval_every=25), {"accuracy": (HALF, ONES)}, law=law)
    evidence = agreement.law_evidence(findings.load_study(tmp_path / "r").runs)
    sentence = agreement.describe_scale(evidence.step)
    ci = wilson_interval(20, 25)
    assert (f"the realised changes exceed their noise in 1 of 2 bins (|predicted| ≥ {predicted[25]:.3g}); there the "
            f"predicted change's sign agrees with the realised one in 0.80 [{ci[0]:.2f}, {ci[1]:.2f}] of 25 pairs"
            ) in sentence
    assert "in the other bin the changes are within the noise (signal/noise 0.00)" in sentence


def test_report_shows_the_law_at_both_scales(tmp_path):
    steps = 4
    law = {"cov_w/accuracy": [1.0, 2.0, -1.0, -0.5], "realised/accuracy": [0.1, 0.0, -0.1, 0.05],
           "realised_se/accuracy": [0.05] * steps, "probe_completions": [8] * steps}
    for seed in (0, 1):
        write_run(tmp_path / "runs" / f"tiny__ctwa__grpo__s{seed}", tiny_config("ctwa", seed),
                  {"accuracy": (HALF, ONES)}, law=law)
    html = write_report(tmp_path, out=tmp_path / "rep").read_text()
    for heading in ("<h2>Covariance-law agreement</h2>", "<h3>Per evaluation interval</h3>",
                    "<h3>Per step (probe)</h3>"):
        assert heading in html
    assert "<strong>Covariance law.</strong> Per evaluation interval" in html  # the findings' sentence


# ------------------------------------------------------------------------------------------------ cost


def test_evaluation_cost_against_training(tmp_path):
    # 4 steps of 1 s (0.25 s of them diagnostics), 4 completions of 10 tokens per step (2 prompts × 2): 160 tokens;
    # sampled evaluations of 0.5 s and 30 tokens at steps 0 and 4, greedy 0.25 s and 10 tokens at step 4
    cfg = tiny_config("linear", 0, rollout={"prompts_per_step": 2, "group_size": 2})
    extra = {step: {"train/length/mean": 10.0, "time/diagnostics_s": 0.25} for step in range(1, 5)}
    for step in (0, 4):
        extra.setdefault(step, {}).update({"eval/val/sampled/seconds": 0.5, "eval/val/sampled/tokens": 30,
                                           "eval/val/sampled/completions": 8})
    extra[4].update({"eval/val/greedy/seconds": 0.25, "eval/val/greedy/tokens": 10, "eval/val/greedy/completions": 2})
    write_run(tmp_path / "r", cfg, {"accuracy": (HALF, ONES)}, extra=extra)
    (row,) = findings.evaluation_cost_rows(findings.load_study(tmp_path / "r").runs)
    assert (row["train_s"], row["diagnostics_s"], row["train_tokens"]) == (4.0, 1.0, 160.0)
    assert (row["sampled_seconds"], row["sampled_tokens"], row["greedy_seconds"]) == (1.0, 60.0, 0.25)
    assert evaluation_cost_sentence([row]) == (
        "Held-out evaluation took 1 s (sampled 1 s, greedy 0 s) against 4 s of training (31.2% of it), summed over "
        "the runs; of training, the end-of-step diagnostics (covariance-law monitor and probe) took 1 s. Evaluation "
        "generated 70 tokens against training's 160 (43.8%).")
    html = write_report(tmp_path / "r").read_text()
    assert re.search(r"<td>linear</td><td>tiny</td><td>1</td><td>4</td><td>160</td><td>1</td><td>60</td>", html)
