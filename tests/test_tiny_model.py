"""The tiny model: build, cache, reload, chat template, and the mix of answer styles it samples."""

from __future__ import annotations

import random
import re
import time
from collections import Counter

import pytest
import torch

import moalign.models.tiny as tiny
from moalign.data import DEFAULT_PROMPT_SUFFIX, generate_problems
from moalign.errors import UserError
from moalign.models.tiny import (
    EOS,
    TinyRecipe,
    chat_prompt,
    load_tiny,
    recipe_hash,
    warmup_answer,
)

torch.set_num_threads(1)

BOXED = re.compile(r"\\boxed\{([^}]*)\}")
STEP_LINE = re.compile(r"^\s*Step (\d+): ", re.MULTILINE)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build once into a fresh cache; also record whether the build disturbed the caller's torch RNG."""
    cache = tmp_path_factory.mktemp("cache")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    model, tokenizer = load_tiny(cache, seed=0, progress=False)
    rng_untouched = torch.equal(state, torch.random.get_rng_state())
    return cache, model, tokenizer, rng_untouched


def _encode(tokenizer, questions):
    tokenizer.padding_side = "left"
    texts = [chat_prompt(tokenizer, q + DEFAULT_PROMPT_SUFFIX) for q in questions]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_build_writes_one_complete_cache_folder(built):
    cache, _, _, rng_untouched = built
    entries = sorted(p.name for p in cache.iterdir())
    assert entries == [f"tiny-{recipe_hash(TinyRecipe(), 0)}"]  # no temporary build folder left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (cache / entries[0]).iterdir()}
    assert rng_untouched


def test_second_load_comes_from_the_cache_with_identical_weights(built, monkeypatch):
    cache, model, tokenizer, _ = built
    monkeypatch.setattr(tiny, "build_tiny", lambda *a, **k: pytest.fail("rebuilt instead of loading the cache"))
    start = time.perf_counter()
    again, tokenizer_again = load_tiny(cache, seed=0, progress=False)
    assert time.perf_counter() - start < 5.0  # ≈ 0.1 s; generous for a loaded test machine
    reference = model.state_dict()
    assert all(torch.equal(reference[name], value) for name, value in again.state_dict().items())
    assert tokenizer_again.get_vocab() == tokenizer.get_vocab()
    assert tokenizer_again.chat_template == tokenizer.chat_template


def test_cache_key_depends_on_recipe_and_seed():
    assert recipe_hash(TinyRecipe(), 0) == recipe_hash(TinyRecipe(), 0)
    assert recipe_hash(TinyRecipe(), 0) != recipe_hash(TinyRecipe(), 1)
    assert recipe_hash(TinyRecipe(), 0) != recipe_hash(TinyRecipe(lr=1e-3), 0)


def test_a_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tiny, "build_tiny", crash)
    with pytest.raises(RuntimeError, match="mid-build"):
        load_tiny(tmp_path, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_chat_template(built):
    _, _, tokenizer, _ = built
    prompt = "Tom has 3 apples and buys 5 more. How many apples does he have now?"
    assert chat_prompt(tokenizer, prompt) == "Q: " + prompt + "\nA:"
    dialogue = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "\\boxed{2}"}]
    assert tokenizer.apply_chat_template(dialogue, tokenize=False) == "Q: 1 + 1?\nA: \\boxed{2}" + EOS + "\n"
    assert tokenizer.eos_token == EOS and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


def test_model_shape_and_generation_config(built):
    _, model, tokenizer, _ = built
    assert 200_000 < model.num_parameters() < 1_000_000
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_greedy_generation_ends_with_eos_and_mostly_solves_easy_problems(built):
    _, model, tokenizer, _ = built
    problems = generate_problems(1, 16, seed=0, split="test")
    inputs = _encode(tokenizer, [p.question for p in problems])
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=64)
    completions = out[:, inputs["input_ids"].shape[1]:]
    assert all(tokenizer.eos_token_id in row.tolist() for row in completions)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    final_numbers = [re.findall(r"\d+", text)[-1:] for text in texts]
    correct = sum(nums == [str(p.answer)] for nums, p in zip(final_numbers, problems))
    assert correct >= 8, texts  # the warm-up taught it to add and subtract (≈ 90% greedy)


