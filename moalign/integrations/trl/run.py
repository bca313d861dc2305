"""``moalign train engine=trl``: a moalign ``TrainConfig`` run through TRL, writing the native engine's run-directory
files (``metrics.jsonl`` with the same metric names, ``summary.json``, ``model/``), in one process or under a launcher
(torchrun, accelerate launch, deepspeed), where every process runs it and only the main one writes."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOConfig

from moalign.config import TrainConfig
from moalign.diagnostics.runs import eval_cost
from moalign.engine.evaluation import (
    EvalSettings,
    encode_prompts,
    eval_change_table,
    evaluate_split,
    fixed_scalarization,
)
from moalign.engine.memory import trim_heap_if_large
from moalign.engine.metrics import MetricsWriter, read_metrics
from moalign.engine.precision import warn_if_updates_round_away
from moalign.engine.run_dir import (
    prepare_run_dir,
    print_summary,
    remove_run_entry,
    write_config,
    write_summary,
)
from moalign.errors import UserError
from moalign.integrations.trl.plan import check_trl_overrides, plan_trl_run
from moalign.integrations.trl.trainer import MultiObjectiveGRPOTrainer
from moalign.models import chat_messages, system_prompt_for
from moalign.objectives import Objective

RUN_FILE = "moalign_run.json"  # inside each TRL checkpoint folder: the length of metrics.jsonl at that checkpoint
# TRL/HF log keys that mean exactly what a native metric means; every other TRL key is kept as trl/<key>.
TRL_METRIC_NAMES = {"loss": "loss/total", "kl": "loss/kl", "grad_norm": "actor/grad_norm",
                    "clip_ratio/region_mean": "actor/clipfrac"}


class HeldOutEvaluation:
    """The native engine's held-out evaluation (``engine.evaluation``: ``eval.mode``, the same metric names and the
    same common random numbers per prompt and completion). It only scores: objective state is never changed by
    evaluation."""

    def __init__(self, tokenizer: Any, objectives: Sequence[Objective], splits: dict[str, list], cfg: TrainConfig):
        self.tokenizer, self.objectives, self.splits = tokenizer, list(objectives), splits
        self.settings = EvalSettings.from_config(cfg)
        self.prompt_ids = {split: encode_prompts(tokenizer, split, splits[split], cfg.rollout.max_prompt_tokens,
                                                 system_prompt_for(cfg.model)) for split in ("val", "test")}

    def __call__(self, model: Any, split: str) -> dict[str, Any]:
        return evaluate_split(model, self.tokenizer, self.objectives, split, self.splits[split],
                              self.prompt_ids[split], self.settings)


def moalign_record(logs: dict[str, Any], own_names: set[str]) -> dict[str, Any]:
    """A TRL log under native names: the trainer's own keys as they are, exact equivalents renamed
    (``TRL_METRIC_NAMES``), the rest as ``trl/<key>``."""
    out = {}
    for key, value in logs.items():
        out[key if key in own_names else TRL_METRIC_NAMES.get(key, f"trl/{key}")] = value
    return out


class RunDirRecorder(TrainerCallback):
    """The native run-directory record, written from inside TRL's loop by the main process (the others only
    count steps): one ``metrics.jsonl`` line per moalign step — with ``perf/step_s``, the step's wall time without
    evaluation — and the held-out evaluations: at the start (after the first training batch was observed, before
    the first update, as in the native engine), every ``eval.every`` steps and at the end (``finish``). Each TRL
    checkpoint records the length of ``metrics.jsonl``, so a resumed run rewrites exactly the lines after it."""

    def __init__(self, trainer: MultiObjectiveGRPOTrainer, cfg: TrainConfig, run_dir: Path,
                 evaluate: Optional[HeldOutEvaluation], optimizer_steps_per_step: int, resume: Optional[str]):
        self.trainer, self.cfg, self.run_dir, self.k = trainer, cfg, run_dir, optimizer_steps_per_step
        self.writer: Optional[MetricsWriter] = None
        if trainer.accelerator.is_main_process:
            self.writer = MetricsWriter(run_dir / "metrics.jsonl", cfg.log.tensorboard, cfg.log.wandb,
                                        cfg.log.mlflow, run_name=run_dir.name, config=cfg.model_dump(mode="json"))
            self.writer.truncate(self.metrics_offset(resume))
        self.evaluate = evaluate if self.writer is not None else None
        self.started = resume is not None  # the start evaluation is already in metrics.jsonl
        # λ0 before any step (a gradient-level weighting solves its weights before the first optimizer step)
        self.scalarization = fixed_scalarization(trainer.objective_names, trainer.weighting.weights)
        self.pending: dict[str, Any] = {}
        self.step_started, self.eval_seconds = time.perf_counter(), 0.0

    def _evaluate(self, step: int, splits: Sequence[str]) -> dict[str, Any]:
        start = time.perf_counter()
        record = {"step": step}
        for split in splits:
            record.update(self.evaluate(self.trainer.model, split))
        self.eval_seconds += time.perf_counter() - start
        return record

    def _start_and_end_splits(self) -> tuple[str, ...]:
        return ("val", "test") if self.cfg.eval.test_at_end else ("val",)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.evaluate is not None and not self.started:
            self.started = True
            self.writer.write(self._evaluate(0, self._start_and_end_splits()) | self.scalarization)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.k:
            return
        step, every = state.global_step // self.k, self.cfg.eval.every
        if self.evaluate is not None and every and step % every == 0 and step < self.cfg.steps:
            self.pending.update(self._evaluate(step, ["val"]))
        trim_heap_if_large()  # as the native engine does at the end of a step (engine/memory.py)
        now = time.perf_counter()
        self.pending["perf/step_s"] = now - self.step_started - self.eval_seconds
        self.step_started, self.eval_seconds = now, 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.writer is None or not logs or "train_runtime" in logs:  # the end-of-training summary log
            return
        self.writer.write({"step": state.global_step // self.k, **moalign_record(logs, self.trainer.metric_names),
                           **self.pending})
        self.pending = {}

    def on_save(self, args, state, control, **kwargs):
        if self.writer is not None:  # TRL saves right after logging the step: the offset covers its line
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            (folder / RUN_FILE).write_text(json.dumps({"metrics_offset": self.writer.offset()}))

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Write the end evaluation and close; returns the summary's start → end table and the evaluations' cost
        (both empty off the main process)."""
        if self.writer is None:
            return {}, {}
        if self.evaluate is not None:
            self.writer.write(self._evaluate(self.cfg.steps, self._start_and_end_splits()))
        self.writer.close()
        records = read_metrics(self.run_dir / "metrics.jsonl")
        return eval_change_table(records, self.trainer.objective_names), eval_cost(records)

    @staticmethod
    def metrics_offset(checkpoint: Optional[str]) -> int:
        """Byte length of metrics.jsonl when ``checkpoint`` was saved (0: start over)."""
        path = Path(checkpoint) / RUN_FILE if checkpoint else None
        return json.loads(path.read_text())["metrics_offset"] if path is not None and path.is_file() else 0


