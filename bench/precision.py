"""bf16 compute (``precision=bf16-mixed``) against fp32 on SmolLM2-135M: how far its log-probs are from fp32's and
what that does to greedy outputs, the objectives' scores, the importance ratios and CTWA's statistic; the two ways
of computing in bf16 (a bf16 working copy of the model, as the engine does, or autocast over the fp32 weights) in
speed and accuracy; and what the sampler's packed weights give in each dtype.

    python bench/precision.py                        # all three parts, 2 threads (≈ 10 minutes)
    python bench/precision.py --parts accuracy       # accuracy | ways | linears, comma-separated
    python bench/precision.py --model tiny --parts accuracy,ways --prompts 2 --rounds 1   # a quick look

Prints ``name: value`` lines. "bf16" below is the engine's bf16-mixed computation: the model's weights in bf16
(a working copy), every forward in bf16; the optimizer updates fp32 masters (``engine.precision.MasterWeights``).

``accuracy`` — completions sampled by the fp32 policy (``--prompts`` training prompts × ``--samples``, up to
``--max-new-tokens``), scored by a teacher-forced forward in fp32, with the bf16 model, and under bf16 autocast
over the fp32 weights:

* ``logprob_abs_diff_<way>_median`` / ``_p99`` / ``_max``: |log π(y_t) − log π_fp32(y_t)| over the response
  tokens, ``<way>`` = ``bf16`` or ``autocast``;
* ``kl_fp32_<way>_per_token_mean``: KL(π_fp32 ‖ π_way) of the next-token distributions, averaged over the
  response positions (the whole 49k vocabulary);
* ``greedy_*``: greedy completions of ``--greedy-prompts`` validation prompts in fp32 and bf16 (the fast sampler):
  rows identical to fp32's, the mean fraction of an fp32 completion reproduced before the first differing token,
  and each objective's mean score on both (the evaluation's own scoring);
* importance ratios log ρ = log π − log π_old on the response tokens, ``|log ρ|`` median / p99 / max and the
  fraction outside the clip range [1 − 0.2, 1 + 0.2]:
  - ``ratio_sampler_vs_update_<precision>`` and ``ratio_recompute_vs_update_<precision>``: the two candidates for
    π_old of an update that is not exactly on-policy — the sampler's own log-probs (KV-cache decode) or a
    recomputed forward (8 rows per call, no autograd) — against the update's forward at the same weights (4 rows
    per call, with autograd), on completions sampled in that precision: the ratio the clipped surrogate starts from;
  - ``ratio_same_weights_<precision>``: the post-update pass's forward against the update's at unchanged weights
    (the floor of CTWA's statistic), and ``ratio_step1_`` / ``ratio_step2_<precision>`` across each of two AdamW
    steps at lr ``--lr`` (fp32 masters in bf16-mixed) on the surrogate's on-policy gradient, GRPO advantages of the
    three default objectives' mean score: the change the statistic is there to measure;
  - ``ctwa_cov_<objective>_step<k>_<precision>``, ``ctwa_unclipped_fraction_step<k>_<precision>``: CTWA's statistic
    after each step (``rl.covariance``: the within-group covariance of each reward with w_b = mean_t Â_b ρ_bt I_bt),
    and ``ctwa_cov_<objective>_at_ratio_one`` for ρ ≡ 1;
  - ``weights_on_bf16_grid_fraction`` / ``weights_halfway_between_bf16_values_fraction``: where the fp32 weights
    sit relative to bf16's grid (a weight halfway between two bf16 values rounds either way once it moves at all).

``ways`` — alternating rounds in one process (medians; the default job's shapes: 4 prompts × 4 samples, 128
response tokens, micro-batches of 4):

* the update's forward and backward: fp32 (as the engine runs it, with the embedding's and the linear layers'
  gradients added in place: ``engine/embedding_rows.py``, ``engine/linear_grads.py``); autocast over the fp32
  weights (autograd's gradients, cast to fp32 per use); the bf16 working copy as the engine runs it (in-place
  gradients in bf16, moved into the fp32 masters after every micro-batch, the masters rounded back into the copy
  after the step: those copies are timed too);
* sampling ``--sampler-tokens`` tokens for the 16 rows: fp32 with MKL-packed weights; autocast over the fp32
  weights (under ``torch.inference_mode`` autocast casts every weight at every decode step; packing steps aside);
  the bf16 working copy with oneDNN-packed weights — what the engine does.

``linears`` — a SmolLM2 decode step's 211 linear products (30 × q, k, v, o, gate, up, down and the LM head;
random weights of SmolLM2's shapes) at 1, 16, 64 and 512 rows: plain and packed, fp32 and bf16 weights
(milliseconds, median of 7).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report, set_threads, time_alternately  # noqa: E402

from moalign.config import ModelConfig  # noqa: E402
from moalign.data import DataConfig, load_data  # noqa: E402
from moalign.engine.embedding_rows import EmbeddingRowGradients  # noqa: E402
from moalign.engine.evaluation import encode_prompts, score_batch  # noqa: E402
from moalign.engine.linear_grads import LinearGradientsInPlace  # noqa: E402
from moalign.engine.packed import packed_linear_weights  # noqa: E402
from moalign.engine.precision import MasterWeights  # noqa: E402
from moalign.engine.rollout import (  # noqa: E402
    Rollout,
    left_pad,
    micro_batch_logprobs,
    response_logprobs,
    sequence_outputs,
)
from moalign.engine.sampler import fast_generate  # noqa: E402
from moalign.models import load_model, system_prompt_for  # noqa: E402
from moalign.objectives import ScoringBatch, load_objective  # noqa: E402
from moalign.rl.covariance import group_covariance, training_signal  # noqa: E402
from moalign.rl.estimators import get_estimator  # noqa: E402

MODEL = ModelConfig(name="smollm2-135m")  # --model replaces it
CLIP = 0.2
PRECISIONS = ("fp32", "bf16-mixed")


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def prompts(tokenizer, split: str, n: int) -> tuple[list, list[list[int]]]:
    examples = getattr(load_data(DataConfig()), split)[:n]
    return examples, encode_prompts(tokenizer, split, examples, 1024, system_prompt_for(MODEL))


def sample(model, tokenizer, prompt_ids, samples: int, max_new_tokens: int, seed: int, **kwargs) -> Rollout:
    batch = [p for p in prompt_ids for _ in range(samples)]
    groups = [g for g in range(len(prompt_ids)) for _ in range(samples)]
    torch.manual_seed(seed)
    return fast_generate(model, tokenizer, batch, groups, groups, max_new_tokens, **kwargs)


def quantiles(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    return {"median": float(values.median()), "p99": float(values.quantile(0.99)), "max": float(values.max())}


def report_ratio(name: str, log_ratio: torch.Tensor, mask: torch.Tensor) -> None:
    """|log ρ| quantiles and the fraction of tokens outside the clip range, over the masked tokens."""
    lr = log_ratio[mask.bool()]
    for key, value in quantiles(lr.abs()).items():
        report(f"{name}_abs_log_ratio_{key}", value)
    ratio = lr.double().exp()
    report(f"{name}_outside_clip_fraction", float(((ratio < 1 - CLIP) | (ratio > 1 + CLIP)).double().mean()))


def in_precision(model, precision: str):
    """The model as the engine computes with it in ``precision``: itself in fp32, a bf16 copy in bf16-mixed."""
    return model if precision == "fp32" else copy.deepcopy(model).to(torch.bfloat16)


# ---- accuracy ---------------------------------------------------------------------------------------------------

def compare_distributions(model, rollout: Rollout, micro_batch_size: int = 4) -> None:
    """Per-token |Δ log π| at the sampled tokens and KL(π_fp32 ‖ π) over the vocabulary, for the bf16 model and
    for autocast over the fp32 weights."""
    half = in_precision(model, "bf16-mixed")
    diffs, kls = {"bf16": [], "autocast": []}, {"bf16": [], "autocast": []}
    with torch.no_grad():
        for start in range(0, len(rollout), micro_batch_size):
            sl = slice(start, start + micro_batch_size)
            args = (rollout.prompt_ids[sl], rollout.prompt_mask[sl], rollout.response_ids[sl],
                    rollout.response_mask[sl])
            full = sequence_outputs(model, *args)[0].float().log_softmax(-1)
            mask = rollout.response_mask[sl].bool()
            targets = rollout.response_ids[sl][..., None]
            for way in ("bf16", "autocast"):
                with autocast() if way == "autocast" else nullcontext():
                    other = sequence_outputs(model if way == "autocast" else half, *args)[0].float().log_softmax(-1)
                diffs[way].append((other.gather(-1, targets) - full.gather(-1, targets)).squeeze(-1)[mask])
                kls[way].append((full.exp() * (full - other)).sum(-1)[mask])
    for way in ("bf16", "autocast"):
        for key, value in quantiles(torch.cat(diffs[way]).abs()).items():
            report(f"logprob_abs_diff_{way}_{key}", value)
        report(f"kl_fp32_{way}_per_token_mean", float(torch.cat(kls[way]).double().mean()))
    report("response_tokens_compared", int(rollout.response_mask.sum()))


def compare_greedy(model, tokenizer, n_prompts: int, max_new_tokens: int) -> None:
    examples, prompt_ids = prompts(tokenizer, "val", n_prompts)
    index = list(range(len(prompt_ids)))
    outputs = {precision: fast_generate(in_precision(model, precision), tokenizer, prompt_ids, index, index,
                                        max_new_tokens, greedy=True) for precision in PRECISIONS}
    full, half = outputs["fp32"], outputs["bf16-mixed"]
    identical, reproduced = 0, []
    for row in range(len(prompt_ids)):
        a, b, length = full.response_ids[row], half.response_ids[row], int(full.response_mask[row].sum())
        width = min(len(a), len(b), length)
        prefix = int((a[:width] == b[:width]).long().cumprod(0).sum())
        identical += prefix == length and int(half.response_mask[row].sum()) == length
        reproduced.append(prefix / length)
    report("greedy_prompts", len(prompt_ids))
    report("greedy_identical_rows_fraction", identical / len(prompt_ids))
    report("greedy_reproduced_prefix_fraction_mean", statistics.mean(reproduced))
    objectives = [load_objective(name) for name in ("accuracy", "conciseness", "clarity")]
    for precision, rollout in outputs.items():
        batch = ScoringBatch.from_lists([ex.prompt for ex in examples], rollout.texts, [ex.answer for ex in examples],
                                        rollout.num_tokens)
        rewards, _ = score_batch(objectives, batch, observe=False)
        for j, objective in enumerate(objectives):
            report(f"greedy_{objective.name}_mean_{precision}", float(rewards[:, j].nanmean()))
        report(f"greedy_length_mean_{precision}", statistics.mean(rollout.num_tokens))


def update_forward(model, rollout: Rollout) -> torch.Tensor:
    """log π as the update's forward computes it (4 rows per call, with autograd; detached)."""
    return torch.cat([micro_batch_logprobs(model, rollout.prompt_ids[sl], rollout.prompt_mask[sl],
                                           rollout.response_ids[sl], rollout.response_mask[sl], grad=True).detach()
                      for sl in (slice(start, start + 4) for start in range(0, len(rollout), 4))])


