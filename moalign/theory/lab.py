"""The theory lab's two experiments, each a function returning table rows (lists of dicts), and a table printer.

``covariance_law`` — on random exact problems, does the first-order law of METHOD §2 predict the sign of each
objective's change under each update rule, and is the error of the prediction second order in η?

``pl_study`` — on one problem seen through several models (feature maps), how do the μ-PL constants, the linear
rate (1 − μ/L)^t of METHOD §8 and cross-objective interference depend on the model's geometry?
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from moalign.rl.covariance import group_covariance, training_signal
from moalign.diagnostics.pl import estimate_mu, linear_rate_bound
from moalign.errors import UserError
from moalign.rl.estimators import grpo
from moalign.theory.problem import (
    DTYPE,
    SoftmaxProblem,
    correlated_rewards,
    expected,
    policy_covariance,
    random_features,
    random_problem,
    stretched_features,
    tabular_features,
)
from moalign.theory.updates import (
    ExactRule,
    Natural,
    Tilt,
    Vanilla,
    clipped_update,
    sample_groups,
)

Row = dict[str, Any]

# ---------------------------------------------------------------------- covariance law

LAW_ETAS = (1e-1, 1e-2, 1e-3, 1e-4)  # step sizes of the error-order fit
SIGN_ETA = 1e-3  # "small step" of the sign check for the exact rules
ROUND_OFF = 1e-14  # errors and changes below this are float64 noise on J ~ 1
CLIPPED_SETTINGS = (  # (η, ε): a small step that barely clips, a large step with a tight clip
    (0.05, 0.2),
    (2.0, 0.05),
)


@dataclass
class LawTally:
    """Cases (instance × objective) of one rule: sign agreement of the prediction with the realised change, and
    how often an alternative prediction has the wrong sign while this one is right."""

    rule: str
    eta: float
    prediction: str
    alternative: Optional[str] = None
    cases: int = 0
    agree: int = 0
    alternative_wrong_prediction_right: int = 0
    prediction_wrong_alternative_right: int = 0
    slopes: list[float] = field(default_factory=list)
    clipped_fractions: list[float] = field(default_factory=list)

    def add(self, realised: torch.Tensor, predicted: torch.Tensor, alternative: Optional[torch.Tensor] = None) -> None:
        for j in range(realised.numel()):
            if abs(float(realised[j])) <= ROUND_OFF or float(predicted[j]) == 0.0:
                continue  # no sign to predict
            self.cases += 1
            right = (realised[j] > 0) == (predicted[j] > 0)
            self.agree += int(right)
            if alternative is not None:
                alternative_right = (realised[j] > 0) == (alternative[j] > 0)
                self.alternative_wrong_prediction_right += int(right and not alternative_right)
                self.prediction_wrong_alternative_right += int(alternative_right and not right)

    def row(self) -> Row:
        per_case = lambda n: n / self.cases if self.cases else math.nan  # noqa: E731
        return {
            "rule": self.rule,
            "eta": self.eta,
            "prediction": self.prediction,
            "cases": self.cases,
            "sign_agreement": per_case(self.agree),
            "error_slope": _median(self.slopes),
            "alternative": self.alternative,
            "alt_wrong_pred_right": per_case(self.alternative_wrong_prediction_right) if self.alternative else None,
            "pred_wrong_alt_right": per_case(self.prediction_wrong_alternative_right) if self.alternative else None,
            "clipped_tokens": _mean(self.clipped_fractions),
        }


def _median(values: Sequence[float]) -> Optional[float]:
    return float(torch.tensor(values, dtype=DTYPE).median()) if values else None


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def error_slope(etas: Sequence[float], errors: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log error vs log η over the points above round-off (None with fewer than 3)."""
    points = [(math.log(e), math.log(err)) for e, err in zip(etas, errors) if err > ROUND_OFF]
    if len(points) < 3:
        return None
    x, y = torch.tensor(points, dtype=DTYPE).T
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def random_law_instance(generator: torch.Generator) -> tuple[SoftmaxProblem, torch.Tensor, torch.Tensor]:
    """A random problem (2–4 prompts, 3–6 responses, 2–3 objectives, copula rewards of random correlation, binary
    or continuous, a full-rank random model with condition number in [1, 100]), a random θ and weights λ."""
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=generator))  # noqa: E731
    uniform = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=DTYPE))  # noqa: E731
    P, K, M = randint(2, 4), randint(3, 6), randint(2, 3)
    correlation = uniform(-1.0 / (M - 1) + 0.05, 0.8)
    binary = bool(torch.rand((), generator=generator) < 0.5)
    features = random_features(P, K, condition=10 ** uniform(0.0, 2.0), generator=generator)
    problem = random_problem(P, K, M, correlation, binary, features, generator)
    theta = torch.randn(problem.dim, dtype=DTYPE, generator=generator)
    exponential = -torch.log(torch.rand(M, dtype=DTYPE, generator=generator))
    weights = exponential / exponential.sum()  # λ ~ Dirichlet(1, …, 1): uniform on the simplex
    return problem, theta, weights


