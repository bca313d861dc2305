"""Coverage of 95% intervals for a change over seeds × prompts, by simulation (docs/statistics.md).

    python bench/coverage.py              # 4000 simulated studies per cell (≈ 1 minute)

Normal tables d[s, p] = a_s + b_p + e_sp (true change 0) over a grid of seed, prompt and residual standard
deviations, for S = 2, 3, 4, 6 seeds and P = 32, 64 prompts. Four intervals are compared:

    seed means      Student's t over the S seed means (ignores that every seed shares the P prompts)
    satterthwaite3  (MS_seed + MS_prompt − MS_resid)/(SP) with Satterthwaite's ν over the three mean squares
    two_part        V_seed + V_prompt with Satterthwaite's ν over the two parts (S−1 and ν_prompt)
    moalign         two_part, never narrower than the t-interval over the seed means (diagnostics.crossed)

Prints, per S, the lowest and the highest coverage over the grid of each interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moalign.diagnostics.crossed import half_width  # noqa: E402

SEED_SD = (0.0, 0.01, 0.03, 0.05, 0.08, 0.12)
PROMPT_SD = (0.0, 0.05, 0.1)
RESIDUAL_SD = (0.05, 0.15)


def mean_squares(d: np.ndarray):
    """Per study of d [R, S, P]: grand mean, MS_seed, MS_prompt, MS_resid."""
    _, s, p = d.shape
    mean = d.mean(axis=(1, 2))
    seed_means, prompt_means = d.mean(axis=2), d.mean(axis=1)
    ms_seed = p * ((seed_means - mean[:, None]) ** 2).sum(1) / (s - 1)
    ms_prompt = s * ((prompt_means - mean[:, None]) ** 2).sum(1) / (p - 1)
    resid = d - seed_means[:, :, None] - prompt_means[:, None, :] + mean[:, None, None]
    return mean, ms_seed, ms_prompt, (resid ** 2).sum((1, 2)) / ((s - 1) * (p - 1))


def half_widths(d: np.ndarray) -> dict[str, np.ndarray]:
    _, s, p = d.shape
    _, ms_seed, ms_prompt, ms_resid = mean_squares(d)
    t = lambda df: stats.t.ppf(0.975, df)  # noqa: E731
    v3 = np.maximum(ms_seed + ms_prompt - ms_resid, 1e-30) / (s * p)
    df3 = (s * p * v3) ** 2 / (ms_seed ** 2 / (s - 1) + ms_prompt ** 2 / (p - 1) + ms_resid ** 2 / ((s - 1) * (p - 1)))
    moalign, v_seed, v_prompt, df = half_width(ms_seed, ms_prompt, ms_resid, s, p, 0.95)
    return {"seed means": t(s - 1) * np.sqrt(ms_seed / (s * p)),
            "satterthwaite3": t(np.maximum(df3, 1)) * np.sqrt(v3),
            "two_part": t(df) * np.sqrt(v_seed + v_prompt),
            "moalign": moalign}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'S':>2}  " + "  ".join(f"{name:>16}" for name in ("seed means", "satterthwaite3", "two_part", "moalign")))
    for seeds in (2, 3, 4, 6):
        coverage: dict[str, list[float]] = {}
        for prompts in (32, 64):
            for a in SEED_SD:
                for b in PROMPT_SD:
                    for e in RESIDUAL_SD:
                        d = (rng.normal(0, a, (args.studies, seeds, 1)) + rng.normal(0, b, (args.studies, 1, prompts))
                             + rng.normal(0, e, (args.studies, seeds, prompts)))
                        mean = d.mean(axis=(1, 2))
                        for name, half in half_widths(d).items():
                            coverage.setdefault(name, []).append(float(np.mean(np.abs(mean) <= half)))
        print(f"{seeds:>2}  " + "  ".join(f"{min(c):7.3f}–{max(c):.3f}" for c in coverage.values()))


if __name__ == "__main__":
    main()
