"""The local covariance law's statistics (METHOD §2).

For a KL-proximal update π' ∝ π·exp(η s), d/dη E_{π'}[r_j] = E_x Cov_y(r_j, s): objective j improves to first order
iff its reward covaries positively with the training signal. Under a clipped surrogate the signal a completion
really receives is

    w_b = agg_t( Â_b · ρ_bt · I_bt ),   ρ_bt = exp(clamp(logπ_new − logπ_old, −20, 20)),
    I_bt = [ρ_bt ≤ 1+ε_high] if Â_b ≥ 0 else [ρ_bt ≥ 1−ε_low]       (zero outside the response mask)

with Â_b the token-mean advantage of completion b and agg one of the authors' three (github.com/yining610/ctwa):

    "mean"            w_b = Σ_t Â ρ I / L_b                  (L_b the response length)
    "mean_unclipped"  w_b = Σ_t Â ρ I / (Σ_t I + 1e-8)       (the mean over the unclipped tokens only)
    "sum"             w_b = Σ_t Â ρ I

``w_unclipped`` is the "mean" signal with I dropped (every token counted, none clipped): the reference of the
clipping distortion E|w − w_unclipped|. A completion with Â_b = 0 has w_b = 0 whatever its ratios
(``carries_signal``), so its post-update log-probs are never needed, and the unclipped fraction counts only the
tokens of completions that carry a signal (clipping a token whose advantage is 0 changes nothing; the authors'
diagnostic counts every response token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

W_AGGREGATIONS = ("mean", "mean_unclipped", "sum")


@dataclass
class TrainingSignal:
    w: torch.Tensor  # [B] the clipped training signal
    w_unclipped: torch.Tensor  # [B] the same without the clip indicator
    unclipped_fraction: torch.Tensor  # scalar: fraction of the signal-carrying completions' tokens with I = 1

    @property
    def distortion(self) -> torch.Tensor:
        """E_b |w_clip − w_unclip|: how far clipping moves the signal away from the unclipped one."""
        return (self.w - self.w_unclipped).abs().mean()


def sequence_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Â_b [B] (float64): the token mean of a [B, T] advantage over the response mask, or a [B] advantage as is."""
    if advantages.dim() == 1:
        return advantages.double()
    mask = response_mask.to(torch.float64)
    return (advantages.double() * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def carries_signal(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: Â_b ≠ 0. The other completions have w_b = 0 whatever the post-update policy (its log-probs on
    them can be skipped: the trainer does)."""
    return sequence_advantages(advantages, response_mask) != 0


def training_signal(advantages: torch.Tensor, old_logprobs: torch.Tensor, new_logprobs: torch.Tensor,
                    response_mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2,
                    aggregation: str = "mean") -> TrainingSignal:
    """Per-completion training signal w (METHOD §2). ``advantages`` is [B] or [B, T]."""
    if aggregation not in W_AGGREGATIONS:
        raise ValueError(f"unknown w aggregation {aggregation!r}; valid: {', '.join(W_AGGREGATIONS)}")
    mask = response_mask.to(torch.float64)
    n_tok = mask.sum(-1).clamp(min=1)
    adv_seq = sequence_advantages(advantages, response_mask)
    ratio = torch.exp(torch.clamp(new_logprobs.double() - old_logprobs.double(), -20.0, 20.0))
    keep = torch.where(adv_seq[:, None] >= 0, ratio <= 1.0 + eps_high, ratio >= 1.0 - eps_low).double() * mask
    per_tok = adv_seq[:, None] * ratio * mask
    kept = (per_tok * keep).sum(-1)
    w = {"mean": kept / n_tok, "mean_unclipped": kept / (keep.sum(-1) + 1e-8), "sum": kept}[aggregation]
    w_unclipped = per_tok.sum(-1) if aggregation == "sum" else per_tok.sum(-1) / n_tok
    signal_tokens = mask * (adv_seq != 0).double()[:, None]
    n_signal = signal_tokens.sum()
    frac = (keep * signal_tokens).sum() / n_signal if n_signal > 0 else torch.ones((), dtype=torch.float64)
    return TrainingSignal(w.float(), w_unclipped.float(), frac.float())


def drop_outliers(w: torch.Tensor, factor: float = 100.0) -> torch.Tensor:
    """Boolean mask of usable signals: finite and |w| ≤ factor·median|w| (all finite ones if the median is 0).

    The median is the ordinary one (the mean of the two middle values for an even count, as the authors'
    ``np.median``); ``torch.median`` returns the lower middle value, which for |w| split between two levels would
    set the threshold by the smaller one and drop half the batch."""
    finite = torch.isfinite(w)
    if not finite.any():
        return finite
    med = w[finite].abs().double().quantile(0.5)
    if med <= 0:
        return finite
    return finite & (w.abs() <= factor * med)


@dataclass
class GroupCovariance:
    cov: torch.Tensor  # [M] statistic per objective (mean over groups, or pooled)
    corr: torch.Tensor  # [M] correlation, same aggregation (NaN where undefined everywhere)
    num_groups: torch.Tensor  # [M] groups that contributed per objective


def group_covariance(rewards: torch.Tensor, signal: torch.Tensor, group_ids: torch.Tensor,
                     valid: torch.Tensor | None = None, pooled: bool = False) -> GroupCovariance:
    """Within-group covariance and correlation between each objective's reward and a signal.

    Per prompt group g with ≥ 2 usable members: centre r_j and s within g; cov_gj = mean_i(r̃_ij s̃_i) (population),
    corr_gj = cov_gj / (std r̃_j · std s̃) when that denominator > 1e-8. The result averages cov_gj (and the defined
    corr_gj) over groups, or — with ``pooled`` — computes them once over all centred samples. A sample is usable for
    objective j when its signal is valid and r_j is not NaN (missing).
    """
    r = rewards.double()
    s = signal.double()
    B, M = r.shape
    base_ok = torch.isfinite(s) if valid is None else (valid & torch.isfinite(s))
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1 if B else 0
    covs, corrs, ngroups = [], [], []
    for j in range(M):
        ok = base_ok & ~torch.isnan(r[:, j])
        okd = ok.double()
        cnt = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, okd)
        rj = torch.where(ok, r[:, j], torch.zeros_like(s))
        sj = torch.where(ok, s, torch.zeros_like(s))
        mean_r = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, rj) / cnt.clamp(min=1)
        mean_s = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, sj) / cnt.clamp(min=1)
        rc = (rj - mean_r[inv]) * okd
        sc = (sj - mean_s[inv]) * okd
        use = (cnt >= 2)[inv] & ok
        if pooled:
            n = use.double().sum()
            if n < 2:
                covs.append(torch.tensor(0.0, dtype=torch.float64)); corrs.append(torch.tensor(float("nan")))
                ngroups.append(0); continue
            cov = (rc * sc)[use].sum() / n
            den = ((rc[use] ** 2).sum() / n).sqrt() * ((sc[use] ** 2).sum() / n).sqrt()
            covs.append(cov)
            corrs.append(cov / den if den > 1e-8 else torch.tensor(float("nan"), dtype=torch.float64))
            ngroups.append(int((cnt >= 2).sum()))
            continue
        gsum = lambda x: torch.zeros(G, dtype=torch.float64).index_add_(0, inv, x)  # noqa: E731
        n_g = cnt.clamp(min=1)
        cov_g = gsum(rc * sc) / n_g
        den_g = (gsum(rc ** 2) / n_g).sqrt() * (gsum(sc ** 2) / n_g).sqrt()
        has = cnt >= 2
        if not has.any():
            covs.append(torch.tensor(0.0, dtype=torch.float64)); corrs.append(torch.tensor(float("nan")))
            ngroups.append(0); continue
        covs.append(cov_g[has].mean())
        defined = has & (den_g > 1e-8)
        corrs.append((cov_g[defined] / den_g[defined]).mean() if defined.any()
                     else torch.tensor(float("nan"), dtype=torch.float64))
        ngroups.append(int(has.sum()))
    return GroupCovariance(torch.stack(covs).float(), torch.stack([c.double() for c in corrs]).float(),
                           torch.tensor(ngroups))