def old_logprob_sources(model, tokenizer, prompt_ids, args) -> None:
    """π_old candidates against the update's forward at the same weights, on completions each precision sampled."""
    for precision in PRECISIONS:
        policy = in_precision(model, precision)
        own = sample(policy, tokenizer, prompt_ids, args.samples, args.max_new_tokens, seed=1)
        with torch.no_grad():
            recomputed = response_logprobs(policy, own, 8)
        update = update_forward(policy, own)
        report_ratio(f"ratio_sampler_vs_update_{precision}", update - own.sampler_logprobs, own.response_mask)
        report_ratio(f"ratio_recompute_vs_update_{precision}", update - recomputed, own.response_mask)


def scored(rollout: Rollout, examples) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The three default objectives' rewards [B, 3] and GRPO advantages of their mean, as a training step has."""
    objectives = [load_objective(name) for name in ("accuracy", "conciseness", "clarity")]
    rows = [examples[i] for i in rollout.example_index]
    batch = ScoringBatch.from_lists([ex.prompt for ex in rows], rollout.texts, [ex.answer for ex in rows],
                                    rollout.num_tokens)
    rewards, _ = score_batch(objectives, batch, observe=True)
    advantages = get_estimator("grpo")(torch.nan_to_num(rewards).mean(-1), rollout.group_ids)
    return rewards, advantages.float(), [o.name for o in objectives]