def covariance_law(instances: int = 200, seed: int = 0, group_size: int = 16, epochs: int = 4) -> list[Row]:
    """Check the first-order law of each update rule on ``instances`` random problems (METHOD §2).

    Exact rules (tilt, natural, vanilla) step along their exact direction for s = Σ λ_j r_j: the prediction's sign is
    compared with ΔJ_j at η = 1e-3, and the error |ΔJ_j(η) − η·prediction| is fitted against η ∈ {1e-1 … 1e-4}
    (slope ≈ 2: the prediction is the exact derivative). The vanilla row also counts cases where the covariance law
    E_x Cov(r_j, s) has the wrong sign while ⟨∇J_j, ∇J_s⟩ is right.

    Clipped rows sample ``group_size`` responses per prompt, take GRPO advantages and ``epochs`` surrogate steps;
    the prediction is the batch's within-group Cov(r_j, w) with w the clipped training signal after the update, the
    alternative is Cov(r_j, w_unclipped). These are estimates from one batch, not derivatives: no error slope.
    """
    if instances < 1:
        raise UserError(f"--instances must be ≥ 1, got {instances}")
    generator = torch.Generator().manual_seed(seed)
    exact: list[tuple[ExactRule, LawTally]] = [
        (Tilt(), LawTally("tilt", SIGN_ETA, "E_x Cov(r_j, s)")),
        (Natural(), LawTally("natural", SIGN_ETA, "E_x Cov(r_j, s)")),
        (Vanilla(), LawTally("vanilla", SIGN_ETA, "<grad J_j, grad J_s>", "E_x Cov(r_j, s)")),
    ]
    clipped = [(eta, eps, LawTally(f"clipped eps={eps}", eta, "Cov(r_j, w)", "Cov(r_j, w_unclipped)"))
               for eta, eps in CLIPPED_SETTINGS]
    for _ in range(instances):
        problem, theta, weights = random_law_instance(generator)
        signal = problem.scalarized(weights)
        probs = problem.probs(theta)
        start = problem.objective_values(probs)
        change = lambda new_theta: problem.objective_values(problem.probs(new_theta)) - start  # noqa: E731
        covariance = policy_covariance(probs, problem.rewards, signal)
        inner = problem.objective_grads(theta) @ problem.grad(theta, signal)
        predictions = {"tilt": covariance, "natural": covariance, "vanilla": inner}
        alternatives = {"vanilla": covariance}
        for rule, tally in exact:
            predicted = predictions[rule.name]
            direction = rule.direction(problem, theta, signal)
            tally.add(change(theta + SIGN_ETA * direction), predicted, alternatives.get(rule.name))
            errors = torch.stack([(change(theta + eta * direction) - eta * predicted).abs() for eta in LAW_ETAS])
            for j in range(problem.num_objectives):
                slope = error_slope(LAW_ETAS, errors[:, j].tolist())
                if slope is not None:
                    tally.slopes.append(slope)
        for eta, eps, tally in clipped:
            batch = sample_groups(problem, probs, group_size, generator)
            advantages = grpo(batch.take(signal), batch.group_ids)
            new_theta = clipped_update(problem, theta, batch, advantages, eta, eps, epochs)
            w = training_signal(advantages, batch.log_probs(problem, theta), batch.log_probs(problem, new_theta),
                                batch.response_mask, eps, eps, "mean")
            tally.add(change(new_theta), group_covariance(batch.rewards, w.w, batch.group_ids).cov,
                      group_covariance(batch.rewards, w.w_unclipped, batch.group_ids).cov)
            tally.clipped_fractions.append(1.0 - float(w.unclipped_fraction))
    return [tally.row() for _, tally in exact] + [tally.row() for *_, tally in clipped]


