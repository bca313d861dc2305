"""Where a native RL step's time and memory go: per-phase seconds, peak resident memory per phase, and the
fraction of this machine's matmul peak the training passes reach.

    python bench/step.py                         # the default job's config (SmolLM2-135M, CTWA), 3 timed steps
    python bench/step.py model=tiny --steps 6    # any config override, as for `moalign train`
    python bench/step.py --precisions fp32,bf16-mixed   # one trainer per precision, steps taking turns

The config is the default `moalign train` config with the overrides given, minus evaluation and checkpoints (they
are not part of a step). One warm-up step runs first; the figures are medians over the timed steps. With
``--precisions``, one trainer per precision is built and their steps alternate (each round in reversed order), so
the machine's drift hits both alike; every figure then carries a ``_<precision>`` suffix, ``step_speedup_<p>`` and
``phase_<name>_speedup_<p>`` are fp32's seconds over p's, and the per-phase memory is not reported (the process
holds both trainers). Prints ``name: value`` lines:

* ``phase_<name>_s`` and ``phase_<name>_fraction``: the trainer's own phase timers (sample, score, ref_logprobs,
  update, post_logprobs, weighting, …) and their share of the step; ``weighting_fraction`` is the weighting's
  statistic and update (``advantages`` + ``weighting``);
* ``peak_rss_gb_<phase>``: the largest resident set seen while the phase ran (sampled every 5 ms), ``load`` being
  model loading and trainer construction, and ``peak_rss_gb`` the process's high-water mark (``ru_maxrss``);
* ``matmul_peak_gflops`` (best of 10 fp32 1024³ matmuls, measured in the same run), and for every pass over the
  batch ``<phase>_gflops`` and ``<phase>_peak_fraction``: the FLOPs the pass executes, counted from the model's
  shape (``pass_flops``: a forward, plus for the update a backward through the trained blocks at 2× their
  forward; with a reused frozen trunk the ``trunk`` pass counts the blocks below it, the others the blocks above;
  the log-prob passes count the rows and micro-batch size of each call they made — the post-update pass skips
  completions without a training signal), over the phase's seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import matmul_peak_gflops, report, set_threads  # noqa: E402

from moalign.engine.memory import resident_bytes  # noqa: E402

NO_EVAL = ["eval.every=0", "eval.num_prompts=1", "eval.test_at_end=false", "checkpoint.every=0",
           "log.progress=false"]


class RssWatcher:
    """The largest resident set size seen since the last ``reset()``, sampled by a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, resident_bytes()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def reset(self) -> int:
        now = resident_bytes()
        peak, self.peak = max(self.peak, now), now
        return peak


