"""The benchmark scripts still run against the current code: one short run of each on the tiny model. Their numbers
are not checked (timings are not tests); a benchmark broken by a change elsewhere is caught here, not when
someone next needs its figures (bench/step.py was broken for a session by a new PhaseTimer argument)."""

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
