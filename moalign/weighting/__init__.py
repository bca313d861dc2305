"""Weightings (scalarization algorithms). Importing this package registers every built-in algorithm."""

import importlib
import pkgutil

from moalign.weighting.base import (
    WEIGHTINGS,
    StepStats,
    Weighting,
    WeightingParams,
    make_weighting,
)

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["WEIGHTINGS", "StepStats", "Weighting", "WeightingParams", "make_weighting"]
