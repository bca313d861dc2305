"""Prompt encoding and held-out evaluation shared by the native engine and the TRL integration.

Evaluation is greedy, scores every objective *without* ``observe`` (so training-time objective state such as
conciseness's running mean is never changed by it) and reports, per split and objective,
``eval/<split>/<objective>/mean``, ``.../per_prompt`` (for bootstrap intervals) and ``.../missing``."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence

import torch

from moalign.errors import UserError
from moalign.models import chat_messages
from moalign.objectives import Objective, ScoringBatch


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


@torch.no_grad()
def evaluate_split(model: Any, tokenizer: Any, generate: Callable[..., Any], objectives: Sequence[Objective],
                   split: str, examples: Sequence[Any], prompt_ids: Sequence[list[int]], num_prompts: Optional[int],
                   max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Greedy completions of the first ``num_prompts`` prompts of ``split``, scored by every objective."""
    n = len(examples) if num_prompts is None else min(num_prompts, len(examples))
    if n == 0:
        return {}
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    rollout = generate(model, tokenizer, list(prompt_ids[:n]), list(range(n)), list(range(n)), max_new_tokens,
                       greedy=True, batch_size=batch_size)
    model.train(was_training)
    batch = ScoringBatch.from_lists([ex.prompt for ex in examples[:n]], rollout.texts,
                                    [ex.answer for ex in examples[:n]], rollout.num_tokens)
    rewards, _ = score_batch(objectives, batch, observe=False)
    out: dict[str, Any] = {}
    for j, objective in enumerate(objectives):
        values = rewards[:, j]
        observed = ~torch.isnan(values)
        prefix = f"eval/{split}/{objective.name}"
        out[f"{prefix}/mean"] = float(values[observed].mean()) if observed.any() else float("nan")
        out[f"{prefix}/per_prompt"] = [None if math.isnan(v) else v for v in values.tolist()]
        out[f"{prefix}/missing"] = int((~observed).sum())
    out[f"eval/{split}/length/mean"] = sum(rollout.num_tokens) / n
    out[f"eval/{split}/seconds"] = time.perf_counter() - start
    out[f"eval/{split}/sample_text"] = rollout.texts[0][:500]
    return out


def eval_change_table(records: list[dict[str, Any]], objectives: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{split: {objective: {start, end, change}}}`` from the first and last evaluation records of each split."""
    table = {}
    for split in ("val", "test"):
        lines = [r for r in records if any(k.startswith(f"eval/{split}/") for k in r)]
        rows = {}
        for name in objectives:
            key = f"eval/{split}/{name}/mean"
            if lines and lines[0].get(key) is not None and lines[-1].get(key) is not None:
                rows[name] = {"start": lines[0][key], "end": lines[-1][key], "change": lines[-1][key] - lines[0][key]}
        if rows:
            table[split] = rows
    return table
