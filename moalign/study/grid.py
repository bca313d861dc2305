"""A study: one base config, a grid of varied factors and per-value overrides, expanded into named runs.

A study YAML::

    name: quick
    base: {...}                       # a TrainConfig tree shared by every run
    grid:                             # dotted TrainConfig key -> values; the runs are the Cartesian product
      model: [tiny]
      weighting: [linear, ctwa]
      estimator: [grpo, reinforce_pp]
      seed: [0, 1]
    weighting_params:                 # an algorithm's hyperparameters, wherever it runs
      ctwa: {lambda_lr: 0.05}
    per_value:                        # any override for the runs where a grid key takes a value
      estimator:
        reinforce_pp: {loss.clip_eps_low: 100, loss.clip_eps_high: 100, loss.dual_clip: 100}
    jobs: 2                           # runs at a time, each in a worker process (default 1)

A run's config is ``base``, then its grid values, then the per-value overrides of those values
(``weighting_params: {ctwa: {k: v}}`` is short for ``per_value: {weighting: {ctwa: {weighting.k: v}}}``). Nothing else
differs between runs, so a study is a controlled comparison of its factors.

Run names: ``<model>__<weighting>__<estimator>__s<seed>``, followed by ``<key>-<value>`` for every other grid key with
more than one value (e.g. ``objectives-accuracy+clarity``); characters outside ``[A-Za-z0-9._+-]`` become ``-``. Seeds
vary slowest, so a study stopped early already holds complete comparisons for its first seeds.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moalign.config import (
    NAMED_SECTIONS,
    TrainConfig,
    set_dotted,
    load_yaml,
    parse_overrides,
    validate,
)
from moalign.errors import UserError

PRESETS = ("quick", "smol", "paper")
STUDY_KEYS = ("name", "description", "base", "grid", "weighting_params", "per_value", "jobs")
RUNS_FOLDER = "runs"


class StudySpec(BaseModel):
    """A study file's contents (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    weighting_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    per_value: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    jobs: int = Field(1, ge=1, description="runs trained at a time, each in its own worker process")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not sanitize(v):
            raise ValueError("must contain a letter or digit (it names the study directory)")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} is empty; give at least one value")
            labels = [value_label(v) for v in values]
            if len(set(labels)) != len(labels):
                raise ValueError(f"grid.{key} repeats a value ({', '.join(labels)})")
        return grid

    @field_validator("per_value", mode="before")
    @classmethod
    def _labels_as_strings(cls, per_value: Any) -> Any:
        # YAML reads `seed: {0: ...}` with an integer key; values are matched by their label, a string.
        if isinstance(per_value, dict):
            return {k: {str(v): o for v, o in (vals or {}).items()} if isinstance(vals, dict) else vals
                    for k, vals in per_value.items()}
        return per_value

    @model_validator(mode="after")
    def _overrides_name_grid_values(self) -> "StudySpec":
        for key, by_value in self.per_value.items():
            if key not in self.grid:
                raise ValueError(f"per_value.{key}: {key!r} is not a grid key (grid keys: {', '.join(self.grid)})")
            labels = {value_label(v) for v in self.grid[key]}
            unknown = sorted(set(by_value) - labels)
            if unknown:
                raise ValueError(f"per_value.{key}: {', '.join(unknown)} not among grid.{key} "
                                 f"({', '.join(sorted(labels))})")
        from moalign.weighting import WEIGHTINGS

        for name in self.weighting_params:
            WEIGHTINGS.get(name)  # an unknown algorithm name is a typo: say so now, not in the middle of a study
        return self


@dataclass(frozen=True)
class PlannedRun:
    """One run of a study: its directory name, its grid values (as labels) and its full config."""

    name: str
    factors: dict[str, str]
    config: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


# ------------------------------------------------------------------------------------------------ names


