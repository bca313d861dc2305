"""moalign on TRL: ``GRPOTrainer`` driven by a moalign weighting, for runs that outgrow one machine.

Two entry points:

* ``MultiObjectiveGRPOTrainer`` — a drop-in ``trl.GRPOTrainer`` whose advantages come from a moalign weighting
  (any of ``moalign algorithms``: reward- and advantage-level ones such as ctwa, gradient-level ones such as mgda)
  instead of TRL's fixed ``reward_weights`` sum. Reward functions are TRL's (any callable) and/or moalign
  ``Objective`` objects. Everything else — accelerate, DDP, DeepSpeed, FSDP, vLLM, PEFT — is TRL's.
* ``train_with_trl(cfg, run_dir)`` — ``moalign train engine=trl``: the same ``TrainConfig`` run through TRL, writing
  the native engine's run-directory files (``metrics.jsonl`` with the same metric names, ``summary.json``,
  ``model/``). ``python -m moalign.integrations.trl ...`` is the same command for launchers (docs/scaling.md).

How one moalign step maps onto TRL 1.16 (pinned; tests/test_trl.py fails loudly if these private hooks change):

    _calculate_rewards            rewards [B, M] of the whole generation batch, gathered over processes → kept
    _generate_and_score_completions
                                  prompt groups: TRL's RepeatSampler yields each prompt num_generations times in a
                                  row and the gather keeps process order, so completion i of the gathered batch
                                  belongs to group i // num_generations (checked against the prompts themselves);
                                  weighting → scores and advantages on the gathered batch (identical on every
                                  process), each process keeps its rows; a global row index rides along through
                                  TRL's shuffle and split
    _compute_loss                 TRL's clipped loss, unchanged; the log-probs of its forward are recorded per row
    optimizer step that ends the generation cycle (steps_per_generation × num_iterations micro-steps)
      → callback on_step_end      Weighting.update(StepStats of the whole batch), then rank 0's weighting state is
                                  broadcast so the weights are bit-identical everywhere
    on_save / resume              moalign_state.pt (weighting + objective state) inside TRL's checkpoint folder

The post-update log-probs CTWA needs (``needs_post_update_logprobs``): with ``num_iterations == 1`` one extra no-grad
forward of the updated policy over this process's rows, after the last optimizer step of the cycle (the native
engine does the same). With ``num_iterations > 1`` (PPO epochs) the forward of the last epoch already compares the
current policy with π_old, and the clip acts on exactly that ratio: CTWA reads those log-probs and the extra forward
is skipped (``post_update_forward=True`` forces it). π_old is TRL's ``old_per_token_logps`` when TRL computes them,
else — on-policy, one optimizer step per cycle — the log-probs of the first loss forward, which equal them.

Objective state (conciseness's running mean length) must not differ between processes: a moalign objective observes
the samples of *all* processes (gathered) and scores only its own.

Gradient-level weightings (mgda, nash_mtl, ...) run with one process or DDP (not DeepSpeed or FSDP, which shard
gradients): right after generation, each process takes the objectives' policy-gradient losses on its rows (TRL's
loss normalization, at π = π_old), their gradients on the chosen parameters (``gradient_params``), sums them over
processes (all-reduce), and the weighting's ``combine`` reads its weights w off the summed G, identical everywhere.
TRL's loss then trains on the advantages Σ_j w_j A_j: at π = π_old its gradient is Σ_j w_j ∇L_j, the weighting's
direction on the chosen parameters and the same combination elsewhere (exact for the first optimizer step of a
generation batch; later ones, with several mini-batches or PPO epochs, clip the combined advantage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import trl
from accelerate.utils import (
    broadcast_object_list,
    gather,
    gather_object,
    pad_across_processes,
)
from pydantic import ValidationError
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from moalign.cli import write_summary
from moalign.config import TrainConfig
from moalign.diagnostics.covariance import carries_signal
from moalign.engine import objective_gradients
from moalign.engine.checkpoint import atomic_torch_save, load_checkpoint
from moalign.engine.evaluation import encode_prompts, eval_change_table, evaluate_split
from moalign.engine.memory import trim_heap_if_large
from moalign.engine.metrics import MetricsWriter, read_metrics
from moalign.engine.rollout import generate
from moalign.errors import UserError
from moalign.models import chat_messages, select_parameters, system_prompt_for
from moalign.objectives import Objective, ScoringBatch
from moalign.rl.estimators import get_estimator
from moalign.rl.loss import aggregate
from moalign.weighting import WEIGHTINGS, StepStats, Weighting, make_weighting
from moalign.weighting.base import Estimator, fill_missing, per_objective_advantages

logger = logging.getLogger(__name__)

TRL_VERSION = "1.16.0"  # the hooks below were read against this release
STATE_FILE = "moalign_state.pt"  # weighting + objective state, inside each TRL checkpoint folder
RUN_FILE = "moalign_run.json"  # train_with_trl: length of metrics.jsonl at the checkpoint
SAMPLE_INDEX = "moalign_sample_index"  # per-row key added to TRL's batch: the row's index in the gathered batch
# TRL loss_type → the moalign aggregation with its normalization (the gradient-level first pass uses it)
TRL_AGGREGATION = {"dapo": "token-mean", "bnpo": "token-mean", "cispo": "token-mean", "vespo": "token-mean",
                   "grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                   "luspo": "seq-mean-token-sum"}


# ---------------------------------------------------------------------------------------------------------------
# Objectives as TRL reward functions
# ---------------------------------------------------------------------------------------------------------------


def message_text(value: Union[str, list[dict[str, Any]]], role: str) -> str:
    """The text of a plain prompt/completion, or of the ``role`` messages of a conversational one (TRL's two
    formats); a user prompt is its last user message, a completion all its assistant messages."""
    if isinstance(value, str):
        return value
    texts = []
    for message in value:
        if message.get("role") != role:
            continue
        content = message.get("content") or ""
        if isinstance(content, list):  # content blocks: keep the text parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        texts.append(content)
    if not texts:
        return ""
    return texts[-1] if role == "user" else "\n".join(texts)


class ObjectiveReward:
    """A moalign ``Objective`` as a TRL reward function ``f(prompts, completions, completion_ids, **columns)``.

    The ground truth comes from the dataset column ``answer_column``. ``Sample.num_tokens`` is the completion length
    without its final EOS, as in the native engine. On training batches the objective first ``observe``s the
    samples of every process (``gather``), then scores this process's samples, so stateful objectives stay
    identical across processes; evaluation batches are only scored. ``MultiObjectiveGRPOTrainer`` sets ``gather``,
    ``eos_token_ids`` and ``observing``.
    """

    def __init__(self, objective: Objective, answer_column: str = "answer"):
        self.objective = objective
        self.__name__ = objective.name  # TRL names reward functions (and their metrics) after __name__
        self.answer_column = answer_column
        self.eos_token_ids: set[int] = set()
        self.gather: Callable[[list], list] = lambda items: items
        self.observing = False
        self._has_state = type(objective).observe is not Objective.observe

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 **columns: Any) -> list[float]:
        if self.answer_column not in columns:
            raise UserError(f"objective {self.objective.name!r} reads the ground truth from the dataset column "
                            f"{self.answer_column!r}, which the dataset lacks; add it or pass "
                            f"ObjectiveReward(objective, answer_column=...)")
        answers = ["" if a is None else str(a) for a in columns[self.answer_column]]
        batch = ScoringBatch.from_lists([message_text(p, "user") for p in prompts],
                                        [message_text(c, "assistant") for c in completions], answers,
                                        [self._num_tokens(ids) for ids in completion_ids])
        if self.observing and self._has_state:
            self.objective.observe(ScoringBatch(self.gather(list(batch.samples))))
        result = self.objective.score(batch)
        if result.errors:  # the run goes on; the samples count as missing rewards (train/<objective>/missing)
            logger.warning("%d sample(s) got no %s reward; first error: %s", len(result.errors),
                           self.objective.name, result.errors[0][:200])
        return result.values.tolist()  # NaN = missing, kept as NaN by TRL

    def _num_tokens(self, ids: Sequence[int]) -> int:
        ends_with_eos = len(ids) > 0 and int(ids[-1]) in self.eos_token_ids
        return len(ids) - int(ends_with_eos)


# ---------------------------------------------------------------------------------------------------------------
# Prompt groups of a gathered generation batch
# ---------------------------------------------------------------------------------------------------------------


def prompt_key(row: dict[str, Any]) -> str:
    """A short fingerprint of a dataset row's prompt (what the group check compares across processes)."""
    return hashlib.sha1(repr(row.get("prompt")).encode()).hexdigest()


