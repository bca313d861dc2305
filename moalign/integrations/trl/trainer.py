"""``MultiObjectiveGRPOTrainer``: TRL's ``GRPOTrainer`` whose scalar score and advantages come from a moalign weighting.

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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch
import trl
from accelerate.utils import broadcast_object_list, gather, gather_object, pad_across_processes
from pydantic import ValidationError
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from moalign.rl.covariance import carries_signal
from moalign.engine.checkpoint import atomic_torch_save, load_checkpoint
from moalign.errors import UserError
from moalign.integrations.trl.batch import (
    SAMPLE_INDEX,
    TRL_VERSION,
    RolloutCycle,
    prompt_group_ids,
    prompt_key,
    reward_metrics,
)
from moalign.integrations.trl.gradient_pass import solve_objective_weights
from moalign.integrations.trl.rewards import ObjectiveReward
from moalign.models import select_parameters
from moalign.objectives import Objective
from moalign.rl.estimators import get_estimator
from moalign.weighting import WEIGHTINGS, StepStats, Weighting, make_weighting
from moalign.weighting.base import Estimator, fill_missing

logger = logging.getLogger(__name__)

STATE_FILE = "moalign_state.pt"  # weighting + objective state, inside each TRL checkpoint folder


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
            solve_objective_weights(self, output, loss_mask, rewards, group_ids, response_mask, first_row)
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
        self.load_moalign_state(load_checkpoint(path, required=("weighting", "objectives")))

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
