"""Seconds per training step of ``engine=trl`` (TRL's GRPOTrainer driven by moalign's CTWA) against the native
engine, on the same config, measured in the same run.

    python bench/engines.py [--steps 6] [--threads 2] [key=value ...]          # tiny, 48 new tokens
    python bench/engines.py --model smollm2-135m --steps 3                      # the default job's shapes
    python bench/engines.py --model smollm2-135m --steps 3 precision=bf16-mixed # both engines in bf16-mixed

Both engines run the same work: 4 prompts × 4 samples, the same token budget and micro-batch, KL to the reference,
CTWA with its post-update forward, and the same precision (``precision=bf16-mixed``: fp32 master weights and bf16
compute in both — a bf16 working copy in the native engine, accelerate's autocast for TRL). The native engine's
probe set (a diagnostic re-sampling of validation prompts after every update, on by default for ``tiny``) is
switched off, since TRL has no counterpart.

The two engines draw different samples (different random streams and prompt orders), so their responses end at
different lengths, and step time follows length. ``--fixed-length`` removes that noise: every response runs to
``rollout.max_new_tokens`` (EOS suppressed: HF's ``min_new_tokens`` for TRL, the same logit mask in moalign's
sampler), so both engines process identical shapes. Without it, the mean response lengths are printed next to the
times.

A step is one rollout batch: sampling, scoring, the policy update and CTWA's update (its post-update forward
included); evaluation and checkpointing are excluded for both engines (native: the sum of its phase timers; TRL:
wall time between step ends minus evaluation). The first step (warm-up) is dropped; the median of the rest is
reported as ``name: value`` lines.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import torch
from _common import report, set_threads

CONFIG = ["weighting=ctwa", "device=cpu", "log.progress=false", "rollout.prompts_per_step=4", "rollout.group_size=4",
          "eval.num_prompts=4", "eval.test_at_end=false", "checkpoint.every=0", "diagnostics.probe_prompts=0"]
PER_MODEL = {"tiny": ["rollout.max_new_tokens=48", "optim.micro_batch_size=8"],
             "smollm2-135m": []}  # the default job: 128 new tokens, micro-batches of 4


LENGTH_KEYS = {"native": "train/length/mean", "trl": "trl/completions/mean_length"}


def step_lines(run_dir: Path) -> list[dict]:
    from moalign.engine.metrics import read_metrics

    return [line for line in read_metrics(run_dir / "metrics.jsonl") if "perf/step_s" in line]


def suppress_eos_in_native_sampler(model: str) -> None:
    """Every response of moalign's sampler runs to the token budget, as TRL's does under ``min_new_tokens``."""
    import moalign.engine.sampler as sampler
    from moalign.config import ModelConfig
    from moalign.engine.rollout import eos_token_ids
    from moalign.models.loading import load_model

    eos = sorted(eos_token_ids(*load_model(ModelConfig(name=model))))
    choose = sampler.next_tokens

    def next_tokens_without_eos(logits, *args):
        return choose(logits.index_fill(-1, torch.tensor(eos, device=logits.device), -math.inf), *args)

    sampler.next_tokens = next_tokens_without_eos


def run_engine(engine: str, model: str, steps: int, overrides: list[str], root: Path, fixed_length: bool
               ) -> tuple[float, float]:
    """Median seconds per step and mean response length (first step dropped) of one engine on the shared config."""
    from moalign.config import TrainConfig, build_config

    run_dir = root / engine
    run_dir.mkdir()
    cfg = build_config(TrainConfig, {}, [*CONFIG, f"model={model}", *PER_MODEL.get(model, []),
                                         f"steps={steps}", f"engine={engine}", f"run_dir={run_dir}", *overrides])
    if engine == "trl":
        from moalign.integrations.trl import train_with_trl

        train_with_trl(cfg, run_dir, {"generation_kwargs": {"min_new_tokens": cfg.rollout.max_new_tokens}}
                       if fixed_length else None)
    else:
        from moalign.engine.trainer import Trainer

        Trainer(cfg, run_dir).run()
    lines = step_lines(run_dir)[1:]
    return (statistics.median(line["perf/step_s"] for line in lines),
            statistics.mean(line[LENGTH_KEYS[engine]] for line in lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2-135m | any model name")
    parser.add_argument("--fixed-length", action="store_true", help="every response runs to the token budget")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides for both engines")
    args = parser.parse_intermixed_args()
    set_threads(args.threads)
    from moalign.config import ModelConfig
    from moalign.models.loading import load_model

    load_model(ModelConfig(name=args.model))  # builds / converts the model once, outside the timings
    report("model", args.model)
    report("steps", args.steps)
    report("fixed_length", args.fixed_length)
    if args.fixed_length:
        suppress_eos_in_native_sampler(args.model)
    with tempfile.TemporaryDirectory(prefix="moalign-bench-engines-") as tmp:
        native, length = run_engine("native", args.model, args.steps, args.overrides, Path(tmp), args.fixed_length)
        report("native_s_per_step", native)
        report("native_mean_response_tokens", length)
        trl, length = run_engine("trl", args.model, args.steps, args.overrides, Path(tmp), args.fixed_length)
        report("trl_s_per_step", trl)
        report("trl_mean_response_tokens", length)
    report("trl_over_native", trl / native)  # the target: ≥ 2


if __name__ == "__main__":
    main()
