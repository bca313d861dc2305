"""Planning a study: variance components measured on a pilot, the power of a design, and what a design costs.

    python -m moalign.study.power PILOT_DIR COST_DIR [--effect 0.10] [--target 0.8] [--steps 100] [--jobs 2]
                                  [--evaluations 7] [--greedy-too] [--design S,P,K]

PILOT_DIR is a study whose runs (several seeds per algorithm) evaluated one split with sampled evaluations at the
start and after ``--steps`` steps; COST_DIR a study that ran every algorithm of the planned study (any length),
for the seconds per training step, per evaluated completion and per run. The command prints the variance
components of every (algorithm, objective) of the pilot, their envelope (each component's maximum) and, over a
grid of designs (seeds S, evaluation prompts P, completions per prompt K), the power to detect a change of
``--effect`` at 95% confidence under the envelope and the predicted wall time, cheapest first among the designs
that reach ``--target``. docs/reproducing.md shows its output for the ``quick`` preset; docs/statistics.md the
model.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from moalign.diagnostics.crossed import Design, VarianceComponents, power
from moalign.diagnostics.interference import SCORE
from moalign.errors import UserError
from moalign.study.findings import StudyRun, load_study


def pilot_components(runs: Sequence[StudyRun], split: str = "val", step: Optional[int] = None
                     ) -> dict[tuple[str, str], VarianceComponents]:
    """(algorithm, objective) → components of the change from the first evaluation to the one at ``step`` (default:
    the last), from per-completion rewards; objective ``score`` is the fixed scalarization."""
    by_algorithm: dict[str, list[StudyRun]] = {}
    for r in runs:
        by_algorithm.setdefault(r.algorithm, []).append(r)
    out = {}
    for algorithm, members in by_algorithm.items():
        evaluations = [m.run.evaluations_by_mode.get("sampled", {}).get(split) for m in members]
        if any(e is None or not e.per_sample for e in evaluations):
            raise UserError(f"pilot runs of {algorithm} have no sampled {split} evaluations with per-completion "
                            f"rewards; run the pilot with eval.mode=sampled")
        ends = [int(np.flatnonzero(e.steps == (e.steps[-1] if step is None else step))[0]) for e in evaluations]
        objectives = members[0].run.objectives
        weights = members[0].run.scalarization
        for objective in [*objectives, SCORE]:
            def table(e, t):
                if objective == SCORE:
                    return sum(w * e.per_sample[o][t] for o, w in weights.items())
                return e.per_sample[objective][t]

            start = np.stack([table(e, 0) for e in evaluations])
            end = np.stack([table(e, t) for e, t in zip(evaluations, ends)])
            out[(algorithm, objective)] = VarianceComponents.estimate(start, end)
    return out


def envelope(components: Sequence[VarianceComponents]) -> VarianceComponents:
    """Each component's largest value: a planning value no measured (algorithm, objective) exceeds."""
    return VarianceComponents(*(max(getattr(c, f) for c in components)
                                for f in ("seed", "prompt", "interaction", "sample")))


@dataclass(frozen=True)
class Costs:
    """Measured seconds: per training step of each algorithm, per evaluated completion, and per run beyond those."""

    step: dict[str, float]
    completion: float
    run: float

    @classmethod
    def measure(cls, runs: Sequence[StudyRun]) -> "Costs":
        step: dict[str, list[float]] = {}
        completion, per_run = [], []
        for r in runs:
            step_seconds = r.series("perf/step_s")[1]
            step.setdefault(r.algorithm, []).extend(step_seconds.tolist())
            evals = [(rec[k], rec[k.removesuffix("seconds") + "completions"]) for rec in r.records for k in rec
                     if k.startswith("eval/") and k.endswith("/seconds") and k.removesuffix("seconds") + "completions"
                     in rec]
            completion.extend(s / n for s, n in evals)
            wall = _wall_seconds(r.run.path)
            if wall is not None:
                per_run.append(wall - step_seconds.sum() - sum(s for s, _ in evals))
        if not step or not completion:
            raise UserError("the cost study logged no perf/step_s or no evaluation cost; use a study of this version")
        return cls({a: float(np.mean(v)) for a, v in step.items()}, float(np.mean(completion)),
                   float(np.median(per_run)) if per_run else 0.0)

    def minutes(self, design: Design, steps: int, evaluations_per_run: int, jobs: int, greedy_too: bool = False
                ) -> float:
        """Predicted wall minutes of a study: every algorithm × S seeds, ``jobs`` runs at a time; ``greedy_too``:
        each evaluation also decodes one greedy completion per prompt (eval.mode=both)."""
        completions = design.prompts * (design.samples + greedy_too)
        per_seed = sum(steps * s + evaluations_per_run * completions * self.completion + self.run
                       for s in self.step.values())
        return design.seeds * per_seed / jobs / 60


