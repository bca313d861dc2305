"""The ``tiny`` model: a ≈0.4M-parameter Llama built and warmed up locally in well under a minute on a CPU, so
that multi-objective RL shows real dynamics within seconds.

Recipe (``TinyRecipe``):

1. **Tokenizer.** Byte-level BPE trained with ``tokenizers`` on arithmetic word problems and warm-up answers.
   Digit runs are kept apart from words (so a number is one or a few tokens), but merges may cross spaces: the
   fixed instruction suffix and the story phrases become a few tokens each, which shortens prompts ≈ 4× and
   makes the warm-up ≈ 2.5× faster. Special tokens ``<|pad|>``, ``<|eos|>``; chat template ``"Q: {prompt}\\nA:"``.
2. **Warm-up.** One epoch of next-token loss on the answer tokens only, over arithmetic problems of
   difficulty 1–2 from the generator's *train* split (which never contains a val/test question of any seed;
   see ``moalign.data.arithmetic``). Each answer gets a random style:

   - step by step (probability 0.45): ``Step 1: 3 + 5 = 8`` … then ``Step k: The answer is \\boxed{8}.``
     (boxed with probability 0.75, else ``The answer is 8.``);
   - short (0.55): ``\\boxed{8}`` / ``The answer is \\boxed{8}.`` (together 0.5) or ``The answer is 8.``;
   - wrong: the last step's result (hence the answer) is off by a small amount with probability 0.15 in
     step-by-step answers and 0.3 in short ones — working step by step is more accurate, as with real models.

   Sampled at temperature 1 on difficulty-1 test problems the model then gives every mix (measured over
   seeds: 30–40% correct, 65–70% boxed, 35–50% step by step; greedy decoding gets 85–95% of the final
   numbers right). Difficulty 2 is harder for it (≈ 10% correct when sampled).
   The paper's three objectives are all non-trivial and partly conflicting: clarity (box + ≥ 2 enumerated
   steps) and accuracy favour step-by-step answers, conciseness favours short ones.

The result is cached under ``<cache>/tiny-<hash>``, the hash covering the recipe, the seed and the source of
this module and of the problem generator (any change to either rebuilds). The folder is written under a
temporary name and renamed, so a crash never leaves a half-written cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

import moalign.data.arithmetic as arithmetic
from moalign.data.arithmetic import ArithmeticProblem, generate_problems, solution_steps
from moalign.data.base import DEFAULT_PROMPT_SUFFIX
from moalign.models.cache import cache_root, fixed_threads, save_built_model

PAD, EOS = "<|pad|>", "<|eos|>"
# "Q: {user}\n" per user turn, "A: {assistant}<|eos|>\n" per assistant turn; the generation prompt is "A:".
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ 'A: ' + message['content'] + '" + EOS + "\\n' }}"
    "{%- else %}{{ message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'A:' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the built model (part of the cache key)."""

    vocab_size: int = 1024
    hidden_size: int = 96
    intermediate_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 384
    max_new_tokens: int = 64  # default generation length
    # warm-up data: (difficulty, number of problems); one epoch
    warmup_problems: tuple[tuple[int, int], ...] = ((1, 17_000), (2, 5_000))
    batch_size: int = 32
    lr: float = 5e-3
    lr_warmup_steps: int = 20
    final_lr_fraction: float = 0.05
    # answer styles
    p_step_by_step: float = 0.45
    p_boxed_step_by_step: float = 0.75
    p_boxed_short: float = 0.5
    p_wrong_step_by_step: float = 0.15
    p_wrong_short: float = 0.3
    # torch threads of the build, whatever the caller's (models.cache.fixed_threads): 1, the count the published
    # tiny results were made with
    threads: int = 1


def load_tiny(cache_dir: Path | None = None, seed: int = 0, progress: bool = True,
              recipe: TinyRecipe = TinyRecipe()) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The tiny model and its tokenizer, built and cached on first use (≈ 30–60 s on a CPU), then loaded from
    ``cache_dir`` (default ``$MOALIGN_CACHE`` or ``~/.cache/moalign``) in about a second."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / f"tiny-{recipe_hash(recipe, seed)}"
    if not folder.is_dir():
        save_built_model(folder, lambda: build_tiny(recipe, seed, progress))
    return LlamaForCausalLM.from_pretrained(folder), PreTrainedTokenizerFast.from_pretrained(folder)


def recipe_hash(recipe: TinyRecipe, seed: int) -> str:
    """Short hash of the recipe, the seed and the code that turns them into a model."""
    h = hashlib.sha256(json.dumps([dataclasses.asdict(recipe), seed]).encode())
    for module_file in (__file__, arithmetic.__file__):
        h.update(Path(module_file).read_bytes())
    return h.hexdigest()[:10]


