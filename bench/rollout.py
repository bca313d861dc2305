"""Rollout throughput: ``fast_generate`` (moalign.engine.sampler) vs ``model.generate`` (moalign.engine.rollout).

Both sample with the same settings (temperature 1, top_k 0, top_p 1) from the same prompts, arithmetic problems of
the default data config in the model's chat template, ``prompts × samples`` per batch, each response stopping at its
own EOS or at ``--max-new-tokens``. The two take turns in one process, round r of both from seed r (the machine is
shared, so their ratio means more than either rate); throughput is generated tokens (through EOS) per second over
all rounds.

The greedy check decodes 16 distinct prompts greedily with both and compares the token ids; being the same tokens,
its time ratio is an exact like-for-like speedup.

    python bench/rollout.py                      # SmolLM2-135M and tiny, batches 4×4 and 8×8, 2 repeats
    python bench/rollout.py --models tiny --shapes 4x4 --repeats 1 --max-new-tokens 32   # quick look
    python bench/rollout.py --models smollm2 --shapes 8x8 --max-new-tokens 512 --repeats 1   # most answers end
                                                 # on their own before the budget (≈ 8 min)
    python bench/rollout.py --models smollm2 --unpacked   # + fast_generate without packed weights, same rounds
    python bench/rollout.py --models smollm2 --plain-decode   # + fast_generate with the model's forward per step
    python bench/rollout.py --models smollm2 --precisions fp32,bf16-mixed   # both samplers in both precisions,
                                                 # all four taking turns in the same rounds

``--precisions``: each sampler runs in each precision (``bf16-mixed``: on a bf16 copy of the model, as the trainer
samples); names then carry the precision (``rollout_tokens_per_s_fast_bf16-mixed_smollm2_b64``),
``rollout_speedup_<precision>_...`` compares the two samplers in one precision and
``rollout_bf16_speedup_<sampler>_...`` one sampler across precisions.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from functools import partial

import torch
from _common import matmul_peak_gflops, report, set_threads, time_alternately

from moalign.config import ModelConfig
from moalign.data import DataConfig, load_data
from moalign.engine.rollout import generate
from moalign.engine.sampler import fast_generate
from moalign.models.loading import load_model

MODEL_NAMES = {"smollm2": "smollm2-135m", "tiny": "tiny"}
SAMPLERS = {"generate": generate, "fast": fast_generate}


# fast_generate without packed weights (plain F.linear), and with every decode step through the model's forward
# (no engine.decode.LeanDecoder): what each of the two gives, measured in the same rounds
fast_generate_unpacked = partial(fast_generate, pack_weights=False)
fast_generate_plain_decode = partial(fast_generate, lean=False)


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
                     min_seconds: float, seed: int, samplers: dict) -> dict[str, dict[str, float]]:
    """Generated tokens, seconds, responses and truncated responses per sampler, summed over the rounds; round r
    of both samplers starts from seed ``seed + r``."""
    batch = [p for p in prompts for _ in range(samples)]
    groups = [g for g in range(len(prompts)) for _ in range(samples)]

    def sampling_with(sampler):
        def run(round_index: int):
            torch.manual_seed(seed + round_index)
            return sampler(model, tokenizer, batch, groups, groups, max_new_tokens, temperature=1.0, top_p=1.0)
        return run

    runs = time_alternately({name: sampling_with(s) for name, s in samplers.items()}, repeats, min_seconds)
    return {name: {"tokens": sum(float(r.response_mask.sum()) for r, _ in pairs),
                   "seconds": sum(seconds for _, seconds in pairs),
                   "responses": sum(len(r) for r, _ in pairs),
                   "truncated": sum(float(r.truncated.sum()) for r, _ in pairs)}
            for name, pairs in runs.items()}


def compare_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, min_seconds: float
                   ) -> tuple[int, float]:
    """(rows whose greedy tokens differ between the samplers, time of generate / time of fast_generate)."""
    index = list(range(len(prompts)))
    runs = time_alternately({name: lambda _, s=s: s(model, tokenizer, prompts, index, index, max_new_tokens,
                                                    greedy=True)
                             for name, s in SAMPLERS.items()}, 1, min_seconds)
    reference, fast = runs["generate"][0][0], runs["fast"][0][0]
    if reference.response_ids.shape != fast.response_ids.shape:
        differing = len(prompts)
    else:
        differing = int((reference.response_ids != fast.response_ids).any(-1).sum())
    seconds = {name: sum(t for _, t in pairs) for name, pairs in runs.items()}
    return differing, seconds["generate"] / seconds["fast"]


def on_model(sampler, model):
    """``sampler`` run on ``model`` whatever model it is given (the bf16 copy of a precision's rounds)."""
    return lambda _model, *args, **kwargs: sampler(model, *args, **kwargs)


def bench_model(key: str, shapes: list[tuple[int, int]], max_new_tokens: int, repeats: int, min_seconds: float,
                peak: float, unpacked: bool, plain_decode: bool, precisions: list[str]) -> None:
    model, tokenizer = load_model(ModelConfig(name=MODEL_NAMES[key]))
    model.eval()
    models = {precision: model if precision == "fp32" else copy.deepcopy(model).to(torch.bfloat16)
              for precision in precisions}
    report(f"{key}_params_m", sum(p.numel() for p in model.parameters()) / 1e6)
    report(f"{key}_decode_bound_tokens_per_s", peak * 1e9 / flops_per_token(model))
    prompts = chat_prompts(tokenizer, max(p for p, _ in shapes) + 16)
    report(f"{key}_mean_prompt_tokens", sum(map(len, prompts)) / len(prompts))

    named = len(precisions) > 1  # names carry the precision

    def tag(name: str, precision: str) -> str:
        return f"{name}_{precision}" if named else name

    for precision in precisions:
        differing, speedup = compare_greedy(models[precision], tokenizer, prompts[:16], max_new_tokens, min_seconds)
        report(f"greedy_identical_{tag(key, precision)}_b16", differing == 0)
        report(f"greedy_rows_differing_{tag(key, precision)}_b16", differing)
        report(f"greedy_speedup_{tag(key, precision)}_b16", speedup)

    base = {**SAMPLERS, **({"fast_unpacked": fast_generate_unpacked} if unpacked else {}),
            **({"fast_plain_decode": fast_generate_plain_decode} if plain_decode else {})}
    samplers = {tag(name, precision): on_model(sampler, models[precision])
                for precision in precisions for name, sampler in base.items()}
    for n_prompts, samples in shapes:
        b = n_prompts * samples
        totals = compare_sampling(model, tokenizer, prompts[:n_prompts], samples, max_new_tokens, repeats,
                                  min_seconds, seed=b, samplers=samplers)
        rate = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
        for name, t in totals.items():
            report(f"rollout_tokens_per_s_{name}_{key}_b{b}", rate[name])
            report(f"rollout_mean_length_{name}_{key}_b{b}", t["tokens"] / t["responses"])
            report(f"rollout_truncated_fraction_{name}_{key}_b{b}", t["truncated"] / t["responses"])
        for precision in precisions:
            rates = {name: rate[tag(name, precision)] for name in base}
            suffix = f"{precision}_{key}" if named else key
            report(f"rollout_speedup_{suffix}_b{b}", rates["fast"] / rates["generate"])
            if unpacked:
                report(f"rollout_packing_speedup_{suffix}_b{b}", rates["fast"] / rates["fast_unpacked"])
            if plain_decode:
                report(f"rollout_lean_decode_speedup_{suffix}_b{b}", rates["fast"] / rates["fast_plain_decode"])
        if named and "fp32" in precisions:
            for name in base:
                for precision in precisions:
                    if precision != "fp32":
                        report(f"rollout_bf16_speedup_{name}_{key}_b{b}",
                               rate[tag(name, precision)] / rate[tag(name, "fp32")])


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in part.split("x")) for part in text.split(",")]  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    parser.add_argument("--shapes", default="4x4,8x8", help="prompts×samples per batch, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=5.0,
                        help="keep repeating until each sampler ran this long (matters for the tiny model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unpacked", action="store_true",
                        help="also time fast_generate without packed weights (engine.packed), in the same rounds")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16-mixed")
    parser.add_argument("--plain-decode", action="store_true",
                        help="also time fast_generate with the model's forward per decode step (no engine.decode)")
    args = parser.parse_args()

    set_threads(args.threads)
    peak = matmul_peak_gflops()
    report(f"matmul_peak_gflops_{args.threads}threads", peak)
    for key in args.models.split(","):
        if key == "tiny" and importlib.util.find_spec("moalign.models.tiny") is None:
            report("tiny_skipped", "moalign.models.tiny does not exist yet")
            continue
        bench_model(key, parse_shapes(args.shapes), args.max_new_tokens, args.repeats, args.min_seconds, peak,
                    args.unpacked, args.plain_decode, args.precisions.split(","))


if __name__ == "__main__":
    main()
