"""Typed configuration for every entry point, with YAML files and ``key=value`` overrides.

A run is fully described by one ``TrainConfig``; its resolved form is saved as ``run_dir/config.yaml`` and
``moalign train --config run_dir/config.yaml`` reproduces the run. Overrides use dotted keys
(``rollout.group_size=8``); a section that has a ``name`` can be set by name alone (``model=tiny``,
``weighting=ctwa``, ``estimator=rloo``). Values are parsed as YAML (``[0.1, 0.05]``, ``true``, ``1e-5``).

Every number must be finite: ``.inf`` and ``.nan`` are refused wherever a float is read (``Section`` and the
weightings' parameters set pydantic's ``allow_inf_nan=False``), with the key named in the error.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from moalign import bounded_yaml
from moalign.data.base import DataConfig
from moalign.errors import UserError, one_line, short_repr
from moalign.rl.loss import KL_ESTIMATORS, LOSS_AGG_MODES


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Sampling temperatures below this are refused. The policy's log-probs are those of logits/τ: at τ = 0.01 a logit
# gap of 1 is already 100 nats, sampling is argmax in effect, and the importance ratio exp(Δ log π) of a logit change
# above 0.88 overflows float32 (e^88.7). vLLM warns and clamps at the same 0.01. Argmax decoding is eval.mode=greedy.
MIN_TEMPERATURE = 0.01


def _check_temperature(v: Optional[float]) -> Optional[float]:
    if v is not None and v < MIN_TEMPERATURE:
        raise ValueError(f"must be at least {MIN_TEMPERATURE} (below it sampling is argmax in effect and the "
                         f"log-probs of logits/temperature overflow; for argmax decoding use eval.mode=greedy)")
    return v


class LoRAConfig(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class ModelConfig(Section):
    name: str = Field("smollm2-135m", description="'tiny', 'smollm2-135m' (embedded), a HF hub id or a local path")
    train_last_k_layers: Optional[int] = Field(None, ge=1, description="train only the last k transformer blocks")
    reuse_frozen_trunk: bool = Field(True, description="with train_last_k_layers: run the frozen blocks once per "
                                     "step and only the top k in the reference, update and post-update passes")
    lora: Optional[LoRAConfig] = None
    revision: Optional[str] = None
    system_prompt: Optional[str] = Field(None, description="system message before every prompt; None: the model's "
                                         "default (a one-shot answer-format example for smollm2-135m), '' for none")

    @model_validator(mode="before")
    @classmethod
    def _dtype_is_precision(cls, data):
        """``dtype``, the key before the top-level ``precision``: float32 (every saved config's) is the default
        precision; a half-precision dtype loaded the weights themselves in half precision (now ``bf16-pure``,
        rarely what is meant), so it is an error that names the new key."""
        if isinstance(data, dict) and "dtype" in data:
            if data["dtype"] != "float32":
                raise ValueError(f"model.dtype={data['dtype']} is now the top-level key precision: "
                                 f"precision=bf16-mixed (fp32 weights, bf16 compute) or precision=bf16-pure")
            data = {k: v for k, v in data.items() if k != "dtype"}
        return data


class RolloutConfig(Section):
    prompts_per_step: int = Field(4, ge=1, description="P prompts sampled per step")
    group_size: int = Field(4, ge=1, description="n completions per prompt (a group)")
    max_new_tokens: int = Field(128, ge=1)
    max_prompt_tokens: int = Field(256, ge=1, description="longer prompts are an error (never silently cut)")
    temperature: float = Field(1.0, gt=0, description=f"≥ {MIN_TEMPERATURE} (MIN_TEMPERATURE)")
    top_p: float = Field(1.0, gt=0, le=1)
    sampler: Literal["fast", "hf"] = Field("fast", description="fast: moalign's KV-cache sampler (same outputs, "
                                           "several times faster on CPU); hf: transformers' generate")
    pack_weights: bool = Field(True, description="fast sampler on CPU: multiply by packed copies of the fp32 (MKL) "
                               "or bf16 (oneDNN) weights (1.1–1.2× faster; one more copy of the linear weights "
                               "while sampling)")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        return _check_temperature(v)


class LossConfig(Section):
    clip_eps_low: float = Field(0.2, gt=0)
    clip_eps_high: float = Field(0.2, gt=0)
    dual_clip: Optional[float] = Field(3.0, gt=1, description="dual-clip constant c for A < 0 (None: off)")
    kl_coef: float = Field(0.001, ge=0, description="KL-to-reference loss coefficient (0 skips the reference)")
    kl_estimator: str = "k3"
    loss_agg: Optional[str] = Field(None, description="token-mean | seq-mean-token-sum | seq-mean-token-mean | "
                                    "seq-mean-token-sum-norm; None: the estimator's own (seq-mean-token-sum-norm "
                                    "for dr_grpo), else token-mean")
    old_logprobs: Literal["auto", "sampler", "recompute"] = Field(
        "auto", description="π_old of an update that is not exactly on-policy (several mini-batches or PPO epochs): "
        "'sampler' reuses the fast sampler's log-probs (no extra forward), 'recompute' runs a forward; 'auto': "
        "the sampler's where the fast sampler made them, else a forward")

    @field_validator("kl_estimator")
    @classmethod
    def _kl(cls, v):
        if v not in KL_ESTIMATORS:
            raise ValueError(f"must be one of {', '.join(KL_ESTIMATORS)}")
        return v

    @field_validator("loss_agg")
    @classmethod
    def _agg(cls, v):
        if v is not None and v not in LOSS_AGG_MODES:
            raise ValueError(f"must be one of {', '.join(LOSS_AGG_MODES)}")
        return v


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    mini_batches: int = Field(1, ge=1, description="optimizer steps per rollout batch (per PPO epoch)")
    ppo_epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(4, ge=1, description="sequences per forward/backward (gradient accumulation)")
    logprob_micro_batch_size: Optional[int] = Field(
        8, ge=1, description="sequences per forward without gradients (π_old, reference and post-update log-probs, "
                             "the frozen trunk): fewer, larger calls than the update's micro-batches, ≈ 10 % faster "
                             "on a CPU (docs/performance.md); None: micro_batch_size")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError("AdamW's betas must each be in [0, 1), e.g. [0.9, 0.999]")
        return v


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate on val every k steps (0: only at start and end)")
    num_prompts: Optional[int] = Field(16, ge=1, description="evaluation prompts per split (None: whole split)")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="default: rollout.max_new_tokens")
    test_at_end: bool = True
    mode: Literal["sampled", "greedy", "both"] = Field(
        "sampled", description="sampled: eval.samples completions per prompt, scored per prompt (the held-out "
        "expected reward the interference verdicts use); greedy: one argmax completion per prompt; both")
    samples: int = Field(4, ge=1, description="sampled mode: completions per prompt")
    temperature: Optional[float] = Field(None, gt=0, description="sampled mode; default: rollout.temperature")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        return _check_temperature(v)


def _closing_bracket(text: str) -> int:
    """Index of the "]" that closes the "[" at index 0 (-1 if none)."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if depth == 0:
            return i
    return -1


def split_patterns(text: str) -> list[str]:
    """``"a, b[1,2]"`` → ``["a", "b[1,2]"]``; a list's outer brackets and quotes around items are dropped."""
    text = text.strip()
    if text.startswith("[") and _closing_bracket(text) == len(text) - 1:  # "[a, b]": a list, not a pattern
        text = text[1:-1]
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [item.strip().strip("'\"") for item in items if item.strip()]


class NamedSection(BaseModel):
    """A section chosen by ``name`` whose other keys are that choice's parameters (validated against it)."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class WeightingConfig(NamedSection):
    name: str = "ctwa"
    gradient_params: Optional[list[str]] = Field(
        None, min_length=1, description="gradient-level weightings (MGDA, Nash-MTL, ...): the trainable parameters, "
        "as glob patterns over their names (e.g. 'model.layers.2[89].*'), on which the per-objective gradients are "
        "taken and combined; the others follow the same combination of the objectives. None: every trainable "
        "parameter (memory: M gradients of that size)")

    @field_validator("gradient_params", mode="before")
    @classmethod
    def _patterns(cls, v):
        # a string is one pattern or several separated by commas; "[a.[89].*, b]" is what a command-line list
        # whose glob brackets YAML could not parse arrives as (commas inside a pattern's [...] are kept)
        return split_patterns(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self):
        from moalign.weighting import WEIGHTINGS

        cls = WEIGHTINGS.get(self.name)
        if self.gradient_params is not None and cls.family != "gradient":
            raise ValueError(f"gradient_params applies to gradient-level weightings only; {self.name!r} is "
                             f"{cls.family}-level")
        extra = self.params()
        unknown = sorted(set(extra) - set(cls.Params.model_fields))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for weighting {self.name!r}; "
                             f"valid: {', '.join(sorted(cls.Params.model_fields)) or '(none)'}")
        cls.Params(**extra)
        return self


class EstimatorConfig(NamedSection):
    name: str = "grpo"

    @model_validator(mode="after")
    def _check(self):
        from moalign.rl.estimators import ESTIMATORS

        ESTIMATORS.get(self.name)
        if self.params():
            raise ValueError(f"estimator {self.name!r} takes no parameters (got {', '.join(self.params())})")
        return self


class DiagnosticsConfig(Section):
    law: bool = Field(True, description="covariance-law statistics every step (one no-grad forward after the update "
                                        "unless the weighting already needs it)")
    probe_prompts: Optional[int] = Field(None, ge=0, description="val prompts re-sampled after every update to measure "
                                         "realised changes; None: 8 on tiny, off (0) on real models")
    probe_group_size: int = Field(4, ge=1)
    warn_after: int = Field(3, ge=1, description="warn when an objective's covariance is negative this many steps")
    j_star: Optional[float] = Field(None, description="J* of the scalarized score for the μ-PL estimate; None: the "
                                    "score of an all-ones reward vector under each step's weights")


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="checkpoint every k steps (0: only at the end and on SIGINT/SIGTERM)")
    keep: int = Field(2, ge=1)


class LogConfig(Section):
    tensorboard: bool = False
    wandb: bool = False
    mlflow: bool = False
    progress: bool = True


class TrainConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objectives: list[str] = Field(default_factory=lambda: ["accuracy", "conciseness", "clarity"], min_length=1)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    steps: int = Field(8, ge=1)
    seed: int = Field(0, ge=0, lt=2**32, description="0 ≤ seed < 2^32 (numpy's range)")
    run_dir: Optional[str] = Field(None, description="default: runs/<timestamp>-<weighting>")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["fp32", "bf16-mixed", "bf16-pure"] = Field(
        "fp32", description="fp32; bf16-mixed: fp32 master weights, gradients and optimizer state, every forward, "
        "backward and the sampler in bfloat16 (engine=trl: accelerate's bf16 autocast); bf16-pure: the weights "
        "themselves in bfloat16 (updates below bf16's resolution round away: a warning says when the learning rate "
        "is that small)")
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    engine: Literal["native", "trl"] = "native"

    @field_validator("run_dir")
    @classmethod
    def _run_dir(cls, v):
        if v is not None and not v.strip():
            raise ValueError("is empty; name a directory for the run (e.g. run_dir=runs/x) or leave it out for "
                             "runs/<timestamp>-<weighting>")
        if v is not None and "\0" in v:
            raise ValueError("contains a NUL character; name a directory")
        return None if v is None else str(Path(v).expanduser())  # never a folder literally named "~"

    @field_validator("threads")
    @classmethod
    def _threads(cls, v):
        cores = os.cpu_count() or 1
        if v is not None and v > 4 * cores:  # torch starts them all: tens of thousands end in MemoryError
            raise ValueError(f"{v} is more than 4 × the {cores} cores here; torch starts that many threads and more "
                             f"than the cores only slows it down: use at most {cores}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda, cuda:N (a GPU index) or mps")
        return v

    @field_validator("objectives")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("objectives must be distinct")
        return v

    @model_validator(mode="after")
    def _estimator_loss_agg(self):
        from moalign.rl.estimators import PAIRED_LOSS_AGG

        paired = PAIRED_LOSS_AGG.get(self.estimator.name)
        if self.loss.loss_agg is None:
            self.loss.loss_agg = paired or "token-mean"
        elif paired is not None and self.loss.loss_agg != paired:
            raise ValueError(f"estimator={self.estimator.name} is defined with loss.loss_agg={paired}, got "
                             f"loss.loss_agg={self.loss.loss_agg}; drop the loss.loss_agg setting, or use "
                             f"estimator=grpo_no_std for the same advantages with {self.loss.loss_agg}")
        return self

    @model_validator(mode="after")
    def _sampler_logprobs(self):
        if self.loss.old_logprobs == "sampler" and self.rollout.sampler != "fast":
            raise ValueError("loss.old_logprobs=sampler needs rollout.sampler=fast (transformers' generate returns "
                             "no log-probs)")
        return self


# --------------------------------------------------------------------------------------------- loading


def set_dotted(tree: dict, key: str, value: Any, named_sections: set[str]) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None or not isinstance(child, dict):
            child = {} if child is None or p not in named_sections else {"name": child}
            node[p] = child
        node = child
    last = parts[-1]
    if len(parts) == 1 and last in named_sections and not isinstance(value, dict):
        old = node.get(last)
        same = isinstance(old, dict) and old.get("name") == value
        node[last] = old if same else {"name": value}  # switching algorithm/model drops the old one's parameters
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. steps=3 or weighting.lambda_lr=0.05)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"override {item!r} has an empty key")
        try:
            value = bounded_yaml.load(raw, f"override {key}") if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


NAMED_SECTIONS = {"model", "weighting", "estimator"}


def read_text_file(p: Path, what: str) -> str:
    """The UTF-8 text of file ``p`` (``what`` names it in errors: "config file")."""
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {p} cannot be read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {p} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); save it "
                        f"as UTF-8") from None


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file {p} not found")
    if not p.is_file():
        raise UserError(f"config file {p} is not a regular file; pass a YAML file")
    try:
        data = bounded_yaml.load(read_text_file(p, "config file"), f"config file {p}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file {p} is not valid YAML{where}: {one_line(getattr(exc, 'problem', exc), 200)}"
                        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of keys (got {type(data).__name__})")
    return data


def build_config(model_cls: type[BaseModel], base: dict | None = None, overrides: list[str] | None = None):
    tree = copy.deepcopy(base or {})  # set_dotted writes into nested sections: never into the caller's
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value, NAMED_SECTIONS)
    return validate(model_cls, tree)


def validate(model_cls: type[BaseModel], tree: dict):
    try:
        return model_cls.model_validate(tree)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, model_cls)) from None
    except UserError as exc:
        raise UserError(f"config error: {exc}") from None


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    cls = model_cls
    for part in loc[:-1]:
        f = getattr(cls, "model_fields", {}).get(part)
        if f is None:
            return []
        ann = f.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                cls = cand
                break
        else:
            return []
    return sorted(getattr(cls, "model_fields", {}))


def format_validation_error(exc: ValidationError, model_cls: type[BaseModel]) -> str:
    msgs = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model_cls, tuple(err["loc"]))
            msgs.append(f"unknown key {where!r}; valid keys here: {', '.join(valid)}")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {short_repr(got)})"
            msg = one_line(err["msg"].removeprefix("Value error, "), 300)
            msgs.append(f"{one_line(where, 100)}: {msg}{got_s}")
    return one_line("config error: " + "; ".join(msgs))


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