def forward_flops(model, rollout, micro_batch_size: int, blocks: slice = slice(None), head: bool = True) -> float:
    """FLOPs the trainer's forward over the rollout executes (padding included, as the matmuls see it): per
    micro-batch, each distinct prompt once through the decoder (``micro_batch_logprobs`` shares a group's prompt),
    every row's response through the decoder and the LM head, and attention's QKᵀ and AV over the padded widths.
    ``blocks``/``head``: only those transformer blocks, with or without the LM head (the frozen trunk's pass is
    the bottom blocks without the head, the passes after it the top blocks with it)."""
    import torch

    from moalign.models.loading import transformer_blocks

    layers = list(transformer_blocks(model))[blocks]
    decoder = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    head_params = model.get_output_embeddings().weight.numel() if head else 0
    c = model.config
    tp, tr = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    total = 0.0
    for start in range(0, len(rollout), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        b = len(rollout.prompt_ids[rows])
        d = len(torch.unique(rollout.prompt_ids[rows], dim=0))
        if d < b:  # each distinct prompt, then the responses on their cached prompts
            positions, attention = d * tp + b * (tr - 1), d * tp * tp + b * (tr - 1) * (tp + tr)
        else:  # one forward over [prompt | response[:-1]]
            positions, attention = b * (tp + tr - 1), b * (tp + tr - 1) ** 2
        total += 2 * decoder * positions + 2 * head_params * b * tr + 2 * 2 * len(layers) * c.hidden_size * attention
    return total


def pass_flops(trainer, rollout) -> tuple[float, float]:
    """FLOPs of the update and trunk passes over ``rollout``. The update runs every block, or the blocks above a
    reused frozen trunk, and adds a backward through the trained blocks and the head at ≈ 2× their forward; the
    trunk pass (0 without one) runs the blocks below."""
    from moalign.models.loading import transformer_blocks

    model, mb, trunk = trainer.model, trainer.cfg.optim.micro_batch_size, trainer.trunk
    k = trainer.cfg.model.train_last_k_layers
    one_pass = forward_flops(model, rollout, mb, slice(trunk.split if trunk else 0, None))
    trained = slice(len(transformer_blocks(model)) - k if k else 0, None)
    update = one_pass + 2 * forward_flops(model, rollout, mb, trained)
    trunk_pass = forward_flops(model, rollout, mb, slice(0, trunk.split), head=False) if trunk else 0.0
    return update, trunk_pass


def logprob_pass_flops(trainer, calls: list[tuple[object, int]]) -> float:
    """FLOPs of the ``response_logprobs`` calls a phase made, each on the rows it was given (the post-update pass
    skips rows without a training signal) at its own micro-batch size."""
    trunk = trainer.trunk
    return sum(forward_flops(trainer.model, rollout, mb, slice(trunk.split if trunk else 0, None))
               for rollout, mb in calls)


@dataclass
class Measured:
    """One trainer of the run and what its steps recorded."""

    trainer: object
    records: list = field(default_factory=list)
    rollouts: list = field(default_factory=list)
    logprob_calls: list = field(default_factory=list)  # per step: phase → [(rows given, micro-batch size)]
    phase_peaks: dict = field(default_factory=dict)  # phase → the peak resident set of each time it ran


def report_steps(m: Measured, suffix: str, peak: float, memory: bool) -> float:
    """The figures of one trainer's timed steps (its first step dropped); returns the median step time."""
    trainer, records = m.trainer, m.records[1:]
    rollouts, logprob_calls = m.rollouts[1:], m.logprob_calls[1:]
    phases = [k.removeprefix("time/").removesuffix("_s") for k in records[0] if k.startswith("time/")]
    step_s = statistics.median(r["perf/step_s"] for r in records)
    report(f"step_s{suffix}", step_s)
    for name in phases:
        seconds = statistics.median(r[f"time/{name}_s"] for r in records)
        report(f"phase_{name}_s{suffix}", seconds)
        report(f"phase_{name}_fraction{suffix}", seconds / step_s)
    report(f"weighting_fraction{suffix}", statistics.median(
        (r.get("time/advantages_s", 0.0) + r.get("time/weighting_s", 0.0)) / r["perf/step_s"] for r in records))
    report(f"sample_tokens_per_s{suffix}", statistics.median(r["perf/sample_tokens_per_s"] for r in records))
    report(f"response_tokens_mean{suffix}", statistics.mean(r["train/length/mean"] for r in records))
    for name in ("ref_logprobs", "old_logprobs", "post_logprobs", "update", "trunk"):
        if f"time/{name}_s" not in records[0]:
            continue
        if name in ("update", "trunk"):
            per_step = [pass_flops(trainer, ro)[0 if name == "update" else 1] for ro in rollouts]
        else:
            per_step = [logprob_pass_flops(trainer, calls.get(name, [])) for calls in logprob_calls]
        # rate of each step's pass, then the median (the post-update pass's rows vary from step to step)
        gflops = statistics.median(f / r[f"time/{name}_s"] / 1e9 for f, r in zip(per_step, records))
        report(f"{name}_gflops{suffix}", gflops)
        report(f"{name}_peak_fraction{suffix}", gflops / peak)
    if memory:
        for name, peaks in m.phase_peaks.items():
            report(f"peak_rss_gb_{name}{suffix}", max(peaks))
    return step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plain-forward", action="store_true",
                        help="run every row's prompt (no shared-prompt forward), to measure what sharing saves")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated precisions (e.g. fp32,bf16-mixed): one trainer each, their steps "
                             "taking turns in one process")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args()
    set_threads(args.threads)
    watcher = RssWatcher()
    report("matmul_peak_gflops", peak := matmul_peak_gflops())

    import moalign.engine.rollout as rollout_module
    import moalign.engine.trainer as trainer_module
    from moalign.config import TrainConfig, build_config

    if args.plain_forward:
        shared = rollout_module.micro_batch_logprobs

        def plain(*args, **kwargs):
            return shared(*args, **{**kwargs, "share_prompts": False})
        rollout_module.micro_batch_logprobs = trainer_module.micro_batch_logprobs = plain
    report("shared_prompt_forward", not args.plain_forward)

    original_call = trainer_module.PhaseTimer.__call__
    phase_now = [""]
    current: list[Measured] = []  # the trainer whose step is running

    @contextmanager
    def watched_phase(self, name, **options):  # the trainer's phase timer, plus the phase's peak resident set
        watcher.reset()
        phase_now[0] = name
        with original_call(self, name, **options):
            yield
        current[0].phase_peaks.setdefault(name, []).append(watcher.reset() / 1e9)

    trainer_module.PhaseTimer.__call__ = watched_phase
    original_logprobs = trainer_module.response_logprobs

    def recorded_logprobs(model, rollout, micro_batch_size, *args, **kwargs):
        current[0].logprob_calls[-1].setdefault(phase_now[0], []).append((rollout, micro_batch_size))
        return original_logprobs(model, rollout, micro_batch_size, *args, **kwargs)

    trainer_module.response_logprobs = recorded_logprobs
    precisions = args.precisions.split(",") if args.precisions else [None]
    runs: dict[str | None, Measured] = {}

    with tempfile.TemporaryDirectory(prefix="moalign-bench-step-") as tmp:
        for precision in precisions:
            run_dir = Path(tmp) / (precision or "run")
            run_dir.mkdir()
            cfg = build_config(TrainConfig, {}, [*NO_EVAL, f"steps={args.steps + 1}", f"run_dir={run_dir}",
                                                 f"threads={args.threads}", *args.overrides,
                                                 *([f"precision={precision}"] if precision else [])])
            watcher.reset()
            trainer = trainer_module.Trainer(cfg, run_dir)
            report(f"peak_rss_gb_load{_suffix(precision, precisions)}", watcher.reset() / 1e9)
            m = runs[precision] = Measured(trainer)
            trainer.generate = recording_rollouts(trainer.generate, m.rollouts)
            trainer._evaluate_start = lambda: None
        for round_index in range(args.steps + 1):  # the trainers take turns, in reversed order every other round
            for precision in (precisions if round_index % 2 == 0 else precisions[::-1]):
                current[:] = [runs[precision]]
                runs[precision].logprob_calls.append({})
                runs[precision].records.append(runs[precision].trainer.step())

    step_s = {precision: report_steps(m, _suffix(precision, precisions), peak, memory=len(runs) == 1)
              for precision, m in runs.items()}
    if "fp32" in step_s:
        for precision, seconds in step_s.items():
            if precision != "fp32":
                report(f"step_speedup_{precision}", step_s["fp32"] / seconds)
                for name in ("sample", "ref_logprobs", "update", "post_logprobs"):
                    report(f"phase_{name}_speedup_{precision}",
                           statistics.median(r[f"time/{name}_s"] for r in runs["fp32"].records[1:])
                           / statistics.median(r[f"time/{name}_s"] for r in runs[precision].records[1:]))
    report("peak_rss_gb", trainer_module.peak_rss_gb())


def recording_rollouts(generate, rollouts: list):
    def run(*args, **kwargs):
        rollouts.append(generate(*args, **kwargs))
        return rollouts[-1]
    return run


def _suffix(precision: str | None, precisions: list) -> str:
    return f"_{precision}" if len(precisions) > 1 else ""


if __name__ == "__main__":
    main()