# ---------------------------------------------------------------------- μ-PL


@dataclass(frozen=True)
class AscentPath:
    """Gradient ascent on J_s: row t is the state after t steps."""

    thetas: torch.Tensor  # [T+1, D]
    values: torch.Tensor  # [T+1] J_s
    objective_values: torch.Tensor  # [T+1, M]
    grad_sq_norms: torch.Tensor  # [T+1] ‖∇J_s‖²


def gradient_ascent(problem: SoftmaxProblem, signal: torch.Tensor, steps: int, step_size: float,
                    theta0: Optional[torch.Tensor] = None) -> AscentPath:
    """θ_{t+1} = θ_t + step_size · ∇J_s(θ_t), recording J_s, every J_j and ‖∇J_s‖² along the way."""
    theta = problem.zero_params() if theta0 is None else theta0
    thetas, values, objective_values, grad_sq_norms = [], [], [], []
    for _ in range(steps + 1):
        probs = problem.probs(theta)
        grad = problem.grad(theta, signal)
        thetas.append(theta)
        values.append(expected(probs, signal))
        objective_values.append(problem.objective_values(probs))
        grad_sq_norms.append(grad @ grad)
        theta = theta + step_size * grad
    return AscentPath(torch.stack(thetas), torch.stack(values), torch.stack(objective_values),
                      torch.stack(grad_sq_norms))


def path_curvature(problem: SoftmaxProblem, signal: torch.Tensor, path: AscentPath) -> float:
    """max_t ‖∇²J_s(θ_t)‖: the largest |eigenvalue| of the Hessian seen along a path."""
    return max(float(torch.linalg.eigvalsh(problem.hessian(theta, signal)).abs().max()) for theta in path.thetas)


def calibrated_ascent(problem: SoftmaxProblem, signal: torch.Tensor, steps: int,
                      rounds: int = 5) -> tuple[float, AscentPath]:
    """Gradient ascent with step 1/L where L is the largest curvature seen along its own path.

    The global bound (``smoothness_bound``) is valid but loose (often 10–50×). Start from the curvature seen along
    the bound's path, and rerun with the curvature of the previous path until a path never sees more than the L it
    was run with. Falls back to the global bound if that takes more than ``rounds`` reruns.
    """
    bound = problem.smoothness_bound(signal)
    L = path_curvature(problem, signal, gradient_ascent(problem, signal, steps, 1.0 / bound))
    for _ in range(rounds):
        path = gradient_ascent(problem, signal, steps, 1.0 / L)
        seen = path_curvature(problem, signal, path)
        if seen <= L:
            return L, path
        L = seen
    return bound, gradient_ascent(problem, signal, steps, 1.0 / bound)


def best_value(problem: SoftmaxProblem, signal: torch.Tensor, step_size: float, steps: int) -> float:
    """sup_θ J_s: exact (E_x max_y s) when the model spans all policies, else the best value of a long ascent."""
    if problem.spans_all_policies:
        return problem.optimum(signal)
    return float(gradient_ascent(problem, signal, steps, step_size).values.max())


def min_gradient_cosine(grads: torch.Tensor) -> float:
    """The smallest cosine between two objectives' gradients (rows of G)."""
    unit = grads / grads.norm(dim=1, keepdim=True)
    cosines = unit @ unit.T
    pairs = torch.triu_indices(len(grads), len(grads), offset=1)
    return float(cosines[pairs[0], pairs[1]].min())