def prompt_group_ids(keys: Sequence[str], group_size: int) -> torch.Tensor:
    """Group id of every completion of a gathered generation batch: completion i belongs to group i // group_size.

    That is how TRL lays a batch out (RepeatSampler repeats each prompt ``num_generations`` times in a row; each
    process takes consecutive chunks; ``gather`` concatenates the processes in order). The layout is checked, not
    trusted: every block of ``group_size`` rows must hold one prompt, or the advantages would mix prompts.
    """
    if len(keys) % group_size:
        raise RuntimeError(f"the gathered batch has {len(keys)} completions, not a multiple of num_generations="
                           f"{group_size}: TRL's batch layout changed (moalign supports trl=={TRL_VERSION})")
    for start in range(0, len(keys), group_size):
        if len(set(keys[start:start + group_size])) != 1:
            raise RuntimeError(f"completions {start}..{start + group_size - 1} of the gathered batch come from "
                               f"different prompts: TRL no longer groups num_generations consecutive completions per "
                               f"prompt (moalign supports trl=={TRL_VERSION})")
    return torch.arange(len(keys)) // group_size


# ---------------------------------------------------------------------------------------------------------------
# One generation cycle (= one moalign step)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RolloutCycle:
    """A generation batch from scoring to its weighting update: the gathered statistics the weighting reads, and
    this process's rows (in generation order) for the log-prob bookkeeping."""

    rewards: torch.Tensor  # [B, M] every process, NaN = missing (CPU)
    group_ids: torch.Tensor  # [B]
    scores: torch.Tensor  # [B] scalarized scores (for logging)
    advantages: torch.Tensor  # [B] the advantages the loss uses
    response_mask: torch.Tensor  # [B, T] every process, padded to the longest process's T
    first_row: int  # index of this process's first row in the gathered batch
    input_ids: torch.Tensor  # [b, P + T] this process's prompt + completion ids
    attention_mask: torch.Tensor  # [b, P + T]
    loss_mask: torch.Tensor  # [b, T]
    old_logprobs: Optional[torch.Tensor]  # [b, T] TRL's log π_old when TRL computed it
    first_logprobs: torch.Tensor = field(init=False)  # [b, T] log-probs of each row's first loss forward
    last_logprobs: torch.Tensor = field(init=False)  # [b, T] log-probs of each row's latest loss forward

    def __post_init__(self) -> None:
        nan = torch.full(self.loss_mask.shape, float("nan"), device=self.loss_mask.device)
        self.first_logprobs, self.last_logprobs = nan, nan.clone()
        self._seen = torch.zeros(self.loss_mask.shape[0], dtype=torch.bool, device=self.loss_mask.device)

    def record(self, sample_index: torch.Tensor, logprobs: torch.Tensor) -> None:
        rows = sample_index.to(self._seen.device) - self.first_row
        fresh = ~self._seen[rows]
        self.first_logprobs[rows[fresh]] = logprobs[fresh].float()
        self.last_logprobs[rows] = logprobs.float()
        self._seen[rows] = True

    def pre_update_logprobs(self) -> torch.Tensor:
        """log π_old: TRL's when it has them; otherwise (on-policy, one update per cycle) the first loss forward."""
        return self.old_logprobs if self.old_logprobs is not None else self.first_logprobs


