"""moalign on TRL: ``GRPOTrainer`` driven by a moalign weighting, for runs that outgrow one machine.

Two entry points:

* ``MultiObjectiveGRPOTrainer`` (``trainer.py``) — a drop-in ``trl.GRPOTrainer`` whose advantages come from a moalign
  weighting (any of ``moalign algorithms``: reward- and advantage-level ones such as ctwa, gradient-level ones such as
  mgda, whose first pass is ``gradient_pass.py``) instead of TRL's fixed ``reward_weights`` sum. Reward functions are
  TRL's (any callable) and/or moalign ``Objective`` objects (``rewards.py``). Everything else — accelerate, DDP,
  DeepSpeed, FSDP, vLLM, PEFT — is TRL's.
* ``train_with_trl(cfg, run_dir)`` (``run.py``) — ``moalign train engine=trl``: the same ``TrainConfig`` run through
  TRL (``plan.py`` maps it onto a ``GRPOConfig``), writing the native engine's run-directory files.
  ``python -m moalign.integrations.trl ...`` is the same command for launchers (docs/scaling.md).

The files, bottom up: ``batch.py`` (prompt groups of a gathered batch, the rollout cycle), ``rewards.py``,
``gradient_pass.py``, ``trainer.py``, ``plan.py``, ``run.py``.
"""

from moalign.integrations.trl.batch import (
    SAMPLE_INDEX,
    TRL_VERSION,
    RolloutCycle,
    prompt_group_ids,
    prompt_key,
    reward_metrics,
)
from moalign.integrations.trl.plan import TRLPlan, plan_trl_run
from moalign.integrations.trl.rewards import ObjectiveReward, message_text
from moalign.integrations.trl.run import moalign_record, train_from_cli, train_with_trl
from moalign.integrations.trl.trainer import STATE_FILE, MultiObjectiveGRPOTrainer, WeightingCallback

__all__ = ["MultiObjectiveGRPOTrainer", "ObjectiveReward", "RolloutCycle", "SAMPLE_INDEX", "STATE_FILE", "TRLPlan",
           "TRL_VERSION", "WeightingCallback", "message_text", "moalign_record", "plan_trl_run", "prompt_group_ids",
           "prompt_key", "reward_metrics", "train_from_cli", "train_with_trl"]