def ratios_over_two_steps(model, rollout: Rollout, examples, precision: str, lr: float) -> None:
    """π_old from the update's forward (4 rows per call, with autograd), π_new from the post-update pass (8 rows per
    call, without), as the engine takes them: at the same weights, then across each of two AdamW steps on the
    clipped surrogate's on-policy gradient (GRPO advantages of the three objectives' mean score; fp32 masters for
    bf16-mixed, as the engine keeps them); after each step, CTWA's statistic (the covariance of each objective's
    reward with the training signal w_b)."""
    rewards, advantages, names = scored(rollout, examples)
    policy = copy.deepcopy(model).train()
    master = MasterWeights(policy) if precision == "bf16-mixed" else None
    optimizer = torch.optim.AdamW(master.trainable if master else policy.parameters(), lr=lr, weight_decay=0.0)
    mask = rollout.response_mask
    n_tokens = float(mask.sum())
    for step in (1, 2):
        policy.train()
        old = []
        for start in range(0, len(rollout), 4):
            sl = slice(start, start + 4)
            lp = micro_batch_logprobs(policy, rollout.prompt_ids[sl], rollout.prompt_mask[sl],
                                      rollout.response_ids[sl], mask[sl], grad=True)
            old.append(lp.detach())
            (-(lp * advantages[sl, None] * mask[sl]).sum() / n_tokens).backward()
            if master is not None:
                master.add_gradients()
        old = torch.cat(old)
        policy.eval()
        if step == 1:
            with torch.no_grad():
                same = response_logprobs(policy, rollout, 8)
            report_ratio(f"ratio_same_weights_{precision}", same - old, mask)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master is not None:
            master.refresh_working_copy()
        with torch.no_grad():
            new = response_logprobs(policy, rollout, 8)
        report_ratio(f"ratio_step{step}_{precision}", new - old, mask)
        signal = training_signal(advantages, old, new, mask)
        covariance = group_covariance(rewards, signal.w, rollout.group_ids).cov
        for name, value in zip(names, covariance.tolist()):
            report(f"ctwa_cov_{name}_step{step}_{precision}", value)
        report(f"ctwa_unclipped_fraction_step{step}_{precision}", float(signal.unclipped_fraction))
    if precision == "fp32":  # the statistic at ρ = 1 (no change at all), for scale
        at_one = group_covariance(rewards, training_signal(advantages, old, old, mask).w, rollout.group_ids).cov
        for name, value in zip(names, at_one.tolist()):
            report(f"ctwa_cov_{name}_at_ratio_one", value)


