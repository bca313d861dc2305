"""How much an objective's held-out expected reward changed, with an interval over seeds, prompts and samples.

docs/statistics.md states the method in full; this is its implementation.

**Data.** A configuration trained with S seeds; every run evaluates the same P held-out prompts at the start and the
end of training, K sampled completions each (with common random numbers, so a prompt's k-th completion at the start
and at the end share their random stream). ``d[s, p]`` is prompt p's change in run s: the mean reward of its K
completions at the end minus that at the start.

**Estimand.** Δ = E_seed E_x [J_end(x) − J_start(x)], J(x) the policy's expected reward on prompt x ~ the prompt
distribution the evaluation prompts are drawn from, averaged over the training randomness that seeds stand for.

**Model** (two-way crossed random effects, one cell per seed × prompt)::

    d[s, p] = Δ + a_s + b_p + e_sp     a ~ (0, σ²_seed), b ~ (0, σ²_prompt), e ~ (0, σ²_cell)
    σ²_cell = σ²_interaction + σ²_sample / K      (seed × prompt, and the noise of K completions)
    Var(d̄) = σ²_seed / S + σ²_prompt / P + σ²_cell / (S P)

With the mean squares of the two-way table (MS_seed on S−1 degrees of freedom, MS_prompt on P−1, MS_resid on
(S−1)(P−1)), E[MS_seed] = σ²_cell + P σ²_seed, E[MS_prompt] = σ²_cell + S σ²_prompt, E[MS_resid] = σ²_cell, so

    Var(d̄) = V_seed + V_prompt,   V_seed = MS_seed / (S P)   (= s²(seed means) / S, exactly χ²_{S−1}-distributed)
                                   V_prompt = max(0, MS_prompt − MS_resid) / (S P)   (= σ̂²_prompt / P)

**Interval.** d̄ ± max(t_{ν} √V, t_{S−1} √V_seed), V = V_seed + V_prompt, ν the Satterthwaite degrees of freedom of
the sum (V_seed on S−1, V_prompt on its own Satterthwaite ν_prompt). The second term keeps the interval at least as
wide as the exact t-interval over the seed means, which covers the change on these P prompts: an interval for the
whole prompt distribution must not be narrower. Without it Satterthwaite's approximation undercovers at S = 2
(≈ 89–93 % for 95 % when the seeds differ); with it the simulations of docs/statistics.md cover 94–98 % at S = 2
and 94–97 % at S ≥ 3 (tests/test_statistics.py).

**One run** (S = 1): the paired t-interval over prompts, d̄ ± t_{P−1} √(MS_prompt / P). Its estimand is the change
of *this* run's policy over the prompt distribution; training randomness is not covered.

Prompts with a missing value (every completion's scoring failed) in any run are left out of the table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from scipy import stats

Interval = tuple[float, float]


@dataclass(frozen=True)
class MeanSquares:
    """The two-way (seeds × prompts) ANOVA table of a complete [S, P] array of changes."""

    mean: float
    seeds: int
    prompts: int
    seed: float  # MS_seed, S − 1 degrees of freedom (0 when S = 1)
    prompt: float  # MS_prompt, P − 1 degrees of freedom
    resid: float  # MS_resid, (S − 1)(P − 1) degrees of freedom (0 when S = 1)

    @classmethod
    def of(cls, changes: np.ndarray) -> "MeanSquares":
        d = np.asarray(changes, dtype=float)
        seeds, prompts = d.shape
        mean = d.mean()
        seed_means, prompt_means = d.mean(axis=1), d.mean(axis=0)
        ms_seed = prompts * np.sum((seed_means - mean) ** 2) / (seeds - 1) if seeds > 1 else 0.0
        ms_prompt = seeds * np.sum((prompt_means - mean) ** 2) / (prompts - 1) if prompts > 1 else 0.0
        resid = d - seed_means[:, None] - prompt_means[None, :] + mean
        df_resid = (seeds - 1) * (prompts - 1)
        ms_resid = float(np.sum(resid ** 2) / df_resid) if df_resid > 0 else 0.0
        return cls(float(mean), seeds, prompts, float(ms_seed), float(ms_prompt), ms_resid)


@dataclass(frozen=True)
class ChangeEstimate:
    """Δ̂ with its interval and the pieces it was built from (docs/statistics.md)."""

    mean: float
    interval: Interval
    standard_error: float  # √V
    df: float  # degrees of freedom of the t quantile (inf when V = 0)
    seeds: int
    prompts: int  # prompts in the table (those with a value in every run)
    v_seed: float  # MS_seed / (S P); for one run 0
    v_prompt: float  # max(0, MS_prompt − MS_resid) / (S P); for one run MS_prompt / P
    confidence: float

    @property
    def rises(self) -> bool:
        return self.interval[0] > 0

    @property
    def falls(self) -> bool:
        return self.interval[1] < 0

    @property
    def method(self) -> str:
        if self.seeds == 1:
            return f"paired t over {self.prompts} prompts (one run)"
        return f"crossed seeds × prompts ({self.seeds} × {self.prompts}), Satterthwaite t"

    def to_dict(self) -> dict:
        return asdict(self) | {"interval": list(self.interval)}


def complete_prompts(changes: np.ndarray) -> np.ndarray:
    """The columns (prompts) of an [S, P] array that have a value in every row."""
    d = np.atleast_2d(np.asarray(changes, dtype=float))
    return d[:, ~np.isnan(d).any(axis=0)]


def half_width(ms_seed, ms_prompt, ms_resid, seeds: int, prompts: int, confidence: float):
    """The interval's half-width from the mean squares of an [S, P] table (S ≥ 2); elementwise over arrays.

    V_seed = MS_seed/(SP) on S−1 degrees of freedom; V_prompt = max(0, MS_prompt − MS_resid)/(SP) on
    ν_prompt = (MS_prompt − MS_resid)² / (MS_prompt²/(P−1) + MS_resid²/((S−1)(P−1))); ν the Satterthwaite degrees
    of freedom of V = V_seed + V_prompt; half-width max(t_ν √V, t_{S−1} √V_seed)."""
    s, p = seeds, prompts
    ms_seed, ms_prompt, ms_resid = (np.asarray(x, dtype=float) for x in (ms_seed, ms_prompt, ms_resid))
    v_seed = ms_seed / (s * p)
    excess = np.maximum(ms_prompt - ms_resid, 0.0)
    v_prompt = excess / (s * p)
    with np.errstate(divide="ignore", invalid="ignore"):
        df_prompt = np.maximum(1.0, excess ** 2 / (ms_prompt ** 2 / (p - 1) + ms_resid ** 2 / ((s - 1) * (p - 1))))
        v = v_seed + v_prompt
        df = v ** 2 / (v_seed ** 2 / (s - 1) + np.where(v_prompt > 0, v_prompt ** 2 / df_prompt, 0.0))
    q = (1.0 + confidence) / 2.0
    df = np.where(np.isfinite(df), df, 1e9)  # V = 0: any quantile times 0
    return np.maximum(stats.t.ppf(q, df) * np.sqrt(v), stats.t.ppf(q, s - 1) * np.sqrt(v_seed)), v_seed, v_prompt, df


def change_interval(changes: np.ndarray, confidence: float = 0.95) -> ChangeEstimate:
    """Δ̂ and its interval from per-prompt changes ``changes`` [S, P] (one row per run; a 1-D array is one run)."""
    d = complete_prompts(changes)
    seeds, prompts = d.shape
    if prompts < 2:
        raise ValueError(f"a change interval needs at least two prompts with a value in every run (got {prompts})")
    ms = MeanSquares.of(d)
    if seeds == 1:
        v_seed, v_prompt, df = 0.0, ms.prompt / prompts, float(prompts - 1)
        half = float(stats.t.ppf((1.0 + confidence) / 2.0, df)) * math.sqrt(v_prompt)
    else:
        half, v_seed, v_prompt, df = (float(x) for x in half_width(ms.seed, ms.prompt, ms.resid, seeds, prompts,
                                                                    confidence))
    return ChangeEstimate(ms.mean, (ms.mean - half, ms.mean + half), math.sqrt(v_seed + v_prompt), df, seeds, prompts,
                          v_seed, v_prompt, confidence)


# ---------------------------------------------------------------------------------------------------------------
# Variance components and power
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VarianceComponents:
    """The variances of the model above, per unit (docs/statistics.md):

    seed          σ²_seed         between seeds, of a run's mean change over the prompt distribution
    prompt        σ²_prompt       between prompts, of a prompt's expected change
    interaction   σ²_interaction  seed × prompt, beyond the sampling noise
    sample        σ²_sample       between the completions of one prompt in one run, of a single completion's
                                  paired change (end − start on the same random stream)
    """

    seed: float
    prompt: float
    interaction: float
    sample: float

    def cell(self, samples: int) -> float:
        """σ²_cell of a prompt's change averaged over ``samples`` completions."""
        return self.interaction + self.sample / samples

    @classmethod
    def estimate(cls, start: np.ndarray, end: np.ndarray) -> "VarianceComponents":
        """Moment estimates (negative ones set to 0) from per-completion rewards [S, P, K] at the start and the end
        of S ≥ 2 runs, completion k of a prompt paired across the two (common random numbers)."""
        paired = np.asarray(end, dtype=float) - np.asarray(start, dtype=float)
        if paired.ndim != 3 or paired.shape[0] < 2 or paired.shape[2] < 2:
            raise ValueError(f"need per-completion changes [S ≥ 2, P, K ≥ 2], got shape {paired.shape}")
        keep = ~np.isnan(paired).any(axis=(0, 2))
        paired = paired[:, keep]
        samples = paired.shape[2]
        sample = float(np.mean(np.var(paired, axis=2, ddof=1)))
        ms = MeanSquares.of(paired.mean(axis=2))
        return cls(seed=max(0.0, (ms.seed - ms.resid) / ms.prompts),
                   prompt=max(0.0, (ms.prompt - ms.resid) / ms.seeds),
                   interaction=max(0.0, ms.resid - sample / samples), sample=sample)