def reward_metrics(names: Sequence[str], rewards: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    """The native engine's per-step reward metrics (``train/<objective>/mean`` over the observed rewards, ...)."""
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        observed = ~torch.isnan(rewards[:, j])
        out[f"train/{name}/mean"] = float(rewards[observed, j].mean()) if observed.any() else float("nan")
        out[f"train/{name}/missing"] = float((~observed).sum())
    out["train/score/mean"] = float(scores.mean())
    out["train/missing_rewards"] = float(torch.isnan(rewards).sum())
    return out


def resolve_estimator(estimator: Union[str, Estimator, None], scale_rewards: str) -> Estimator:
    """A moalign estimator by name or callable; ``None`` follows TRL's ``scale_rewards`` (group → grpo, none →
    grpo_no_std)."""
    if callable(estimator):
        return estimator
    if estimator is None:
        estimator = {"group": "grpo", "none": "grpo_no_std"}.get(scale_rewards)
        if estimator is None:
            raise UserError(f"scale_rewards={scale_rewards!r} has no moalign estimator; pass estimator='grpo' "
                            f"(group mean and std) or estimator='grpo_no_std' (group mean only)")
    return get_estimator(estimator)


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class MultiObjectiveGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose scalar score and advantages come from a moalign weighting.

    Arguments are ``GRPOTrainer``'s, plus:

    * ``reward_funcs`` — one per objective: TRL reward functions and/or moalign ``Objective`` objects (wrapped in
      ``ObjectiveReward``); objective names are TRL's reward function names and must be distinct.
    * ``weighting`` — a name from ``moalign algorithms`` or a ``Weighting`` built for those names;
      ``weighting_params`` are its hyperparameters when given by name. Gradient-level ones need one process or DDP
      (module docstring).
    * ``gradient_params`` — gradient-level weightings: glob patterns over the trainable parameters' names on which
      the per-objective gradients are taken (default: every trainable parameter).
    * ``estimator`` — moalign advantage estimator (name or callable); default from ``args.scale_rewards``.
    * ``post_update_forward`` — how CTWA gets post-update log-probs (module docstring); default: a forward iff
      ``num_iterations == 1``.

    Logged through TRL's loggers, once per generation cycle: ``train/<objective>/mean`` (TRL's own
    ``rewards/<objective>/mean`` too), ``train/score/mean``, ``weight/<objective>`` and the weighting's diagnostics.
    """

    def __init__(self, model: Any, reward_funcs: Any, args: Optional[GRPOConfig] = None, *,
                 weighting: Union[str, Weighting] = "ctwa", weighting_params: Optional[dict[str, Any]] = None,
                 estimator: Union[str, Estimator, None] = None, post_update_forward: Optional[bool] = None,
                 gradient_params: Optional[list[str]] = None, **kwargs: Any):
        if isinstance(weighting, str):
            WEIGHTINGS.get(weighting)  # an unknown name is an error before any model is loaded
        if trl.__version__ != TRL_VERSION:
            logger.warning("moalign's TRL integration was written against trl==%s, this is trl==%s: it relies on "
                           "private GRPOTrainer methods; run tests/test_trl.py", TRL_VERSION, trl.__version__)
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        funcs = [ObjectiveReward(f) if isinstance(f, Objective) else f for f in funcs]
        super().__init__(model, funcs, args, **kwargs)
        self.objective_names = list(self.reward_func_names)
        self._check_trl_setup()
        self.weighting = self._build_weighting(weighting, weighting_params or {})
        self.objective_params = self._objective_parameters(gradient_params)  # gradient-level: G is taken on these
        self.estimator = resolve_estimator(estimator, self.scale_rewards)
        self.post_update_forward = self.num_iterations == 1 if post_update_forward is None else post_update_forward
        self.objective_rewards = [f for f in self.reward_funcs if isinstance(f, ObjectiveReward)]
        for reward in self.objective_rewards:
            reward.eos_token_ids, reward.gather = set(self.eos_token_ids), gather_object
        self.weighting_updates = 0  # completed generation cycles (StepStats.step)
        self.metric_names: set[str] = set()  # every key this class logged (train_with_trl keeps them as they are)
        self._gathered_rewards: Optional[torch.Tensor] = None
        self._cycle: Optional[RolloutCycle] = None
        self._capturing_loss_logprobs = False
        self._captured_logprobs: Optional[torch.Tensor] = None
        self.add_callback(WeightingCallback(self))

    # ---- set-up checks

    def _check_trl_setup(self) -> None:
        names = self.objective_names
        if len(set(names)) != len(names):
            raise UserError(f"reward functions need distinct names to become objectives; got {names} (give each "
                            f"function its own name, e.g. def politeness(...) instead of lambdas)")
        if self.args.reward_weights is not None:
            raise UserError("GRPOConfig.reward_weights is ignored by MultiObjectiveGRPOTrainer: set the weights "
                            "through the weighting (e.g. weighting='linear', weighting_params={'weights': [...]})")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise UserError(f"multi_objective_aggregation={self.multi_objective_aggregation!r} is TRL's own "
                            f"per-reward normalization; with moalign use weighting='gdpo' instead")
        cycle = self.args.steps_per_generation * self.num_iterations
        if cycle % self.args.gradient_accumulation_steps:
            raise UserError(f"a generation batch must end on an optimizer step so the weighting can update after it: "
                            f"steps_per_generation × num_iterations = {cycle} must be a multiple of "
                            f"gradient_accumulation_steps = {self.args.gradient_accumulation_steps}")

    def _build_weighting(self, weighting: Union[str, Weighting], params: dict[str, Any]) -> Weighting:
        if isinstance(weighting, str):
            try:
                built = make_weighting(weighting, self.objective_names, **params)
            except ValidationError as exc:
                raise UserError(f"weighting {weighting!r}: {exc.errors()[0]['msg']} "
                                f"(parameter {'.'.join(map(str, exc.errors()[0]['loc']))})") from None
        else:
            built = weighting
            if list(built.objectives) != self.objective_names:
                raise UserError(f"the weighting was built for objectives {built.objectives} but the reward functions "
                                f"are {self.objective_names} (same names, same order)")
        if built.needs_post_update_logprobs and self._is_vlm:
            raise UserError(f"weighting {built.name!r} needs post-update log-probs, which this integration computes "
                            f"for text-only models; use a reward-level weighting without it (e.g. linear)")
        return built

    def _objective_parameters(self, patterns: Optional[list[str]]) -> list[torch.nn.Parameter]:
        if self.weighting.family != "gradient":
            if patterns is not None:
                raise UserError(f"gradient_params applies to gradient-level weightings only; {self.weighting.name!r} "
                                f"is {self.weighting.family}-level")
            return []
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise UserError(f"weighting {self.weighting.name!r} is gradient-level: it needs each objective's whole "
                            f"gradient, which DeepSpeed and FSDP shard; run it on one process or with DDP "
                            f"(accelerate launch --multi_gpu, torchrun), docs/scaling.md")
        if self._is_vlm:
            raise UserError(f"weighting {self.weighting.name!r} is gradient-level, which this integration runs for "
                            f"text-only models")
        return select_parameters(self.accelerator.unwrap_model(self.model), patterns)

    # ---- TRL hooks

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        for reward in self.objective_rewards:
            reward.observing = self.model.training
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards = rewards  # [B, M] of every process, in process order
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return output  # evaluation keeps TRL's advantages: no weighting state may change there
        rewards = self._gathered_rewards.float().cpu()
        group_ids = prompt_group_ids(gather_object([prompt_key(row) for row in inputs]), self.num_generations)
        loss_mask = output["completion_mask"]
        if "tool_mask" in output:  # multi-turn tool calls: tool output tokens are not trained on
            loss_mask = loss_mask * output["tool_mask"]
        response_mask = gather(pad_across_processes(loss_mask.float(), dim=1)).cpu()
        rows, first_row = loss_mask.shape[0], self.accelerator.process_index * loss_mask.shape[0]
        if self.weighting.family == "gradient":  # its weights for this batch, before its advantages are taken
            self._solve_objective_weights(output, loss_mask, rewards, group_ids, response_mask, first_row)
        scores, advantages = self._scalarize(rewards, group_ids, response_mask)

        device = loss_mask.device
        output["advantages"] = advantages[first_row:first_row + rows].to(device=device, dtype=torch.float32)
        output[SAMPLE_INDEX] = torch.arange(first_row, first_row + rows, device=device)
        self._cycle = RolloutCycle(
            rewards, group_ids, scores, advantages, response_mask, first_row,
            input_ids=torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
            attention_mask=torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
            loss_mask=loss_mask, old_logprobs=output.get("old_per_token_logps"))
        self._log(reward_metrics(self.objective_names, rewards, scores))
        return output

    def _scalarize(self, rewards: torch.Tensor, group_ids: torch.Tensor,
                   response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, advantages) of the gathered batch, as the native engine computes them."""
        w = self.weighting
        advantages = w.advantages(rewards, group_ids, self.estimator, response_mask).float()
        if w.family == "reward":
            scores = w.scalarize(rewards, group_ids).float()
        else:  # advantage- and gradient-level: the score is only logged
            scores = (fill_missing(rewards).double() @ w.weights.double()).float()
        return scores, advantages

    def _solve_objective_weights(self, output: dict[str, Any], loss_mask: torch.Tensor, rewards: torch.Tensor,
                                 group_ids: torch.Tensor, response_mask: torch.Tensor, first_row: int) -> None:
        """A gradient-level weighting's first pass (the native engine's ``Trainer._objective_weights``): the
        objectives' losses L_j = agg(−ρ · A_j) on this process's rows, with ρ = π/π.detach() (= 1, with the policy
        gradient's derivative) and TRL's normalization over the whole generation batch; their gradients on the
        chosen parameters, the other trainable ones frozen for the pass; G summed over processes; ``combine``.
        TRL's sequence-level ratio (``importance_sampling_level="sequence"``) gives the same gradients here: at
        π = π_old, Σ_t ∇ exp(mean_t log ρ_t) = Σ_t ∇ρ_t."""
        per_objective = per_objective_advantages(rewards, group_ids, self.estimator, response_mask)  # [B, M]
        rows, device = loss_mask.shape[0], loss_mask.device
        local = per_objective[first_row:first_row + rows].to(device, torch.float32)
        agg = dict(mode=TRL_AGGREGATION.get(self.loss_type, "token-mean"), norm_len=self.max_completion_length,
                   num_tokens=float(response_mask.sum().clamp(min=1)), num_seqs=float(response_mask.shape[0]))
        model = self.accelerator.unwrap_model(self.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = objective_gradients.gradient_matrix(local.shape[1], self.objective_params, device)
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch = self.args.per_device_train_batch_size
        with objective_gradients.only_chosen_require_grad(trainable, self.objective_params), \
                disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs):
            for start in range(0, rows, batch):
                sl = slice(start, start + batch)
                logprobs, _, _ = self._get_per_token_logps_and_entropies(
                    model, input_ids[sl], attention_mask[sl], loss_mask.shape[1])
                mask = loss_mask[sl].float()
                ratio = torch.exp(logprobs - logprobs.detach())
                losses = [aggregate(-ratio * local[sl, j, None], mask, **agg) for j in range(local.shape[1])]
                objective_gradients.accumulate(grads, losses, self.objective_params)
        grads = self.accelerator.reduce(grads, reduction="sum")
        batch_size = rewards.shape[0]
        stats = StepStats(self.weighting_updates, rewards, group_ids, torch.zeros(batch_size), torch.zeros(batch_size),
                          response_mask, torch.zeros_like(response_mask))  # combine reads rewards (GradNorm)
        self.weighting.combine(grads, stats)

    def _compute_loss(self, model, inputs):
        if self._cycle is None or not self.model.training:
            return super()._compute_loss(model, inputs)
        self._capturing_loss_logprobs = True
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._capturing_loss_logprobs = False
        self._cycle.record(inputs[SAMPLE_INDEX], self._captured_logprobs)
        return loss

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capturing_loss_logprobs:  # the loss's own forward: keep its log-probs for the weighting
            self._captured_logprobs = out[0].detach()
        return out

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            logger.warning("%s has no %s: the weighting and objectives start fresh", checkpoint, STATE_FILE)
            return
        self.load_moalign_state(load_checkpoint(path))

    # ---- the weighting update, once per generation cycle

    def generation_cycle_done(self) -> bool:
        """True right after the optimizer step that consumed the last micro-batch of the current generation."""
        return self._cycle is not None and self._step % (self.args.steps_per_generation * self.num_iterations) == 0

    def update_weighting(self) -> dict[str, float]:
        """``Weighting.update`` on the whole generation batch, identically on every process; returns its metrics."""
        cycle, self._cycle = self._cycle, None
        new_logprobs = None
        if self.weighting.needs_post_update_logprobs:
            local = self._post_update_logprobs(cycle) if self.post_update_forward else cycle.last_logprobs
            new_logprobs = self._gather_rows(local)
        stats = StepStats(self.weighting_updates, cycle.rewards, cycle.group_ids, cycle.scores, cycle.advantages,
                          cycle.response_mask, self._gather_rows(cycle.pre_update_logprobs()), new_logprobs,
                          self.epsilon_low, self.epsilon_high)
        metrics = self.weighting.update(stats)
        self._broadcast_weighting_state()
        self.weighting_updates += 1
        metrics = {**self.weighting.metrics(), **metrics}
        self._log(metrics)
        return metrics

    @torch.no_grad()
    def _post_update_logprobs(self, cycle: RolloutCycle) -> torch.Tensor:
        """log π_new on this process's rows that carry a training signal; the others keep log π_old (their w is 0
        whatever π_new: ``covariance.carries_signal``), as in the native engine."""
        local = slice(cycle.first_row, cycle.first_row + cycle.loss_mask.shape[0])
        rows = carries_signal(cycle.advantages[local], cycle.loss_mask).nonzero().squeeze(1)
        rows = rows.to(cycle.input_ids.device)
        out = cycle.pre_update_logprobs().float().clone()
        if len(rows):
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                logprobs, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, cycle.input_ids[rows], cycle.attention_mask[rows], cycle.loss_mask.shape[1],
                    batch_size=self.args.per_device_train_batch_size)
            out[rows] = logprobs.float().to(out.device)
        return out

    @staticmethod
    def _gather_rows(local: torch.Tensor) -> torch.Tensor:
        """This process's [b, T_local] rows → every process's [B, T] rows, padded like the gathered mask."""
        return gather(pad_across_processes(local.float().contiguous(), dim=1)).cpu()

    def _broadcast_weighting_state(self) -> None:
        """Rank 0's weighting state on every process: identical inputs give identical weights, and this makes it
        exact whatever the arithmetic does."""
        if self.accelerator.num_processes == 1:
            return
        state = [self.weighting.state_dict()]
        broadcast_object_list(state, from_process=0)
        self.weighting.load_state_dict(state[0])

    def _log(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._metrics["train"][key].append(float(value))
            self.metric_names.add(key)

    # ---- checkpoint state

    def moalign_state(self) -> dict[str, Any]:
        return {"weighting": self.weighting.state_dict(), "weighting_updates": self.weighting_updates,
                "objectives": {r.objective.name: r.objective.state_dict() for r in self.objective_rewards}}

    def load_moalign_state(self, state: dict[str, Any]) -> None:
        self.weighting.load_state_dict(state["weighting"])
        self.weighting_updates = int(state["weighting_updates"])
        for reward in self.objective_rewards:
            reward.objective.load_state_dict(state["objectives"].get(reward.objective.name, {}))


class WeightingCallback(TrainerCallback):
    """Runs the weighting update after the optimizer step that ends a generation cycle (before TRL logs and saves
    that step) and writes the weighting and objective state into every TRL checkpoint folder."""

    def __init__(self, trainer: MultiObjectiveGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.generation_cycle_done():
            self.trainer.update_weighting()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            atomic_torch_save(self.trainer.moalign_state(), folder / STATE_FILE)


# ---------------------------------------------------------------------------------------------------------------
# engine=trl: a moalign TrainConfig on TRL
# ---------------------------------------------------------------------------------------------------------------

# moalign loss aggregation → TRL loss_type with the same normalization (each keeps the clipped surrogate):
# token-mean over the optimizer step's tokens = dapo; mean over sequences of per-sequence token means = grpo;
# Σ tokens / (sequences × max length) = dr_grpo; mean over sequences of per-sequence token sums = luspo.
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo",
              "seq-mean-token-sum": "luspo"}
# TRL/HF log keys that mean exactly what a native metric means; every other TRL key is kept as trl/<key>.
TRL_METRIC_NAMES = {"loss": "loss/total", "kl": "loss/kl", "grad_norm": "actor/grad_norm",
                    "clip_ratio/region_mean": "actor/clipfrac"}


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
    runs ``micro_batch_size`` completions per forward (gradient accumulation makes up the rest)."""
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
    on_gpu = not use_cpu
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
        use_cpu=use_cpu, bf16=on_gpu and cfg.model.dtype == "bfloat16", fp16=on_gpu and cfg.model.dtype == "float16",
        dataloader_num_workers=0, remove_unused_columns=False)
    return TRLPlan(arguments, optimizer_steps, notes)


class HeldOutEvaluation:
    """Greedy evaluation of val/test prompts under the native engine's metric names (``eval/<split>/<objective>/
    mean``, ``per_prompt``, ``missing``, ``eval/<split>/length/mean``, ...). It only scores: objective state is
    never changed by evaluation."""

    def __init__(self, tokenizer: Any, objectives: Sequence[Objective], splits: dict[str, list], cfg: TrainConfig):
        self.tokenizer, self.objectives, self.splits = tokenizer, list(objectives), splits
        self.num_prompts = cfg.eval.num_prompts
        self.max_new_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
        self.batch_size = max(cfg.optim.micro_batch_size, 16)
        self.prompt_ids = {split: encode_prompts(tokenizer, split, splits[split], cfg.rollout.max_prompt_tokens,
                                                 system_prompt_for(cfg.model)) for split in ("val", "test")}

    def __call__(self, model: Any, split: str) -> dict[str, Any]:
        return evaluate_split(model, self.tokenizer, generate, self.objectives, split, self.splits[split],
                              self.prompt_ids[split], self.num_prompts, self.max_new_tokens, self.batch_size)


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
            self.writer.write(self._evaluate(0, self._start_and_end_splits()))

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

    def finish(self) -> dict[str, Any]:
        """Write the end evaluation and close; returns the summary's start → end table (empty off the main
        process)."""
        if self.writer is None:
            return {}
        if self.evaluate is not None:
            self.writer.write(self._evaluate(self.cfg.steps, self._start_and_end_splits()))
        self.writer.close()
        return eval_change_table(read_metrics(self.run_dir / "metrics.jsonl"), self.trainer.objective_names)

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
    eval_table = recorder.finish()
    export_model(trainer, inputs.tokenizer, run_dir, lora=cfg.model.lora is not None)
    summary = {"engine": "trl", "steps": trainer.state.global_step // plan.optimizer_steps_per_step,
               "wall_seconds": time.perf_counter() - wall_start, "objectives": trainer.objective_names,
               "weighting": cfg.weighting.name, "eval": eval_table,
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
        model, tokenizer = load_model(cfg.model)
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
    import shutil

    is_main = trainer.accelerator.is_main_process
    tmp, out = run_dir / ".model.tmp", run_dir / "model"
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    if lora:
        if is_main:
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if is_main:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------------------------
# Launcher entry point
# ---------------------------------------------------------------------------------------------------------------


def train_from_cli(cfg, args) -> int:
    """``moalign train engine=trl``: in one process, or under a launcher (torchrun, accelerate launch), where every
    process runs it and only the main one prepares run_dir and prints the summary. ``args.trl``: further
    GRPOConfig fields as ``FIELD=VALUE`` (e.g. ``use_vllm=true``)."""
    from moalign.cli import prepare_run_dir, print_summary, write_config
    from moalign.config import load_yaml, parse_overrides

    trl_overrides = dict(parse_overrides(args.trl or []))
    check_trl_overrides(trl_overrides)
    named_run_dir = args.resume or any(o.startswith("run_dir=") for o in args.overrides) or (
        args.config and load_yaml(args.config).get("run_dir"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not named_run_dir:  # default names hold a timestamp
        raise UserError("under a launcher every process must name the same run directory: pass run_dir=...")
    run_dir = Path(cfg.run_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        prepare_run_dir(run_dir, bool(args.resume), args.overwrite)
        write_config(run_dir, cfg)
    summary = train_with_trl(cfg, run_dir, trl_overrides)
    if is_main:
        print_summary(summary, run_dir)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m moalign.integrations.trl ARGS`` = ``moalign train ARGS engine=trl`` (for launchers that take a
    module: ``torchrun -m``, ``accelerate launch -m``)."""
    from moalign.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv), "engine=trl"])


if __name__ == "__main__":
    sys.exit(main())