def weight_grid(model) -> None:
    """Where the fp32 weights sit relative to bf16's grid: on it, or exactly halfway between two bf16 values (a
    tie that the first update breaks, in the direction of its sign, for every such weight at once)."""
    total = on_grid = halfway = 0
    for p in model.parameters():
        low_bits = p.detach().float().view(torch.int32) & 0xFFFF  # the 16 mantissa bits bf16 drops
        total += p.numel()
        on_grid += int((low_bits == 0).sum())
        halfway += int((low_bits == 0x8000).sum())
    report("weights_on_bf16_grid_fraction", on_grid / total)
    report("weights_halfway_between_bf16_values_fraction", halfway / total)


def accuracy(args) -> None:
    model, tokenizer = load_model(MODEL)
    model.eval()
    examples, prompt_ids = prompts(tokenizer, "train", args.prompts)
    rollout = sample(model, tokenizer, prompt_ids, args.samples, args.max_new_tokens, seed=0)
    report("completions", len(rollout))
    report("mean_response_tokens", float(rollout.response_mask.sum(-1).mean()))
    compare_distributions(model, rollout)
    old_logprob_sources(model, tokenizer, prompt_ids, args)
    weight_grid(model)
    for precision in PRECISIONS:
        ratios_over_two_steps(model, rollout, examples, precision, args.lr)
    compare_greedy(model, tokenizer, args.greedy_prompts, args.max_new_tokens)


# ---- two ways of computing in bf16 ------------------------------------------------------------------------------