def train_with_trl(cfg: TrainConfig, run_dir: Union[str, Path],
                   trl_overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run ``cfg`` on TRL (``engine=trl``); returns the summary (also written to ``run_dir/summary.json``).

    Each process of a launcher (accelerate launch, torchrun, deepspeed) calls this; only the main process writes.
    A run directory holding TRL checkpoints is resumed from its latest one. ``trl_overrides`` are further
    ``GRPOConfig`` fields (``use_vllm``, ``vllm_mode``, ``gradient_checkpointing``, ...); the batch geometry is the
    config's (``PLANNED_FIELDS``)."""
    from moalign.engine.trainer import resolve_device, seed_everything

    run_dir, wall_start = Path(run_dir), time.perf_counter()
    use_cpu = resolve_device(cfg.device).type == "cpu"
    plan = plan_trl_run(cfg, run_dir / "checkpoints", int(os.environ.get("WORLD_SIZE", "1")), use_cpu)
    plan.override(trl_overrides or {})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    inputs = RunInputs.load(cfg)
    warn_if_updates_round_away([p for p in inputs.model.parameters() if p.requires_grad], cfg.optim.lr,
                               cfg.precision)

    args = GRPOConfig(**plan.arguments)
    args.distributed_state.wait_for_everyone()  # a launcher's main process may still be preparing run_dir
    if args.process_index == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for note in plan.notes:
            print(f"engine=trl: {note}", file=sys.stderr)
    trainer = MultiObjectiveGRPOTrainer(model=inputs.model, reward_funcs=inputs.objectives, args=args,
                                        train_dataset=inputs.train_dataset(), processing_class=inputs.tokenizer,
                                        weighting=cfg.weighting.name, weighting_params=cfg.weighting.params(),
                                        estimator=cfg.estimator.name, gradient_params=cfg.weighting.gradient_params)
    if not cfg.log.progress:
        trainer.remove_callback(PrinterCallback)  # HF prints every log dict when its progress bar is off
    sharded = trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled
                                          and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)
    if sharded:
        plan.notes.append("held-out evaluation skipped: parameters are sharded (FSDP / ZeRO-3); evaluate run_dir/model")
    evaluate = None if sharded else HeldOutEvaluation(inputs.tokenizer, inputs.objectives, inputs.splits, cfg)
    resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    recorder = RunDirRecorder(trainer, cfg, run_dir, evaluate, plan.optimizer_steps_per_step, resume)
    trainer.add_callback(recorder)

    trainer.train(resume_from_checkpoint=resume)
    eval_table, cost = recorder.finish()
    export_model(trainer, inputs.tokenizer, run_dir, lora=cfg.model.lora is not None)
    summary = {"engine": "trl", "steps": trainer.state.global_step // plan.optimizer_steps_per_step,
               "wall_seconds": time.perf_counter() - wall_start, "objectives": trainer.objective_names,
               "weighting": cfg.weighting.name, "eval": eval_table, "eval_cost": cost,
               "final_weights": trainer.weighting.named_weights(),
               "skipped_steps": 0, "trl_notes": plan.notes}
    if trainer.accelerator.is_main_process:
        write_summary(run_dir, summary)
    return summary