def sanitize(text: str) -> str:
    """A file-name-safe version of ``text``: ``Qwen/Qwen2.5-1.5B`` -> ``Qwen-Qwen2.5-1.5B``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip(".-")


def value_label(value: Any) -> str:
    """How a grid value is named: a list by its items joined with ``+``, a named section by its name."""
    if isinstance(value, dict):
        return str(value.get("name", sorted(value.items())))
    if isinstance(value, (list, tuple)):
        return "+".join(value_label(v) for v in value)
    return str(value)


NAMED_FACTORS = ("model", "weighting", "estimator")  # always in a run's name, varied or not


def run_name(config: TrainConfig, factors: dict[str, str], grid: dict[str, list[Any]]) -> str:
    """``<model>__<weighting>__<estimator>__s<seed>`` then ``<key>-<value>`` for the other varied grid keys."""
    parts = [config.model.name, config.weighting.name, config.estimator.name, f"s{config.seed}"]
    extra = [f"{key.rsplit('.', 1)[-1]}-{factors[key]}" for key in grid
             if key not in (*NAMED_FACTORS, "seed") and len(grid[key]) > 1]
    return "__".join(sanitize(p) for p in parts + extra)


# ------------------------------------------------------------------------------------------------ loading


def preset_path(name: str) -> Path:
    return Path(str(resources.files("moalign.study") / "presets" / f"{name}.yaml"))


def load_study_tree(config: str | Path) -> dict[str, Any]:
    """The study file's tree: ``config`` is a YAML path, or a preset name (quick, smol, paper)."""
    path = Path(config)
    if not path.is_file() and str(config) in PRESETS:
        path = preset_path(str(config))
    elif not path.is_file():
        raise UserError(f"study {config!r} is neither a YAML file nor a preset ({', '.join(PRESETS)})")
    return load_yaml(path)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Command-line ``key=value`` overrides. Keys under a study key (``grid.seed=[0]``, ``name=x``) set the study;
    any other key sets the shared base config (``steps=2`` means ``base.steps=2``)."""
    tree = copy.deepcopy(tree)
    for key, value in parse_overrides(overrides):
        if key.split(".", 1)[0] in STUDY_KEYS:
            set_dotted(tree, key, value, named_sections=set())
        else:
            tree.setdefault("base", {})
            if not isinstance(tree["base"], dict):
                raise UserError("the study's 'base' must be a mapping of TrainConfig keys")
            set_dotted(tree["base"], key, value, NAMED_SECTIONS)
    return tree


def parse_study(tree: dict[str, Any]) -> StudySpec:
    spec = validate(StudySpec, tree)
    for key in spec.grid:
        if key.split(".", 1)[0] not in TrainConfig.model_fields:
            raise UserError(f"grid key {key!r} is not a TrainConfig key; valid top-level keys: "
                            f"{', '.join(TrainConfig.model_fields)}")
    return spec


# ------------------------------------------------------------------------------------------------ expansion


def expand(spec: StudySpec, study_dir: Path) -> list[PlannedRun]:
    """Every run of the grid, seeds slowest, each with a validated config and ``run_dir`` under ``study_dir/runs``."""
    keys = sorted(spec.grid, key=lambda k: k != "seed")  # stable: other keys keep their YAML order
    runs, seen = [], {}
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        chosen = dict(zip(keys, values))
        factors = {k: value_label(v) for k, v in chosen.items()}
        config = _run_config(spec, chosen, factors)
        name = run_name(config, factors, spec.grid)
        if name in seen:
            raise UserError(f"runs {seen[name]} and {factors} would share the directory {name!r}; make their grid "
                            f"values differ after sanitizing (characters outside A-Za-z0-9._+- become '-')")
        seen[name] = factors
        config = config.model_copy(update={"run_dir": str(study_dir / RUNS_FOLDER / name)})
        runs.append(PlannedRun(name, {k: factors[k] for k in spec.grid}, config))
    return runs


def _run_config(spec: StudySpec, chosen: dict[str, Any], factors: dict[str, str]) -> TrainConfig:
    tree = copy.deepcopy(spec.base)
    for section in NAMED_SECTIONS & tree.keys():  # `model: tiny` in a file means what `model=tiny` means on the CLI
        if not isinstance(tree[section], dict):
            set_dotted(tree, section, tree[section], NAMED_SECTIONS)
    for key, value in chosen.items():
        set_dotted(tree, key, copy.deepcopy(value), NAMED_SECTIONS)
    for key, overrides in _per_value_overrides(spec, factors, tree):
        set_dotted(tree, key, copy.deepcopy(overrides), NAMED_SECTIONS)
    try:
        return validate(TrainConfig, tree)
    except UserError as exc:
        where = ", ".join(f"{k}={v}" for k, v in factors.items())
        raise UserError(f"run ({where}): {exc}") from None


def _per_value_overrides(spec: StudySpec, factors: dict[str, str], tree: dict[str, Any]):
    """(dotted key, value) pairs of the per-value overrides that apply to a run with these grid values."""
    for key, label in factors.items():
        yield from spec.per_value.get(key, {}).get(label, {}).items()
    weighting = tree.get("weighting")
    name = weighting.get("name") if isinstance(weighting, dict) else weighting
    for param, value in spec.weighting_params.get(name or "", {}).items():
        yield f"weighting.{param}", value


def load_study(config: str | Path, out_dir: str | Path | None = None,
               overrides: list[str] | None = None) -> tuple[StudySpec, Path, list[PlannedRun]]:
    """The resolved study, its directory (default ``studies/<name>``) and its runs."""
    spec = parse_study(apply_overrides(load_study_tree(config), overrides or []))
    study_dir = Path(out_dir) if out_dir is not None else Path("studies") / sanitize(spec.name)
    return spec, study_dir, expand(spec, study_dir)
