"""The first pass of a gradient-level weighting (mgda, nash_mtl, ...) on TRL, right after generation.

Each process takes the objectives' policy-gradient losses on its rows (TRL's loss normalization, at π = π_old), their
gradients on the chosen parameters (``gradient_params``), and sums them over processes (all-reduce); the weighting's
``combine`` reads its weights w off the summed G, identically everywhere. TRL's loss then trains on the advantages
Σ_j w_j A_j: at π = π_old its gradient is Σ_j w_j ∇L_j, the weighting's direction on the chosen parameters and the
same combination elsewhere (exact for the first optimizer step of a generation batch; later ones, with several
mini-batches or PPO epochs, clip the combined advantage). A weighting that ``trains_on_score`` (dynamic
reweighting) reads G only for its weights: TRL trains on its ``advantages``, one advantage of Σ_j w_j r_j.
One process or DDP only: DeepSpeed and FSDP shard the gradients this pass needs whole.
"""

from __future__ import annotations

from typing import Any

import torch
from trl.models.utils import disable_gradient_checkpointing

from moalign.engine import objective_gradients
from moalign.rl.loss import aggregate
from moalign.weighting import StepStats
from moalign.weighting.base import per_objective_advantages

# TRL loss_type → the moalign aggregation with its normalization
TRL_AGGREGATION = {"dapo": "token-mean", "bnpo": "token-mean", "cispo": "token-mean", "vespo": "token-mean",
                   "grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                   "luspo": "seq-mean-token-sum"}


def solve_objective_weights(trainer: Any, output: dict[str, Any], loss_mask: torch.Tensor, rewards: torch.Tensor,
                            group_ids: torch.Tensor, response_mask: torch.Tensor, first_row: int) -> None:
    """A gradient-level weighting's first pass (the native engine's ``Trainer._objective_weights``): the
    objectives' losses L_j = agg(−ρ · A_j) on this process's rows, with ρ = π/π.detach() (= 1, with the policy
    gradient's derivative) and TRL's normalization over the whole generation batch; their gradients on the
    chosen parameters, the other trainable ones frozen for the pass; G summed over processes; ``combine``.
    TRL's sequence-level ratio (``importance_sampling_level="sequence"``) gives the same gradients here: at
    π = π_old, Σ_t ∇ exp(mean_t log ρ_t) = Σ_t ∇ρ_t."""
    per_objective = per_objective_advantages(rewards, group_ids, trainer.estimator, response_mask)  # [B, M]
    rows, device = loss_mask.shape[0], loss_mask.device
    local = per_objective[first_row:first_row + rows].to(device, torch.float32)
    agg = dict(mode=TRL_AGGREGATION.get(trainer.loss_type, "token-mean"), norm_len=trainer.max_completion_length,
               num_tokens=float(response_mask.sum().clamp(min=1)), num_seqs=float(response_mask.shape[0]))
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = objective_gradients.gradient_matrix(local.shape[1], trainer.objective_params, device)
    input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    batch = trainer.args.per_device_train_batch_size
    with objective_gradients.only_chosen_require_grad(trainable, trainer.objective_params), \
            disable_gradient_checkpointing(model, trainer.args.gradient_checkpointing_kwargs):
        for start in range(0, rows, batch):
            sl = slice(start, start + batch)
            logprobs, _, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids[sl], attention_mask[sl], loss_mask.shape[1])
            mask = loss_mask[sl].float()
            ratio = torch.exp(logprobs - logprobs.detach())
            losses = [aggregate(-ratio * local[sl, j, None], mask, **agg) for j in range(local.shape[1])]
            objective_gradients.accumulate(grads, losses, trainer.objective_params)
    grads = trainer.accelerator.reduce(grads, reduction="sum")
    batch_size = rewards.shape[0]
    stats = StepStats(trainer.weighting_updates, rewards, group_ids, torch.zeros(batch_size), torch.zeros(batch_size),
                      response_mask, torch.zeros_like(response_mask))  # combine reads rewards (GradNorm)
    trainer.weighting.combine(grads, stats)