def _wall_seconds(run_dir: Path) -> Optional[float]:
    """The run's wall time as runs.csv of its study recorded it."""
    import csv

    table = run_dir.parent.parent / "runs.csv"
    if not table.is_file():
        return None
    with table.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["run"] == run_dir.name and row.get("wall_s"):
                return float(row["wall_s"])
    return None


def design_table(planning: VarianceComponents, costs: Costs, effect: float, steps: int, evaluations_per_run: int,
                 jobs: int, greedy_too: bool = False, seeds: Sequence[int] = range(2, 9),
                 prompts: Sequence[int] = (16, 32, 48, 64, 96, 128), samples: Sequence[int] = (1, 2, 4, 8, 16)
                 ) -> list[dict]:
    """Every design of the grid with its power and predicted minutes, cheapest first."""
    rows = [{"seeds": s, "prompts": p, "samples": k,
             "power": power(planning, Design(s, p, k), effect),
             "minutes": costs.minutes(Design(s, p, k), steps, evaluations_per_run, jobs, greedy_too)}
            for s in seeds for p in prompts for k in samples]
    return sorted(rows, key=lambda r: (r["minutes"], -r["power"]))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pilot")
    parser.add_argument("cost")
    parser.add_argument("--effect", type=float, default=0.10)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--evaluations", type=int, default=7, help="held-out evaluations per run (all splits)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--split", default="val")
    parser.add_argument("--greedy-too", action="store_true", help="the study also evaluates greedily (eval.mode=both)")
    parser.add_argument("--design", help="S,P,K: also print this design's power for each measured (algorithm, "
                                         "objective) and under the envelope, with 200 000 draws")
    args = parser.parse_args(argv)
    components = pilot_components(load_study(args.pilot).runs, args.split, args.steps)
    print("variance components of the change (pilot):")
    print(f"  {'algorithm':<12} {'objective':<12} {'seed':>9} {'prompt':>9} {'interact':>9} {'sample':>8}")
    for (algorithm, objective), c in components.items():
        print(f"  {algorithm:<12} {objective:<12} {c.seed:9.5f} {c.prompt:9.5f} {c.interaction:9.5f} {c.sample:8.4f}")
    planning = envelope([c for (_, objective), c in components.items() if objective != SCORE])
    print(f"  {'envelope':<25} {planning.seed:9.5f} {planning.prompt:9.5f} {planning.interaction:9.5f} "
          f"{planning.sample:8.4f}")
    costs = Costs.measure(load_study(args.cost).runs)
    print(f"costs: {costs.completion * 1e3:.2f} ms per evaluated completion, {costs.run:.1f} s per run, s/step: "
          + ", ".join(f"{a} {s:.3f}" for a, s in costs.step.items()))
    rows = design_table(planning, costs, args.effect, args.steps, args.evaluations, args.jobs, args.greedy_too)
    print(f"designs with power ≥ {args.target} for a change of {args.effect} (cheapest first):")
    print(f"  {'S':>2} {'P':>4} {'K':>3} {'power':>6} {'minutes':>8}")
    for row in [r for r in rows if r["power"] >= args.target][:12]:
        print(f"  {row['seeds']:>2} {row['prompts']:>4} {row['samples']:>3} {row['power']:6.3f} {row['minutes']:8.1f}")
    if args.design:
        design = Design(*(int(x) for x in args.design.split(",")))
        print(f"design {design}: power for a change of {args.effect} with each measured component set")
        for (algorithm, objective), c in [*components.items(), (("envelope", ""), planning)]:
            print(f"  {algorithm:<12} {objective:<12} {power(c, design, args.effect, draws=200_000):6.3f}")


if __name__ == "__main__":
    main()
