"""Step time of every weighting algorithm relative to ``linear``, measured in the same run.

    python bench/algorithms.py            # on `tiny` (≈ 2 minutes)
    python bench/algorithms.py --full     # on the embedded SmolLM2-135M (long)

Every algorithm gets its own trainer on the same config; steps are interleaved round-robin (linear, a, b, …,
linear, a, b, …) so that load from other processes hits all of them alike, and the median step time is compared
with linear's. Prints ``name: ratio`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report, set_threads  # noqa: E402

TINY = ["model=tiny", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=32",
        "eval.num_prompts=1", "eval.test_at_end=false", "log.progress=false", "data.num_train=64"]
FULL = ["model=smollm2-135m", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=64",
        "eval.num_prompts=1", "eval.test_at_end=false", "log.progress=false", "model.train_last_k_layers=4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SmolLM2-135M instead of tiny")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per algorithm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="a subset of algorithms")
    args = parser.parse_args()
    set_threads(args.threads)

    from moalign.config import TrainConfig, build_config
    from moalign.engine.trainer import Trainer
    from moalign.weighting import WEIGHTINGS

    names = ["linear"] + [n for n in (args.only or WEIGHTINGS.names()) if n != "linear"]
    base = FULL if args.full else TINY
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name in names:
            cfg = build_config(TrainConfig, {}, base + [f"weighting={name}", f"threads={args.threads}"])
            run_dir = Path(tmp) / name
            run_dir.mkdir()
            trainers[name] = Trainer(cfg, run_dir)
            trainers[name].step()  # warm-up step (includes the start evaluation)
        times = {name: [] for name in names}
        for _ in range(args.steps):
            for name, trainer in trainers.items():
                times[name].append(trainer.step()["perf/step_s"])
    base_s = statistics.median(times["linear"])
    report("linear_step_seconds", base_s)
    for name in names:
        report(f"{name}", statistics.median(times[name]) / base_s)


if __name__ == "__main__":
    main()
