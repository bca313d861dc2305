"""Policy loss (clipped surrogate with dual clip), KL penalties and loss aggregation (METHOD §6, as in verl).

All functions are pure: tensors in, tensors out. Shapes: ``[B, T]`` per token, ``mask`` is 1 on response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm_len: int | None = None,
              num_tokens: float | None = None, num_seqs: float | None = None) -> torch.Tensor:
    """Aggregate a per-token loss. ``num_tokens``/``num_seqs`` give the denominators of the whole mini-batch when
    it is split into micro-batches (so the sum of micro-batch losses equals the mini-batch loss)."""
    if mode == "token-mean":
        return (loss * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))
    n_seq = num_seqs if num_seqs is not None else loss.shape[0]
    if mode == "seq-mean-token-sum":
        return (loss * mask).sum(-1).sum() / n_seq
    if mode == "seq-mean-token-mean":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seq
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO: constant normalizer (the maximum response length)
        return (loss * mask).sum() / (n_seq * (norm_len if norm_len is not None else loss.shape[-1]))
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")


@dataclass
class PolicyLossOutput:
    per_token: torch.Tensor  # [B, T] loss per token (before aggregation)
    clipfrac: torch.Tensor  # fraction of tokens where the ratio clip is active
    clipfrac_lower: torch.Tensor  # fraction where the dual clip is active (A < 0)
    ratio: torch.Tensor  # [B, T]


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = 3.0) -> PolicyLossOutput:
    """Per token: L = max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high)); for A < 0 also L = min(L, −A·c) (dual clip).
    ρ = exp(clamp(logπ − logπ_old, −20, 20)). ``advantages`` may be [B] (broadcast over tokens) or [B, T]."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clipped = torch.maximum(l1, l2)
    clipfrac = masked_mean((l2 > l1).float(), mask)
    if dual_clip is not None:
        l3 = -advantages * dual_clip
        dual = torch.minimum(l3, clipped)
        clipfrac_lower = masked_mean(((clipped > l3) & (advantages < 0)).float(), mask)
        per_token = torch.where(advantages < 0, dual, clipped)
    else:
        clipfrac_lower = torch.zeros(())
        per_token = clipped
    return PolicyLossOutput(per_token, clipfrac.detach(), clipfrac_lower.detach(), ratio.detach())


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate. k1 = logπ − logπ_ref; k2 = ½(logπ − logπ_ref)²;
    k3 ("low_var_kl", Schulman) = e^δ − δ − 1 with δ = logπ_ref − logπ clamped to ±20, result clamped to ±10 (verl)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        delta = torch.clamp(ref_logp - logp, -20.0, 20.0)
        return torch.clamp(torch.exp(delta) - delta - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")