def test_sampling_at_temperature_one_mixes_styles(built):
    """The point of the warm-up: every objective is non-trivial when sampling (neither ≈ 0 nor ≈ 1)."""
    _, model, tokenizer, _ = built
    problems = generate_problems(1, 32, seed=1, split="test")
    inputs = _encode(tokenizer, [p.question for p in problems])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=64)
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    boxed = [BOXED.findall(t) for t in texts]
    with_steps = [len(STEP_LINE.findall(t)) >= 2 for t in texts]
    correct = [bool(b) and b[-1] == str(p.answer) for b, p in zip(boxed, problems)]
    clear = [bool(b) and s for b, s in zip(boxed, with_steps)]
    for name, flags in [("boxed", [bool(b) for b in boxed]), ("step by step", with_steps),
                        ("correct", correct), ("boxed with steps", clear)]:
        rate = sum(flags) / len(flags)
        assert 0.1 <= rate <= 0.9, (name, rate, texts)


def test_warmup_answers_follow_the_recipe_rates():
    recipe = TinyRecipe()
    problem = generate_problems(2, 1, seed=0, split="train")[0]  # two steps
    right = str(problem.answer)
    rng = random.Random(0)
    counts = Counter()
    n = 4000
    for _ in range(n):
        answer = warmup_answer(problem, rng, recipe)
        steps = STEP_LINE.findall(answer)
        final = re.findall(r"\d+", answer)[-1]
        style = "steps" if steps else "short"
        counts[style] += 1
        counts[style, "boxed"] += "\\boxed{" in answer
        counts[style, "wrong"] += final != right
        if steps:
            assert steps == ["1", "2", "3"] and answer.startswith(f"Step 1: {problem.steps[0]}")
    assert counts["steps"] / n == pytest.approx(recipe.p_step_by_step, abs=0.03)
    for style, p_boxed, p_wrong in [("steps", recipe.p_boxed_step_by_step, recipe.p_wrong_step_by_step),
                                    ("short", recipe.p_boxed_short, recipe.p_wrong_short)]:
        assert counts[style, "boxed"] / counts[style] == pytest.approx(p_boxed, abs=0.04)
        assert counts[style, "wrong"] / counts[style] == pytest.approx(p_wrong, abs=0.04)


def test_an_unwritable_cache_is_a_user_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(UserError, match="MOALIGN_CACHE"):
        load_tiny(blocker / "cache", seed=0, progress=False)


@pytest.mark.parametrize("caller_threads", [1, 2])
def test_builds_run_on_their_recipes_thread_count_whatever_the_callers(monkeypatch, caller_threads):
    """Float sums round differently on 1 and 2 threads, and over a warm-up the rounding changes the model (the tiny
    model built on 2 threads differs from the 1-thread one by up to 0.36 in a weight): each build pins its count."""
    import moalign.models.smollm2 as smollm2
    from moalign.models.sft import SFTRecipe, fine_tune

    seen = []

    def record(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop after recording")

    monkeypatch.setattr(tiny, "warm_up", record)
    monkeypatch.setattr(smollm2, "load_smollm2", lambda dtype: (None, None))
    torch.set_num_threads(caller_threads)
    try:
        with pytest.raises(RuntimeError, match="recording"):
            tiny.build_tiny(TinyRecipe(warmup_problems=((1, 50),)), 0, progress=False)
        assert torch.get_num_threads() == caller_threads  # restored after the build
        with pytest.raises(RuntimeError, match="recording"):
            fine_tune(SFTRecipe(), progress=False)
        assert torch.get_num_threads() == caller_threads
    finally:
        torch.set_num_threads(1)
    assert seen == [TinyRecipe().threads, SFTRecipe().threads] == [1, 2]