@dataclass
class RunInputs:
    """What a TrainConfig loads before training: data splits, objectives, the policy (trainable part prepared:
    last k blocks or LoRA adapters) and its tokenizer."""

    splits: dict[str, list]
    objectives: list[Objective]
    model: Any
    tokenizer: Any
    system_prompt: Optional[str]

    @classmethod
    def load(cls, cfg: TrainConfig) -> "RunInputs":
        from moalign.data import load_data
        from moalign.engine.trainer import load_objectives_and_weighting
        from moalign.models import load_model, prepare_trainable

        objectives, _ = load_objectives_and_weighting(cfg)
        splits = dict(load_data(cfg.data).items())
        if not splits["train"]:
            raise UserError("the training split is empty; check data.path / data.num_train")
        model, tokenizer = load_model(cfg.model, cfg.precision)
        system_prompt = system_prompt_for(cfg.model)
        encode_prompts(tokenizer, "train", splits["train"], cfg.rollout.max_prompt_tokens, system_prompt)  # too long?
        return cls(splits, objectives, prepare_trainable(model, cfg.model), tokenizer, system_prompt)

    def train_dataset(self) -> Any:
        """TRL's conversational format (TRL applies the chat template) plus the ``answer`` column objectives read."""
        from datasets import Dataset

        train = self.splits["train"]
        return Dataset.from_dict({"prompt": [chat_messages(ex.prompt, self.system_prompt) for ex in train],
                                  "answer": [ex.answer for ex in train]})


def export_model(trainer: MultiObjectiveGRPOTrainer, tokenizer: Any, run_dir: Path, lora: bool) -> None:
    """The trained policy as ``run_dir/model`` (LoRA merged into the base model), written under a temporary name and
    renamed. ``save_model`` runs on every process: under ZeRO-3 / FSDP it gathers the sharded weights."""
    is_main = trainer.accelerator.is_main_process
    tmp, out = run_dir / ".model.tmp", run_dir / "model"
    if is_main:
        remove_run_entry(run_dir, tmp.name)
    if lora:
        if is_main:
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if is_main:
        remove_run_entry(run_dir, out.name)
        os.replace(tmp, out)


def train_from_cli(cfg, args) -> int:
    """``moalign train engine=trl``: in one process, or under a launcher (torchrun, accelerate launch), where every
    process runs it and only the main one prepares run_dir and prints the summary. ``args.trl``: further
    GRPOConfig fields as ``FIELD=VALUE`` (e.g. ``use_vllm=true``)."""
    from moalign.config import load_yaml, parse_overrides

    trl_overrides = dict(parse_overrides(args.trl or []))
    check_trl_overrides(trl_overrides)
    named_run_dir = args.resume or any(o.startswith("run_dir=") for o in args.overrides) or (
        args.config and load_yaml(args.config).get("run_dir"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not named_run_dir:  # default names hold a timestamp
        raise UserError("under a launcher every process must name the same run directory: pass run_dir=...")
    run_dir = Path(cfg.run_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    lock = None
    if is_main:  # the main process holds the run directory's lock until the run ends
        lock = prepare_run_dir(run_dir, bool(args.resume), args.overwrite).lock
        write_config(run_dir, cfg)
    try:
        summary = train_with_trl(cfg, run_dir, trl_overrides)
    finally:
        if lock is not None:
            lock.release()
    if is_main:
        print_summary(summary, run_dir)
    return 0
