"""Prompt encoding and held-out evaluation shared by the native engine and the TRL integration.

An evaluation runs the first ``eval.num_prompts`` prompts of a split in one or both modes (``eval.mode``):

* ``sampled``: ``eval.samples`` completions per prompt at ``eval.temperature`` (default: the rollout's) and the
  rollout's top_p; a prompt's score is the mean reward of its completions, an estimate of the policy's expected
  reward J(x) on it: the quantity of the paper's covariance law and μ-PL analysis, and the one the interference
  verdicts use (docs/statistics.md).
* ``greedy``: one argmax completion per prompt (what the paper's tables report for large models).

**Common random numbers.** A sampled evaluation draws completion k of prompt i with its own uniforms
``eval_uniforms(seed, split, ...)[i, k]`` (one per generated position, from a ``torch.Generator`` seeded by the
run's seed and the split), the same at every evaluation of the run: the start and the end differ by the policy,
not by the draw. The fast sampler (``rollout.sampler=fast``) uses them token by token, whatever the other sequences
of the batch do (``engine.sampler``); transformers' ``generate`` (``rollout.sampler=hf``) cannot take them and
instead samples from torch's global RNG reseeded with the same seed inside ``torch.random.fork_rng``, which
repeats the draws only while every sequence of the batch takes the same path. Neither disturbs the training RNG.

Objectives are scored *without* ``observe``: training-time state such as conciseness's running mean length is never
changed by an evaluation. Metric names (``<mode>`` = sampled | greedy)::

    eval/<split>/<mode>/<objective>/mean          mean over prompts of the per-prompt scores
    eval/<split>/<mode>/<objective>/per_prompt    [N] per-prompt score (mean over its completions; null: all missing)
    eval/<split>/sampled/<objective>/per_sample   [N][K] each completion's reward (null: missing)
    eval/<split>/<mode>/<objective>/missing       completions whose scoring failed
    eval/<split>/<mode>/response_tokens           mean completion length in tokens
    eval/<split>/<mode>/completions, tokens, seconds   the evaluation's cost: completions, generated tokens, wall s
    eval/<split>/<mode>/sample_text               the first completion (500 characters)

and, on the start evaluation's line, ``scalarization/<objective>``: the fixed scalarization the verdicts score on,
the weighting's initial weights λ0 normalised to sum 1 (``fixed_scalarization``).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Optional, Sequence

import torch

from moalign.engine.rollout import generate as hf_generate
from moalign.engine.sampler import fast_generate
from moalign.errors import UserError
from moalign.models import chat_messages
from moalign.objectives import Objective, ScoringBatch

Mode = Literal["sampled", "greedy"]
MODES: tuple[Mode, ...] = ("sampled", "greedy")
# Sequences decoded together by an evaluation: on SmolLM2 on 2 CPU cores, 128 sampled completions take 34 s in
# batches of 64 and 63 s in batches of 16 (a decode step's cost grows far slower than its rows).
EVAL_BATCH = 64


def encode_prompts(tokenizer: Any, split: str, examples: Sequence[Any], limit: int,
                   system_prompt: Optional[str]) -> list[list[int]]:
    """Chat-template token ids of each prompt; a prompt over ``limit`` tokens is an error (never silently cut)."""
    out = []
    for i, ex in enumerate(examples):
        text = tokenizer.apply_chat_template(chat_messages(ex.prompt, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            raise UserError(f"{split} prompt {i} (id {ex.id}) has {len(ids)} tokens > rollout.max_prompt_tokens="
                            f"{limit}; raise rollout.max_prompt_tokens or drop long prompts")
        out.append(ids)
    return out


def score_batch(objectives: Sequence[Objective], batch: ScoringBatch, observe: bool) -> tuple[torch.Tensor, list[str]]:
    """Rewards [B, M] (NaN = missing) and the failed samples' messages; ``observe`` only on training batches."""
    cols, errors = [], []
    for obj in objectives:
        if observe:
            obj.observe(batch)
        res = obj.score(batch)
        cols.append(res.values)
        errors.extend(res.errors)
    return torch.stack(cols, 1), errors


@dataclass(frozen=True)
class EvalSettings:
    """How a run evaluates (from ``TrainConfig``: ``EvalSettings.from_config``)."""

    modes: tuple[Mode, ...]
    samples: int
    temperature: float
    top_p: float
    num_prompts: Optional[int]
    max_new_tokens: int
    batch_size: int
    sampler: Literal["fast", "hf"]
    pack_weights: bool
    seed: int  # the run's seed: the sampled evaluations' random stream

    @classmethod
    def from_config(cls, cfg: Any) -> "EvalSettings":
        e, r = cfg.eval, cfg.rollout
        modes = MODES if e.mode == "both" else (e.mode,)
        return cls(modes, e.samples, e.temperature or r.temperature, r.top_p, e.num_prompts,
                   e.max_new_tokens or r.max_new_tokens, max(cfg.optim.micro_batch_size, EVAL_BATCH), r.sampler,
                   r.pack_weights, cfg.seed)


def stream_seed(seed: int, split: str) -> int:
    """The seed of a run's evaluation stream on ``split`` (one per run and split, apart from the training RNG)."""
    return seed * 1_000_003 + zlib.crc32(split.encode())


