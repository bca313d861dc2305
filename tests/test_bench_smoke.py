"""The benchmark scripts still run against the current code: one short run of each on the tiny model. Their numbers
are not checked (timings are not tests): a benchmark that a change elsewhere breaks (a renamed argument, a moved
function) fails here, where the change is made, instead of when someone next needs its figures."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str) -> dict[str, str]:
    """The ``name: value`` lines a benchmark printed (it must exit 0)."""
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)


def test_step_benchmark_runs():
    values = run_bench("step.py", "--steps", "1", "--threads", "1", "model=tiny", "rollout.max_new_tokens=16")
    assert float(values["step_s"]) > 0 and float(values["peak_rss_gb"]) > 0
    phases = [name for name in values if name.startswith("phase_") and name.endswith("_fraction")]
    assert {"phase_sample_fraction", "phase_update_fraction"} <= set(phases)
    assert 0.5 < sum(float(values[name]) for name in phases) < 1.01  # the phases make up the step (3 digits each)


def test_rollout_benchmark_runs():
    values = run_bench("rollout.py", "--models", "tiny", "--shapes", "2x2", "--repeats", "1", "--min-seconds", "0",
                       "--max-new-tokens", "8", "--threads", "1")
    assert values["greedy_identical_tiny_b16"] == "true"
    assert float(values["rollout_speedup_tiny_b4"]) > 0


def test_step_benchmark_compares_precisions():
    values = run_bench("step.py", "--steps", "1", "--threads", "1", "--precisions", "fp32,bf16-mixed", "model=tiny",
                       "rollout.max_new_tokens=8")
    assert float(values["step_s_fp32"]) > 0 and float(values["step_s_bf16-mixed"]) > 0
    assert float(values["step_speedup_bf16-mixed"]) > 0


def test_rollout_benchmark_compares_precisions():
    values = run_bench("rollout.py", "--models", "tiny", "--shapes", "2x2", "--repeats", "1", "--min-seconds", "0",
                       "--max-new-tokens", "8", "--threads", "1", "--precisions", "fp32,bf16-mixed")
    assert values["greedy_identical_tiny_bf16-mixed_b16"] == "true"  # both samplers on the same bf16 model
    assert float(values["rollout_bf16_speedup_fast_tiny_b4"]) > 0


def test_precision_benchmark_runs():
    values = run_bench("precision.py", "--model", "tiny", "--parts", "accuracy,ways", "--prompts", "2", "--samples",
                       "2", "--max-new-tokens", "8", "--greedy-prompts", "2", "--rounds", "1", "--sampler-tokens", "4",
                       "--threads", "1")
    assert float(values["logprob_abs_diff_bf16_median"]) >= 0 and float(values["update_s_bf16_working_copy"]) > 0
    assert values["ratio_same_weights_fp32_outside_clip_fraction"] == "0"