def build_tiny(recipe: TinyRecipe, seed: int, progress: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build the tokenizer and model and run the warm-up (no caching). The caller's RNG state is untouched."""
    rng = random.Random(seed)
    problems = [p for difficulty, n in recipe.warmup_problems
                for p in generate_problems(difficulty, n, seed, "train")]
    rng.shuffle(problems)
    questions = [p.question + DEFAULT_PROMPT_SUFFIX for p in problems]
    answers = [warmup_answer(p, rng, recipe) for p in problems]
    tokenizer = train_tokenizer(questions + answers, recipe.vocab_size)
    with torch.random.fork_rng(devices=[]), fixed_threads(recipe.threads):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_config(recipe, tokenizer))
        warm_up(model, tokenizer, questions, answers, recipe, progress)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id,
                                               max_new_tokens=recipe.max_new_tokens)
    return model.eval(), tokenizer


# ---- warm-up answers ----------------------------------------------------------------------------------------

def warmup_answer(problem: ArithmeticProblem, rng: random.Random, recipe: TinyRecipe) -> str:
    """One answer in a random style (see the module docstring)."""
    step_by_step = rng.random() < recipe.p_step_by_step
    p_wrong = recipe.p_wrong_step_by_step if step_by_step else recipe.p_wrong_short
    steps = solution_steps(problem)
    answer = problem.answer
    if rng.random() < p_wrong:  # a slip in the last computation, carried to the final answer
        answer = _wrong_number(answer, rng)
        steps[-1] = steps[-1].rsplit("= ", 1)[0] + f"= {answer}"
    if step_by_step:
        boxed = rng.random() < recipe.p_boxed_step_by_step
        final = f"The answer is \\boxed{{{answer}}}." if boxed else f"The answer is {answer}."
        return "\n".join(f"Step {i}: {line}" for i, line in enumerate([*steps, final], start=1))
    if rng.random() < recipe.p_boxed_short:
        return rng.choice([f"\\boxed{{{answer}}}", f"The answer is \\boxed{{{answer}}}."])
    return f"The answer is {answer}."


def _wrong_number(answer: int, rng: random.Random) -> int:
    candidates = [answer + d for d in (-3, -2, -1, 1, 2, 3, 10) if answer + d >= 0]
    return rng.choice(candidates)


# ---- tokenizer and model ------------------------------------------------------------------------------------

def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over ``corpus``; digit runs are separate pre-tokens, other merges may cross spaces."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(recipe: TinyRecipe, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# ---- warm-up ------------------------------------------------------------------------------------------------

def chat_prompt(tokenizer: PreTrainedTokenizerFast, user_text: str) -> str:
    """The text the model continues: the chat template around one user message, with the generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                         tokenize=False)


def warm_up(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, questions: list[str], answers: list[str],
            recipe: TinyRecipe, progress: bool) -> None:
    """One epoch of AdamW on −Σ log π(answer tokens | chat prompt), linear LR warm-up then linear decay.

    Prompt and answer are tokenized separately, exactly as the RL engine sees them: it tokenizes the chat
    prompt and the model continues it with ``" " + answer + <|eos|>``."""
    sentinel = "\x00"
    before, after = chat_prompt(tokenizer, sentinel).split(sentinel)  # the template's text around the prompt
    prompt_ids = tokenizer([before + q + after for q in questions], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([" " + a for a in answers], add_special_tokens=False)["input_ids"]
    examples = [(p, a + [tokenizer.eos_token_id]) for p, a in zip(prompt_ids, answer_ids)]

    num_steps = len(examples) // recipe.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, num_steps, recipe))
    model.train()
    bar = tqdm(range(num_steps), desc="warming up the tiny model (once)", disable=not progress, leave=False)
    for step in bar:
        batch = examples[step * recipe.batch_size:(step + 1) * recipe.batch_size]
        loss = model(**_collate(batch, tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def lr_factor(step: int, num_steps: int, recipe: TinyRecipe) -> float:
    """Linear warm-up to 1 over ``lr_warmup_steps`` times linear decay to ``final_lr_fraction`` at the end."""
    warmup = min(1.0, (step + 1) / recipe.lr_warmup_steps)
    return warmup * max(recipe.final_lr_fraction, 1 - step / num_steps)


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that are −100 (ignored) except on answer tokens."""
    width = max(len(p) + len(a) for p, a in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    for i, (prompt, answer) in enumerate(batch):
        n = len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer)
        attention_mask[i, :n] = 1
        labels[i, len(prompt):n] = torch.tensor(answer)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
