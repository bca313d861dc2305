"""Rollout throughput: ``fast_generate`` (moalign.engine.sampler) vs ``model.generate`` (moalign.engine.rollout).

Both sample with the same settings (temperature 1, top_k 0, top_p 1) from the same prompts, arithmetic problems of
the default data config in the model's chat template, ``prompts × samples`` per batch, each response stopping at its
own EOS or at ``--max-new-tokens``. The two are timed alternately in one process (the machine is shared, so only
their ratio is meaningful); throughput is generated tokens (through EOS) per second, summed over the repeats.

The greedy check decodes 16 distinct prompts greedily with both and compares the token ids; being the same tokens,
its time ratio is an exact like-for-like speedup.

    python bench/rollout.py                      # SmolLM2-135M and tiny, batches 4×4 and 8×8, 2 repeats
    python bench/rollout.py --models tiny --shapes 4x4 --repeats 1 --max-new-tokens 32   # quick look
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from _common import matmul_peak_gflops, report, set_threads, timed

from moalign.config import ModelConfig
from moalign.data import DataConfig, load_data
from moalign.engine.rollout import generate
from moalign.engine.sampler import fast_generate
from moalign.models.loading import load_model

MODEL_NAMES = {"smollm2": "smollm2-135m", "tiny": "tiny"}
SAMPLERS = {"generate": generate, "fast": fast_generate}


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first ``n`` training prompts, as the trainer encodes them."""
    out = []
    for example in load_data(DataConfig()).train[:n]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def flops_per_token(model) -> float:
    """2 × the weights a decode step multiplies by (the input embedding is a lookup unless tied to the LM head)."""
    params = sum(p.numel() for p in model.parameters())
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return 2.0 * (params if tied else params - model.get_input_embeddings().weight.numel())


def compare_sampling(model, tokenizer, prompts: list[list[int]], samples: int, max_new_tokens: int, repeats: int,
                     seed: int) -> dict[str, dict[str, float]]:
    """Tokens, seconds, responses and truncations per sampler, summed over ``repeats`` (order alternated)."""
    batch = [p for p in prompts for _ in range(samples)]
    groups = [g for g in range(len(prompts)) for _ in range(samples)]
    totals = {name: {"tokens": 0.0, "seconds": 0.0, "responses": 0.0, "truncated": 0.0} for name in SAMPLERS}
    for r in range(repeats):
        for name in (list(SAMPLERS) if r % 2 == 0 else list(SAMPLERS)[::-1]):
            torch.manual_seed(seed + r)
            rollout, seconds = timed(lambda: SAMPLERS[name](model, tokenizer, batch, groups, groups, max_new_tokens,
                                                            temperature=1.0, top_p=1.0))
            t = totals[name]
            t["tokens"] += float(rollout.response_mask.sum())
            t["seconds"] += seconds
            t["responses"] += len(rollout)
            t["truncated"] += float(rollout.truncated.sum())
    return totals


def compare_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> tuple[int, float, float]:
    """(rows whose tokens differ, seconds of generate, seconds of fast_generate) on greedy decoding."""
    index = list(range(len(prompts)))
    reference, t_generate = timed(lambda: generate(model, tokenizer, prompts, index, index, max_new_tokens,
                                                   greedy=True))
    fast, t_fast = timed(lambda: fast_generate(model, tokenizer, prompts, index, index, max_new_tokens, greedy=True))
    same_shape = reference.response_ids.shape == fast.response_ids.shape
    differing = len(prompts) if not same_shape else int((reference.response_ids != fast.response_ids).any(-1).sum())
    return differing, t_generate, t_fast


def bench_model(key: str, shapes: list[tuple[int, int]], max_new_tokens: int, repeats: int, peak: float) -> None:
    model, tokenizer = load_model(ModelConfig(name=MODEL_NAMES[key]))
    model.eval()
    report(f"{key}_params_m", sum(p.numel() for p in model.parameters()) / 1e6)
    report(f"{key}_decode_bound_tokens_per_s", peak * 1e9 / flops_per_token(model))
    prompts = chat_prompts(tokenizer, max(p for p, _ in shapes) + 16)
    report(f"{key}_mean_prompt_tokens", sum(map(len, prompts)) / len(prompts))

    differing, t_generate, t_fast = compare_greedy(model, tokenizer, prompts[:16], max_new_tokens)
    report(f"greedy_identical_{key}_b16", differing == 0)
    report(f"greedy_rows_differing_{key}_b16", differing)
    report(f"greedy_speedup_{key}_b16", t_generate / t_fast)

    for n_prompts, samples in shapes:
        b = n_prompts * samples
        totals = compare_sampling(model, tokenizer, prompts[:n_prompts], samples, max_new_tokens, repeats, seed=b)
        rate = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
        for name, t in totals.items():
            report(f"rollout_tokens_per_s_{name}_{key}_b{b}", rate[name])
            report(f"rollout_mean_length_{name}_{key}_b{b}", t["tokens"] / t["responses"])
            report(f"rollout_truncated_fraction_{name}_{key}_b{b}", t["truncated"] / t["responses"])
        report(f"rollout_speedup_{key}_b{b}", rate["fast"] / rate["generate"])


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in part.split("x")) for part in text.split(",")]  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    parser.add_argument("--shapes", default="4x4,8x8", help="prompts×samples per batch, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    set_threads(args.threads)
    peak = matmul_peak_gflops()
    report(f"matmul_peak_gflops_{args.threads}threads", peak)
    for key in args.models.split(","):
        if key == "tiny" and importlib.util.find_spec("moalign.models.tiny") is None:
            report("tiny_skipped", "moalign.models.tiny does not exist yet")
            continue
        bench_model(key, parse_shapes(args.shapes), args.max_new_tokens, args.repeats, peak)


if __name__ == "__main__":
    main()
