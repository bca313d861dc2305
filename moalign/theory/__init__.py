"""The theory lab: exact multi-objective softmax-policy problems, update rules, and the covariance-law and μ-PL
experiments (METHOD §2, §8). Everything is exact and in float64; any moalign weighting runs on these problems."""

from moalign.theory.lab import covariance_law, format_table, pl_study
from moalign.theory.problem import (
                                    SoftmaxProblem,
                                    correlated_rewards,
                                    policy_covariance,
                                    random_features,
                                    random_problem,
                                    stretched_features,
                                    tabular_features,
)
from moalign.theory.updates import (
                                    RULES,
                                    Clipped,
                                    Natural,
                                    Tilt,
                                    Trajectory,
                                    UpdateRule,
                                    Vanilla,
                                    make_rule,
                                    run,
                                    tilt,
)

__all__ = ["RULES", "Clipped", "Natural", "SoftmaxProblem", "Tilt", "Trajectory", "UpdateRule", "Vanilla",
           "correlated_rewards", "covariance_law", "format_table", "make_rule", "pl_study", "policy_covariance",
           "random_features", "random_problem", "run", "stretched_features", "tabular_features", "tilt"]
