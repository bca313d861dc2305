"""The ``smollm2-135m-sft`` starting point: the embedded SmolLM2-135M-Instruct after a short supervised pass on the
arithmetic task's answer format.

The ``smol`` study starts from it rather than from the model as shipped: whether objectives interfere depends on where
training starts (METHOD §8: the constants of the model's geometry), and as shipped the model follows the answer format
only when prompted with an example (moalign's default SmolLM2 system message) and often runs to the token limit; after
this pass it answers in the format all three objectives reward, with the chat template's own system message (the one the
pass trains with).

Recipe (``SFTRecipe``): arithmetic problems of difficulty 1 and 2 from the generator's *train* split (which never
contains a val or test question, see ``moalign.data.arithmetic``), each answered correctly, step by step and boxed::

    Step 1: 7 + 5 = 12
    Step 2: 12 - 3 = 9
    Step 3: The answer is \\boxed{9}.

then one epoch of AdamW on −Σ log π(answer tokens | chat prompt) with a linear warm-up and decay — the loop that
warms up the ``tiny`` model (``moalign.models.tiny.warm_up``): 8 steps of 8 sequences on 2 torch threads whatever the
caller's setting (``SFTRecipe.threads``: the result depends on the count), under a minute on 2 idle CPU cores, once.

The result is cached under ``<cache>/smollm2-135m-sft-<hash>`` (the hash covers the recipe and the source of this
module and of the problem generator), written under a temporary name and renamed so that a crash never leaves a
half-written model. ``moalign.models.load_model`` maps the model name ``smollm2-135m-sft`` to
``sft_model_path()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

import moalign.data.arithmetic as arithmetic
from moalign.data.arithmetic import ArithmeticProblem, generate_problems, solution_steps
from moalign.data.base import DEFAULT_PROMPT_SUFFIX
from moalign.models.cache import cache_root, fixed_threads, save_built_model

SFT_MODEL_NAME = "smollm2-135m-sft"


@dataclass(frozen=True)
class SFTRecipe:
    """Everything that determines the fine-tuned model (part of the cache key)."""

    problems: tuple[tuple[int, int], ...] = ((1, 32), (2, 32))  # (difficulty, number of problems): 8 steps
    batch_size: int = 8
    lr: float = 5e-5
    lr_warmup_steps: int = 2
    final_lr_fraction: float = 0.1
    seed: int = 0
    # torch threads of the pass, whatever the caller's (models.cache.fixed_threads): 2, the count the published
    # smol results were made with
    threads: int = 2


def sft_answer(problem: ArithmeticProblem) -> str:
    """The target answer: every computation as a numbered step, then the boxed result as the last step."""
    lines = [*solution_steps(problem), f"The answer is \\boxed{{{problem.answer}}}."]
    return "\n".join(f"Step {i}: {line}" for i, line in enumerate(lines, start=1))


def sft_examples(recipe: SFTRecipe) -> tuple[list[str], list[str]]:
    """(prompts, answers) of the supervised pass, shuffled with the recipe's seed."""
    problems = [p for difficulty, n in recipe.problems
                for p in generate_problems(difficulty, n, recipe.seed, "train")]
    random.Random(recipe.seed).shuffle(problems)
    return [p.question + DEFAULT_PROMPT_SUFFIX for p in problems], [sft_answer(p) for p in problems]


def recipe_hash(recipe: SFTRecipe) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(recipe)).encode())
    for module_file in (__file__, arithmetic.__file__):
        h.update(Path(module_file).read_bytes())
    return h.hexdigest()[:10]


def sft_model_path(recipe: SFTRecipe = SFTRecipe(), progress: bool = True) -> Path:
    """The cached fine-tuned model's folder (a Hugging Face model + tokenizer), built on first use."""
    folder = cache_root() / f"{SFT_MODEL_NAME}-{recipe_hash(recipe)}"
    if not (folder / "config.json").is_file():
        save_built_model(folder, lambda: fine_tune(recipe, progress))
    return folder


def fine_tune(recipe: SFTRecipe, progress: bool = True):
    """SmolLM2-135M-Instruct after the supervised pass (no caching). The caller's RNG state is untouched."""
    from moalign.models.smollm2 import load_smollm2
    from moalign.models.tiny import warm_up

    model, tokenizer = load_smollm2(torch.float32)
    prompts, answers = sft_examples(recipe)
    with torch.random.fork_rng(devices=[]), fixed_threads(recipe.threads):
        torch.manual_seed(recipe.seed)
        warm_up(model, tokenizer, prompts, answers, recipe, progress=progress)
    return model.eval(), tokenizer