@dataclass(frozen=True)
class Design:
    seeds: int
    prompts: int
    samples: int


def standard_error(components: VarianceComponents, design: Design) -> float:
    """√Var(d̄) of a design: √(σ²_seed/S + σ²_prompt/P + σ²_cell/(S P))."""
    s, p = design.seeds, design.prompts
    return math.sqrt(components.seed / s + components.prompt / p + components.cell(design.samples) / (s * p))


def power(components: VarianceComponents, design: Design, effect: float, confidence: float = 0.95,
          draws: int = 20_000, seed: int = 0) -> float:
    """Probability that ``change_interval`` excludes 0 on the side of a true change ``effect`` (S ≥ 2), under the
    normal model: Δ̂ ~ N(effect, Var(d̄)) and, independently, each mean square ~ E[MS] χ²_df / df with
    E[MS_seed] = σ²_cell + P σ²_seed, E[MS_prompt] = σ²_cell + S σ²_prompt, E[MS_resid] = σ²_cell (exact for a
    balanced table with normal effects). The interval is computed from each draw by ``half_width``, as from data;
    Monte Carlo over ``draws`` draws (seeded: the same inputs give the same power)."""
    s, p = design.seeds, design.prompts
    if s < 2:
        raise ValueError("power is computed for S ≥ 2 seeds")
    rng = np.random.default_rng(seed)
    cell = components.cell(design.samples)

    def mean_square(expected: float, df: int) -> np.ndarray:
        return expected * rng.chisquare(df, draws) / df

    ms_seed = mean_square(cell + p * components.seed, s - 1)
    ms_prompt = mean_square(cell + s * components.prompt, p - 1)
    ms_resid = mean_square(cell, (s - 1) * (p - 1))
    half, *_ = half_width(ms_seed, ms_prompt, ms_resid, s, p, confidence)
    estimate = rng.normal(abs(effect), standard_error(components, design), draws)
    return float(np.mean(estimate - half > 0))


def smallest_detectable(components: VarianceComponents, design: Design, target: float = 0.8,
                        confidence: float = 0.95) -> Optional[float]:
    """The smallest |effect| detected with probability ≥ ``target`` (bisection on ``power``; None above 1)."""
    low, high = 0.0, 1.0
    if power(components, design, high, confidence) < target:
        return None
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if power(components, design, mid, confidence) < target else (low, mid)
    return high