def fixed_rollout(tokenizer, n_prompts: int, samples: int, response_tokens: int, vocab: int) -> Rollout:
    """Real prompts, each ``samples`` times, with random ``response_tokens``-token responses (no EOS): fixed shapes
    for an A/B."""
    _, prompt_ids = prompts(tokenizer, "train", n_prompts)
    batch = [p for p in prompt_ids for _ in range(samples)]
    ids, mask = left_pad(batch, tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(100, vocab, (len(batch), response_tokens), generator=g)
    groups = torch.arange(n_prompts).repeat_interleave(samples)
    return Rollout(ids, mask, responses, torch.ones(responses.shape), [""] * len(batch), groups,
                   groups.tolist(), torch.ones(len(batch), dtype=torch.bool))


def update_pass(model, rollout: Rollout, context=nullcontext, in_place: bool = True,
                master: MasterWeights | None = None) -> None:
    """The update's forwards and backwards over 4-row micro-batches, with the engine's in-place gradients of the
    embedding rows and the linear layers (``in_place``) or autograd's own; ``master``: each micro-batch's bf16
    gradients moved into the fp32 masters, and the masters rounded back into the model at the end (the step)."""
    n_tokens = float(rollout.response_mask.sum())
    rows = EmbeddingRowGradients.for_model(model) if in_place else None
    linears = LinearGradientsInPlace.for_model(model) if in_place else None
    with rows or nullcontext(), linears or nullcontext():
        for start in range(0, len(rollout), 4):
            sl = slice(start, start + 4)
            with context():
                lp = micro_batch_logprobs(model, rollout.prompt_ids[sl], rollout.prompt_mask[sl],
                                          rollout.response_ids[sl], rollout.response_mask[sl], grad=True)
            (-lp.sum() / n_tokens).backward()
            if rows is not None:
                rows.flush()
            if master is not None:
                master.add_gradients()
    if master is not None:
        master.refresh_working_copy()


def ways(args) -> None:
    model, tokenizer = load_model(MODEL)
    rollout = fixed_rollout(tokenizer, 4, 4, 128, model.config.vocab_size)
    fp32 = model.train()
    working = copy.deepcopy(model).train()
    master = MasterWeights(working)

    def update_fp32(_):
        update_pass(fp32, rollout)
        fp32.zero_grad(set_to_none=True)

    def update_autocast(_):
        update_pass(fp32, rollout, autocast, in_place=False)
        fp32.zero_grad(set_to_none=True)

    def update_working_copy(_):
        update_pass(working, rollout, master=master)
        for m in master.trainable:
            m.grad = None

    runs = time_alternately({"fp32": update_fp32, "autocast": update_autocast,
                             "bf16_working_copy": update_working_copy}, args.rounds)
    seconds = {name: statistics.median(t for _, t in pairs) for name, pairs in runs.items()}
    for name, s in seconds.items():
        report(f"update_s_{name}", s)
    for name in ("autocast", "bf16_working_copy"):
        report(f"update_speedup_{name}", seconds["fp32"] / seconds[name])

    fp32.eval()
    working.eval()
    _, prompt_ids = prompts(tokenizer, "train", 4)

    def sampling(policy, context=nullcontext):
        def run(round_index):
            with context():
                return sample(policy, tokenizer, prompt_ids, 4, args.sampler_tokens, seed=round_index)
        return run

    runs = time_alternately({"fp32_packed": sampling(fp32), "autocast": sampling(fp32, autocast),
                             "bf16_working_copy_packed": sampling(working)}, args.rounds)
    rate = {name: sum(float(r.response_mask.sum()) for r, _ in pairs) / sum(t for _, t in pairs)
            for name, pairs in runs.items()}
    for name, value in rate.items():
        report(f"sampler_tokens_per_s_{name}", value)
    for name in ("autocast", "bf16_working_copy_packed"):
        report(f"sampler_speedup_{name}", rate[name] / rate["fp32_packed"])


# ---- the decode step's linear products --------------------------------------------------------------------------

def linears(args) -> None:
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    g = torch.Generator().manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(inp, out, bias=False) for _ in range(30) for inp, out in shapes)
    layers.append(torch.nn.Linear(576, 49152, bias=False))
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)

    def step_ms(model, x: dict[int, torch.Tensor]) -> float:
        def once():
            for layer in model:
                layer(x[layer.in_features])
        once()
        times = []
        for _ in range(7):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = layers.to(dtype)
        for rows in (1, 16, 64, 512):
            x = {n: torch.randn(rows, n, generator=g).to(dtype) for n in (576, 1536)}
            with torch.no_grad():
                report(f"linears_ms_{name}_rows{rows}", step_ms(model, x))
                with packed_linear_weights(model):
                    report(f"linears_ms_{name}_packed_rows{rows}", step_ms(model, x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="linears,ways,accuracy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m", help="accuracy and ways: the model (tiny for a quick look)")
    parser.add_argument("--prompts", type=int, default=8, help="accuracy: training prompts sampled")
    parser.add_argument("--samples", type=int, default=4, help="accuracy: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--greedy-prompts", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-6, help="accuracy: the two steps' learning rate")
    parser.add_argument("--rounds", type=int, default=3, help="ways: alternating rounds")
    parser.add_argument("--sampler-tokens", type=int, default=64, help="ways: tokens sampled per row")
    args = parser.parse_args()
    set_threads(args.threads)
    global MODEL
    MODEL = ModelConfig(name=args.model)
    report("threads", args.threads)
    report("model", args.model)
    parts = args.parts.split(",")
    for name, part in (("linears", linears), ("ways", ways), ("accuracy", accuracy)):
        if name in parts:
            part(args)


if __name__ == "__main__":
    main()