def pl_models(problem: SoftmaxProblem, generator: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    """Feature maps ("models") for one problem: tabular, well- and ill-conditioned full-rank ones, kernels that
    stretch the direction where the first two objectives' logit gradients agree or conflict, and a restricted one."""
    P, K = problem.num_prompts, problem.num_responses
    tabular = problem.with_features(tabular_features(P, K))
    c = tabular.objective_grads(tabular.zero_params())[:2]  # logit-space gradients at the uniform policy
    agree = (c[0] / c[0].norm() + c[1] / c[1].norm()).reshape(P, K)
    conflict = (c[0] / c[0].norm() - c[1] / c[1].norm()).reshape(P, K)
    return [
        ("tabular", tabular_features(P, K)),
        ("well-conditioned", random_features(P, K, condition=2.0, generator=generator)),
        ("ill-conditioned", random_features(P, K, condition=100.0, generator=generator)),
        ("aligned kernel", stretched_features(agree, 20.0)),
        ("conflicting kernel", stretched_features(conflict, 20.0)),
        (f"restricted (D={P * K // 2})", random_features(P, K, dim=P * K // 2, condition=2.0, generator=generator)),
    ]


def pl_study(seed: int = 0, steps: int = 300, prompts: int = 3, responses: int = 5, correlation: float = -0.6,
             reference_steps: int = 20000, degrade_tol: float = 1e-6) -> list[Row]:
    """Gradient ascent with step 1/L on J_s, s = ½(r_1 + r_2) with negatively correlated rewards, once per model.

    Columns: ``condition`` κ(Φ); ``grad_cos`` the cosine of ∇J_1 and ∇J_2 at the start (the uniform policy);
    ``L_bound`` the global smoothness bound and ``L`` the curvature calibrated along the path (``calibrated_ascent``,
    the step is 1/L); μ̂ = min_t ‖∇J_t‖²/(2(J* − J_t)) (``estimate_mu``) with J* exact when the model spans all
    policies, else the best value of a ``reference_steps`` ascent. ``gap_ratio`` (J* − J_T)/(J* − J_0) is compared
    with ``rate_bound`` (1 − μ̂/L)^T; ``bound_holds`` checks every t (it follows from the ascent lemma, so a failure
    means L was too small). Softmax policies are not uniformly PL (near a deterministic optimum ‖∇J‖² shrinks like
    the gap squared), so μ̂ depends on the horizon: ``mu_hat_early`` is μ̂ over the first tenth of the run.
    Interference: ``degraded`` lists the objectives that fell more than ``degrade_tol`` below their initial value at
    some step, ``worst_drop`` the largest fall, while ``scalar_rises`` says J_s never decreased.
    """
    generator = torch.Generator().manual_seed(seed)
    base = SoftmaxProblem(correlated_rewards(prompts, responses, 2, correlation, generator=generator),
                          tabular_features(prompts, responses), ("r1", "r2"))
    rows = []
    for name, features in pl_models(base, generator):
        problem = base.with_features(features)
        signal = problem.scalarized([0.5, 0.5])
        L, path = calibrated_ascent(problem, signal, steps)
        J_star = max(best_value(problem, signal, 1.0 / L, reference_steps), float(path.values.max()))
        gaps = J_star - path.values
        mu = estimate_mu(path.grad_sq_norms.tolist(), gaps.tolist())
        early = steps // 10 + 1
        mu_early = estimate_mu(path.grad_sq_norms[:early].tolist(), gaps[:early].tolist())
        observed = gaps / gaps[0]
        bound = torch.tensor([linear_rate_bound(mu, L, t) for t in range(steps + 1)], dtype=DTYPE)
        drops = path.objective_values[0] - path.objective_values.min(dim=0).values
        rows.append({
            "model": name,
            "dim": problem.dim,
            "condition": float(torch.linalg.cond(problem.flat_features)),
            "grad_cos": min_gradient_cosine(problem.objective_grads(path.thetas[0])),
            "L_bound": problem.smoothness_bound(signal),
            "L": L,
            "mu_hat_early": mu_early,
            "mu_hat": mu,
            "mu_over_L": mu / L,
            "gap_ratio": float(observed[-1]),
            "rate_bound": float(bound[-1]),
            "bound_holds": bool((observed <= bound + 1e-12).all()),
            "J_star": J_star,
            "J_star_exact": problem.spans_all_policies,
            "scalar_rises": bool((path.values.diff() >= -1e-15).all()),
            "degraded": ", ".join(o for o, d in zip(problem.objectives, drops) if d > degrade_tol) or "none",
            "worst_drop": float(drops.max()),
        })
    return rows


# ---------------------------------------------------------------------- printing


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Row], title: Optional[str] = None, width: int = 400) -> str:
    """Rows (dicts; columns in first-seen key order) as a plain-text table rendered by rich. Columns keep their
    natural width up to ``width`` characters in all, so headers are not cut."""
    table = Table(title=title)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    console = Console(file=io.StringIO(), width=width, record=True)
    console.print(table)
    return console.export_text()