def eval_uniforms(seed: int, split: str, num_prompts: int, samples: int, max_new_tokens: int) -> torch.Tensor:
    """The sampled evaluation's draws [num_prompts · samples, max_new_tokens]: row i·K + k is completion k of prompt
    i. Drawn prompt by prompt from one generator, so a prompt's rows depend on the seed, the split, K and the token
    budget only (not on how many prompts are evaluated)."""
    generator = torch.Generator().manual_seed(stream_seed(seed, split))
    return torch.rand((num_prompts * samples, max_new_tokens), generator=generator)


def fixed_scalarization(objective_names: Sequence[str], initial_weights: torch.Tensor) -> dict[str, float]:
    """``scalarization/<objective>``: the initial weights λ0 normalised to sum 1 (uniform when they sum to ≤ 0)."""
    weights = initial_weights.double().clamp(min=0)
    total = float(weights.sum())
    weights = weights / total if total > 0 else torch.full_like(weights, 1.0 / len(weights))
    return {f"scalarization/{name}": float(w) for name, w in zip(objective_names, weights)}


def _completions(model: Any, tokenizer: Any, prompt_ids: list[list[int]], mode: Mode, settings: EvalSettings,
                 split: str):
    n, k = len(prompt_ids), settings.samples if mode == "sampled" else 1
    prompts = [p for p in prompt_ids for _ in range(k)]
    index = [i for i in range(n) for _ in range(k)]
    common = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                  greedy=mode == "greedy", batch_size=settings.batch_size)
    if settings.sampler == "fast":
        uniforms = (eval_uniforms(settings.seed, split, n, k, settings.max_new_tokens) if mode == "sampled"
                    else None)
        generate = partial(fast_generate, pack_weights=settings.pack_weights, uniforms=uniforms)
        return generate(model, tokenizer, prompts, index, index, **common)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(stream_seed(settings.seed, split))
        return hf_generate(model, tokenizer, prompts, index, index, **common)


@torch.no_grad()
def evaluate_mode(model: Any, tokenizer: Any, objectives: Sequence[Objective], split: str, examples: Sequence[Any],
                  prompt_ids: Sequence[list[int]], mode: Mode, settings: EvalSettings) -> dict[str, Any]:
    """One mode's evaluation of the first ``settings.num_prompts`` prompts of ``split`` (metric names above)."""
    n = len(examples) if settings.num_prompts is None else min(settings.num_prompts, len(examples))
    if n == 0:
        return {}
    k = settings.samples if mode == "sampled" else 1
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    rollout = _completions(model, tokenizer, list(prompt_ids[:n]), mode, settings, split)
    model.train(was_training)
    answers = [examples[i].answer for i in rollout.example_index]
    batch = ScoringBatch.from_lists([examples[i].prompt for i in rollout.example_index], rollout.texts, answers,
                                    rollout.num_tokens)
    rewards, _ = score_batch(objectives, batch, observe=False)
    seconds = time.perf_counter() - start
    prefix = f"eval/{split}/{mode}"
    out: dict[str, Any] = {}
    for j, objective in enumerate(objectives):
        per_sample = rewards[:, j].double().view(n, k)
        observed = ~torch.isnan(per_sample)
        counts = observed.sum(1)
        per_prompt = torch.where(counts > 0, torch.nan_to_num(per_sample).sum(1) / counts.clamp(min=1), math.nan)
        out[f"{prefix}/{objective.name}/mean"] = float(per_prompt.nanmean()) if (counts > 0).any() else math.nan
        out[f"{prefix}/{objective.name}/per_prompt"] = _with_nulls(per_prompt.tolist())
        if mode == "sampled":
            out[f"{prefix}/{objective.name}/per_sample"] = [_with_nulls(row) for row in per_sample.tolist()]
        out[f"{prefix}/{objective.name}/missing"] = int((~observed).sum())
    tokens = sum(rollout.num_tokens)
    out[f"{prefix}/response_tokens"] = tokens / len(rollout)
    out[f"{prefix}/completions"] = len(rollout)
    out[f"{prefix}/tokens"] = tokens
    out[f"{prefix}/seconds"] = seconds
    out[f"{prefix}/sample_text"] = rollout.texts[0][:500]
    return out


def evaluate_split(model: Any, tokenizer: Any, objectives: Sequence[Objective], split: str, examples: Sequence[Any],
                   prompt_ids: Sequence[list[int]], settings: EvalSettings) -> dict[str, Any]:
    """Every mode of ``settings`` on ``split``."""
    out: dict[str, Any] = {}
    for mode in settings.modes:
        out.update(evaluate_mode(model, tokenizer, objectives, split, examples, prompt_ids, mode, settings))
    return out


def _with_nulls(values: list[float]) -> list[Optional[float]]:
    return [None if math.isnan(v) else v for v in values]


def eval_change_table(records: list[dict[str, Any]], objectives: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{split: {mode: {objective: {start, end, change}}}}`` from the first and last evaluation of each split and
    mode (point values; ``diagnostics.interference`` gives the intervals)."""
    table: dict[str, dict[str, Any]] = {}
    for split in ("val", "test"):
        for mode in MODES:
            prefix = f"eval/{split}/{mode}/"
            lines = [r for r in records if any(k.startswith(prefix) for k in r)]
            rows = {}
            for name in objectives:
                key = f"{prefix}{name}/mean"
                if lines and lines[0].get(key) is not None and lines[-1].get(key) is not None:
                    rows[name] = {"start": lines[0][key], "end": lines[-1][key],
                                  "change": lines[-1][key] - lines[0][key]}
            if rows:
                table.setdefault(split, {})[mode] = rows
    return table
