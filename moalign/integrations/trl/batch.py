"""A TRL generation batch as a moalign step sees it: which prompt group each gathered completion belongs to, the
cycle from scoring to the weighting update (with the log-prob bookkeeping), and the per-step reward metrics."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

TRL_VERSION = "1.16.0"  # the private GRPOTrainer hooks this package uses were read against this release
SAMPLE_INDEX = "moalign_sample_index"  # per-row key added to TRL's batch: the row's index in the gathered batch


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
