"""Advantage estimators (METHOD §6).

Every estimator here maps sequence scores ``s`` [B] (one scalar per completion, γ = 1, no critic) to one advantage
per sequence [B], which is the same on every response token. ``group_ids`` [B] marks completions of one prompt.
"""

from __future__ import annotations

from typing import Callable

import torch

from moalign.registry import Registry

ESTIMATORS: Registry[Callable[..., torch.Tensor]] = Registry("estimator")

# Estimators defined together with a loss aggregation: the config uses it by default and refuses another one.
PAIRED_LOSS_AGG = {"dr_grpo": "seq-mean-token-sum-norm"}


def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor):
    """Per-sample group mean, unbiased group std (0 for groups of one) and group size."""
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    g = counts.numel()
    s = scores.double()
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, s)
    means = sums / counts
    sq = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, (s - means[inv]) ** 2)
    denom = (counts - 1).clamp(min=1)
    std = torch.where(counts > 1, (sq / denom).sqrt(), torch.zeros_like(sq))
    return means[inv], std[inv], counts[inv]


@ESTIMATORS.register("grpo")
def grpo(scores, group_ids, response_mask=None, *, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_b = (s_b − mean_g) / (std_g + eps), unbiased std; without ``norm_by_std``: s_b − mean_g.
    A group of one gets 0."""
    mean, std, n = _group_stats(scores, group_ids)
    adv = scores.double() - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return torch.where(n > 1, adv, torch.zeros_like(adv)).to(scores.dtype)


@ESTIMATORS.register("grpo_no_std")
def grpo_no_std(scores, group_ids, response_mask=None) -> torch.Tensor:
    """GRPO without the std division: A_b = s_b − mean_g."""
    return grpo(scores, group_ids, response_mask, norm_by_std=False)


@ESTIMATORS.register("dr_grpo")
def dr_grpo(scores, group_ids, response_mask=None) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): A_b = s_b − mean_g (no std division), trained with the constant-normalized token
    sum ``loss.loss_agg=seq-mean-token-sum-norm`` (Σ tokens / (sequences × max length)), which removes GRPO's
    length bias as the missing std removes its difficulty bias. The config pairs them by default (another
    aggregation is refused: with it, these advantages are ``grpo_no_std``'s)."""
    return grpo(scores, group_ids, response_mask, norm_by_std=False)


@ESTIMATORS.register("rloo")
def rloo(scores, group_ids, response_mask=None) -> torch.Tensor:
    """RLOO: A_b = s_b − mean of the other members of its group = n/(n−1)·(s_b − mean_g). Group of one → 0."""
    mean, _, n = _group_stats(scores, group_ids)
    nd = n.double()
    adv = torch.where(n > 1, (scores.double() - mean) * nd / (nd - 1).clamp(min=1), torch.zeros_like(mean))
    return adv.to(scores.dtype)


@ESTIMATORS.register("reinforce_pp")
def reinforce_pp(scores, group_ids, response_mask, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++: the return s_b sits on every response token (γ = 1) and is whitened over all valid tokens of
    the batch: (s_b − μ) / sqrt(σ² + eps), μ and unbiased σ² taken over tokens (so long responses weigh more).
    No group baseline."""
    lengths = response_mask.sum(-1).double()
    n_tok = lengths.sum()
    s = scores.double()
    mu = (s * lengths).sum() / n_tok
    var = (((s - mu) ** 2) * lengths).sum() / (n_tok - 1).clamp(min=1)
    return ((s - mu) * torch.rsqrt(var + eps)).to(scores.dtype)


def get_estimator(name: str) -> Callable[..., torch.Tensor]:
    return ESTIMATORS.get(name)
