"""How a moalign ``TrainConfig`` maps onto a ``GRPOConfig``: one moalign step = one TRL generation batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moalign.config import TrainConfig
from moalign.errors import UserError

# moalign loss aggregation → TRL loss_type with the same normalization (each keeps the clipped surrogate):
# token-mean over the optimizer step's tokens = dapo; mean over sequences of per-sequence token means = grpo;
# Σ tokens / (sequences × max length) = dr_grpo; mean over sequences of per-sequence token sums = luspo.
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo",
              "seq-mean-token-sum": "luspo"}
# GRPOConfig fields that define one moalign step (batch geometry, step count, checkpoint cadence, output folder).
PLANNED_FIELDS = frozenset({"output_dir", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                            "steps_per_generation", "generation_batch_size", "num_iterations", "num_generations",
                            "logging_steps", "logging_strategy", "save_steps", "save_strategy", "num_train_epochs"})


def check_trl_overrides(fields: dict[str, Any]) -> None:
    planned = sorted(PLANNED_FIELDS & set(fields))
    if planned:
        raise UserError(f"GRPOConfig field(s) {', '.join(planned)} follow from the moalign config (rollout.*, optim.*, "
                        f"steps, checkpoint.*, run_dir); set those instead")


@dataclass
class TRLPlan:
    """How a TrainConfig runs on TRL: GRPOConfig arguments, the optimizer steps of one moalign step, and the
    settings TRL cannot honour (reported, never silently dropped)."""

    arguments: dict[str, Any]
    optimizer_steps_per_step: int
    notes: list[str]

    def override(self, fields: dict[str, Any]) -> None:
        """Set further GRPOConfig fields; those that define what one moalign step is stay the config's."""
        check_trl_overrides(fields)
        self.arguments.update(fields)
        self.notes.extend(f"GRPOConfig {key}={value!r} (given directly)" for key, value in fields.items())


def plan_trl_run(cfg: TrainConfig, output_dir: Path, num_processes: int, use_cpu: bool) -> TRLPlan:
    """One moalign step = one TRL generation batch of P·n completions, split into ``mini_batches`` optimizer steps
    per PPO epoch (``steps_per_generation``), reused for ``ppo_epochs`` epochs (``num_iterations``); each process
    runs ``micro_batch_size`` completions per forward (gradient accumulation makes up the rest). The precision is
    accelerate's: ``bf16=True`` autocasts every forward to bf16 over the weights as loaded, fp32 for ``bf16-mixed``
    (fp32 master weights and optimizer state, as in the native engine), bf16 for ``bf16-pure``; on CPU and GPU."""
    r, lc, o = cfg.rollout, cfg.loss, cfg.optim
    notes: list[str] = []
    if r.group_size < 2:
        raise UserError("engine=trl needs rollout.group_size ≥ 2 (TRL's GRPO needs two completions per prompt)")
    batch = r.prompts_per_step * r.group_size
    per_mini_batch, rest = divmod(batch, num_processes * o.mini_batches)
    if rest or per_mini_batch == 0:
        raise UserError(f"rollout.prompts_per_step × rollout.group_size = {batch} completions must split evenly over "
                        f"{num_processes} process(es) × optim.mini_batches={o.mini_batches}; change "
                        f"rollout.prompts_per_step")
    micro = max(d for d in range(1, min(o.micro_batch_size, per_mini_batch) + 1) if per_mini_batch % d == 0)
    if micro != o.micro_batch_size:
        notes.append(f"optim.micro_batch_size={o.micro_batch_size} → {micro} (TRL needs it to divide the "
                     f"{per_mini_batch} completions per process and mini-batch)")
    accumulation = per_mini_batch // micro
    optimizer_steps = o.mini_batches * o.ppo_epochs
    if lc.kl_coef > 0 and lc.kl_estimator != "k3":
        notes.append(f"loss.kl_estimator={lc.kl_estimator}: TRL's KL penalty is k3")
    if lc.dual_clip is not None and lc.dual_clip <= 1 + lc.clip_eps_high:
        notes.append(f"loss.dual_clip={lc.dual_clip} ≤ 1 + clip_eps_high: TRL's delta then also clips A > 0")
    arguments = dict(
        output_dir=str(output_dir), max_steps=cfg.steps * optimizer_steps, seed=cfg.seed,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation * o.mini_batches, num_iterations=o.ppo_epochs,
        num_generations=r.group_size, max_completion_length=r.max_new_tokens, temperature=r.temperature,
        top_p=r.top_p, top_k=0, epsilon=lc.clip_eps_low, epsilon_high=lc.clip_eps_high, delta=lc.dual_clip,
        beta=lc.kl_coef, loss_type=LOSS_TYPES[lc.loss_agg],
        scale_rewards="group" if cfg.estimator.name == "grpo" else "none",  # advantages are moalign's either way
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        max_grad_norm=o.grad_clip, optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0,
        logging_strategy="steps", logging_steps=optimizer_steps, save_strategy="steps",
        save_steps=(cfg.checkpoint.every or cfg.steps) * optimizer_steps, save_total_limit=cfg.checkpoint.keep,
        report_to="none", disable_tqdm=not cfg.log.progress, activation_checkpointing=False, log_completions=False,
        use_cpu=use_cpu, bf16=cfg.precision != "fp32", fp16=False,
        dataloader_num_workers=0, remove_unused_columns=False)
    return TRLPlan(arguments, optimizer_steps, notes)
