"""Fast batched sampling for RL rollouts: a drop-in replacement for ``rollout.generate`` that also returns the
sampler's per-token log-probs.

Each sequence b of a batch continues its prompt ``x_b`` token by token,

    y_{b,t} ~ softmax(z_{b,t} / τ)         (or argmax z_{b,t} when greedy; nucleus-filtered when top_p < 1)
    sampler_logprobs[b, t] = log softmax(z_{b,t} / τ)[y_{b,t}]      (0 after the first EOS)

where ``z_{b,t}`` are the model's logits after ``[x_b, y_{b,<t}]`` with the position ids ``cumsum(mask) − 1`` that
``rollout.micro_batch_logprobs`` uses, so the log-probs equal ``response_logprobs(model, rollout, ·, τ)`` up to float
error. (With ``top_p < 1`` they are still those of the full temperature-scaled distribution, the one the trainer's
importance ratios compare against, not of the truncated one tokens are drawn from.)

The same computation as ``model.generate``, minus the work it wastes on a CPU:

1. **One prefill per distinct prompt.** A group repeats its prompt n times; the prompt is run once and its keys and
   values are copied to the n rows of the group.
2. **Preallocated key/value storage** (``SlotCache``): a step writes one column, where ``DynamicCache`` re-allocates
   and copies the whole cache (``torch.cat``) in every layer at every step.
3. **Finished rows leave the batch.** When a row emits EOS, the last live rows move into the freed slots (only those
   rows are copied), so late steps run on the few sequences still going instead of the whole padded batch.
4. **Weights packed once per call** (``engine.packed``): the CPU GEMM (MKL in fp32, oneDNN in bf16) re-packs a
   weight on every ``F.linear``, a large share of a matmul with a few dozen rows.
5. **Inverse-CDF sampling** (``sample_from_logits``): one uniform draw per row instead of ``torch.multinomial``'s
   one exponential draw per vocabulary entry, which on a CPU costs about as much as the forward itself at a 49k
   vocabulary; two-level (block sums, then one block) and in place on the logits.
6. **Decode steps without the per-call machinery** (``engine.decode``; Llama, Mistral, Qwen2, Qwen3): the
   model's own layer code called directly, the same logits bit for bit.

Randomness comes from torch's global RNG, so ``torch.manual_seed`` makes a call reproducible; or, with
``uniforms``, from one given uniform per sequence and position, whatever the batch around it (common random numbers
for evaluations: ``engine.evaluation``).
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from moalign.engine.decode import lean_decoder
from moalign.engine.packed import packed_linear_weights
from moalign.engine.rollout import Rollout, assemble_rollout, eos_token_ids, left_pad, position_ids
from moalign.errors import UserError

# ---- key/value storage --------------------------------------------------------------------------------------

class SlotLayer(DynamicLayer):
    """One layer's keys and values in storage of shape [rows, heads, capacity, head_dim] allocated once.

    ``keys``/``values`` are views of the first ``num_rows`` rows and ``length`` positions (what attention reads,
    exactly as ``DynamicLayer`` would hold them); ``update`` writes the new positions in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        rows, heads, length, head_dim = keys.shape
        self.key_store = keys.new_empty(rows, heads, capacity, head_dim)
        self.value_store = values.new_empty(rows, values.shape[1], capacity, values.shape[3])
        self.key_store[:, :, :length] = keys
        self.value_store[:, :, :length] = values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.num_rows, self.length = rows, length
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self.key_store[:self.num_rows, :, :self.length]
        self.values = self.value_store[:self.num_rows, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.key_store.shape[2]:
            raise RuntimeError(f"SlotLayer holds {self.key_store.shape[2]} positions; {end} requested")
        self.key_store[:self.num_rows, :, self.length:end] = key_states
        self.value_store[:self.num_rows, :, self.length:end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def move_rows(self, destinations: torch.Tensor, sources: torch.Tensor, num_rows: int) -> None:
        """Copy rows ``sources`` into slots ``destinations`` (disjoint) and keep the first ``num_rows`` rows."""
        if len(destinations):
            self.key_store[destinations, :, :self.length] = self.key_store[sources, :, :self.length]
            self.value_store[destinations, :, :self.length] = self.value_store[sources, :, :self.length]
        self.num_rows = num_rows
        self._refresh_views()


class SlotCache(Cache):
    """A ``Cache`` of ``SlotLayer``s built from a prefill ``DynamicCache`` (row r of the result is prefill row
    ``rows[r]``), with room for ``capacity`` positions in total."""

    def __init__(self, prefill: DynamicCache, rows: torch.Tensor, capacity: int):
        super().__init__(layers=[SlotLayer(layer.keys[rows], layer.values[rows], capacity)
                                 for layer in prefill.layers])

    @staticmethod
    def supports(cache: Cache) -> bool:
        """Only plain full-attention layers (sliding-window, linear-attention... layers keep their own cache)."""
        return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)

    def keep_rows(self, order: torch.Tensor) -> None:
        """Keep rows ``order`` (from ``survivor_order``: row i stays in place unless ``order[i] != i``)."""
        moved = (order != torch.arange(len(order), device=order.device)).nonzero().squeeze(1)
        for layer in self.layers:
            layer.move_rows(moved, order[moved], len(order))


def survivor_order(finished: torch.Tensor) -> torch.Tensor:
    """The rows to keep, in their new order, given which rows ``finished`` [n].

    Kept rows stay where they are, except those beyond the new batch size k, which fill the slots of finished rows
    among the first k: only as many cache rows as sequences just finished are copied."""
    n_keep = int((~finished).sum())
    order = torch.arange(len(finished), device=finished.device)
    holes = finished[:n_keep].nonzero().squeeze(1)
    movers = (~finished[n_keep:]).nonzero().squeeze(1) + n_keep
    order[holes] = movers
    return order[:n_keep]


def keep_rows(cache: Cache, order: torch.Tensor) -> None:
    if isinstance(cache, SlotCache):
        cache.keep_rows(order)
    else:  # any other cache: a gather of every layer
        cache.batch_select_indices(order)


# ---- choosing the next token --------------------------------------------------------------------------------

def nucleus_filter(scaled_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the smallest set of most likely tokens whose probability reaches ``top_p`` set to −inf
    (the most likely token is always kept; the same rule as ``transformers``' ``TopPLogitsWarper``)."""
    sorted_logits, sorted_idx = scaled_logits.sort(-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return scaled_logits.masked_fill(drop, -math.inf)


# The block size of the two-level inverse CDF (sample_from_logits): 49 152 / 256 = 192 blocks for SmolLM2.
CDF_BLOCK = 256


def sample_from_logits(scaled_logits: torch.Tensor, uniforms: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One index per row of softmax(``scaled_logits``) [n, V] and its log-prob, by a two-level inverse CDF
    (``uniforms`` [n] in [0, 1): the draws u/Σ_j s_j to use; default: fresh ones from torch's global RNG).
    **Overwrites** ``scaled_logits`` (with the unnormalised probabilities w below): where V is a multiple of
    ``CDF_BLOCK`` (SmolLM2's 49 152 is) no vocabulary-sized tensor is allocated, which on a CPU costs as much as the
    arithmetic (page faults on ≈ 13 MB per decode step at batch 64); other vocabularies get one padded copy.

        w = exp(z − max z),  s_j = Σ_{i ∈ block j} w_i,  u ~ U[0, 1) · Σ_j s_j
        block  b = the first j with s_1 + … + s_j > u
        token  y = the first i of block b with Σ_{i' ≤ i in block b} w_{i'} > u − (s_1 + … + s_{b−1})
        log p(y) = log w_y − log Σ_j s_j

    One uniform draw per row: ``torch.multinomial`` draws one exponential variate per vocabulary entry (≈ 100 ms
    per step for 64 rows of a 49k vocabulary on one CPU core, as long as the model's forward). The same law as one
    cumsum over the vocabulary, with a cumsum over the block sums and one within a single block per row instead: in
    SmolLM2's decode loop at batch 64 a draw takes ≈ 3.5 ms instead of ≈ 12 ms for log-softmax, exp and the full
    cumsum. Tokens at −inf (e.g. outside a nucleus) have no mass, and a token without mass is never returned:
    rounding can only push u past the end of its block, and those rows (almost never any) are drawn again with
    ``multinomial``."""
    n, vocab = scaled_logits.shape
    weights = scaled_logits.sub_(scaled_logits.amax(-1, keepdim=True)).exp_()
    blocks = -(-vocab // CDF_BLOCK)
    if blocks * CDF_BLOCK != vocab:
        weights = nn.functional.pad(weights, (0, blocks * CDF_BLOCK - vocab))  # zero weight for the padding
    by_block = weights.view(n, blocks, CDF_BLOCK)
    block_cdf = by_block.sum(-1).cumsum(-1)
    total = block_cdf[:, -1:]
    u = (torch.rand((n, 1), device=weights.device, dtype=weights.dtype) if uniforms is None
         else uniforms.to(weights.device, weights.dtype).view(n, 1)) * total
    block = torch.searchsorted(block_cdf, u, right=True).clamp_(max=blocks - 1)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp_(min=0)), 0.0)
    within_cdf = by_block.gather(1, block[:, :, None].expand(n, 1, CDF_BLOCK)).squeeze(1).cumsum(-1)
    offset = torch.searchsorted(within_cdf, u - before, right=True).clamp_(max=CDF_BLOCK - 1)
    index = (block * CDF_BLOCK + offset).squeeze(1)
    chosen = weights.gather(-1, index[:, None]).squeeze(1)
    empty = chosen == 0
    if bool(empty.any()):
        index[empty] = torch.multinomial(weights[empty], 1).squeeze(1)
        chosen = weights.gather(-1, index[:, None]).squeeze(1)
    return index, chosen.log() - total.squeeze(1).log()


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool,
                uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token per row [n] and its log-prob under softmax(logits / τ) [n], from float logits [n, V] (overwritten
    when sampling at τ = 1 with top_p = 1: ``sample_from_logits``, which draws with ``uniforms`` [n] if given)."""
    scaled = logits / temperature if temperature != 1.0 else logits
    if not greedy and top_p >= 1.0:
        return sample_from_logits(scaled, uniforms)
    # the log-prob under the full distribution; the token by argmax, or drawn from the nucleus
    logp = scaled.log_softmax(-1)
    tokens = logits.argmax(-1) if greedy else sample_from_logits(nucleus_filter(scaled, top_p), uniforms)[0]
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(1)


# ---- the decode loop ----------------------------------------------------------------------------------------

def _accepts_logits_to_keep(model) -> bool:
    """HF causal LMs take ``logits_to_keep`` (the prefill then sends one position per row through the LM head, not
    all of them); wrappers such as PEFT models pass it on to the model they wrap."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def prefill(model, prompts: list[list[int]], pad_id: int, capacity: int
            ) -> tuple[torch.Tensor, Cache, torch.Tensor]:
    """Run every distinct prompt once. Returns, per entry of ``prompts``: the next-token logits [n, V] (float), a
    cache row (copied from its prompt's; room for ``capacity`` positions) and the left-padded prompt mask [n, Tp]."""
    device = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    row_of = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=device)
    ids, mask = (t.to(device) for t in left_pad([list(p) for p in distinct], pad_id))
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                past_key_values=DynamicCache(config=model.config), use_cache=True, **extra)
    cache = out.past_key_values
    if SlotCache.supports(cache):
        cache = SlotCache(cache, row_of, capacity)
    else:
        cache.batch_select_indices(row_of)
    return out.logits[:, -1].float()[row_of], cache, mask[row_of]


@torch.inference_mode()
def sample_batch(model, prompts: list[list[int]], max_new_tokens: int, eos: set[int], pad_id: int,
                 temperature: float, top_p: float, greedy: bool, lean: bool = True,
                 uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses [n, T] (``pad_id`` after a row's EOS; T = the longest response) and their log-probs [n, T], as
    inference-mode tensors (copy them before autograd sees them, as ``fast_generate`` does). ``lean``: decode
    steps through ``engine.decode.LeanDecoder`` where it applies (same logits, less per-call overhead).
    ``uniforms`` [n, max_new_tokens]: sequence b draws its t-th token with ``uniforms[b, t]``."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    logits, cache, prompt_mask = prefill(model, prompts, pad_id, capacity=width + max_new_tokens - 1)
    decoder = lean_decoder(model) if lean and isinstance(cache, SlotCache) else None
    eos_ids = torch.tensor(sorted(eos), device=device)
    n = len(prompts)
    responses = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), device=device)
    sample_of_row = torch.arange(n, device=device)  # which sequence each live cache row holds
    next_position = prompt_mask.sum(-1)  # of the token fed at step 1 (then + 1 per step)
    attention_mask = torch.ones((n, width + max_new_tokens), dtype=torch.long, device=device)
    attention_mask[:, :width] = prompt_mask
    steps = 0
    if uniforms is not None:
        uniforms = uniforms.to(device)
    for step in range(max_new_tokens):
        draws = None if uniforms is None else uniforms[sample_of_row, step]  # each row's own stream
        tokens, token_logprobs = next_tokens(logits, temperature, top_p, greedy, draws)
        responses[sample_of_row, step] = tokens
        logprobs[sample_of_row, step] = token_logprobs
        steps = step + 1
        finished = torch.isin(tokens, eos_ids)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        if bool(finished.any()):
            order = survivor_order(finished)
            keep_rows(cache, order)
            sample_of_row, tokens, next_position = sample_of_row[order], tokens[order], next_position[order]
            attention_mask = attention_mask[order]
        if decoder is not None:
            logits = decoder.step(tokens, attention_mask[:, :width + step + 1], next_position + step, cache).float()
        else:
            out = model(input_ids=tokens[:, None], attention_mask=attention_mask[:, :width + step + 1],
                        position_ids=(next_position + step)[:, None], past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
    return responses[:, :steps].cpu(), logprobs[:, :steps].cpu()


def _check_arguments(prompt_token_ids, example_index, group_ids, max_new_tokens, temperature, top_p, batch_size):
    if not prompt_token_ids:
        raise UserError("fast_generate got no prompts; pass at least one list of token ids")
    if len(example_index) != len(prompt_token_ids) or len(group_ids) != len(prompt_token_ids):
        raise UserError(f"fast_generate: {len(prompt_token_ids)} prompts but {len(example_index)} example indices "
                        f"and {len(group_ids)} group ids; pass one of each per prompt")
    if any(len(p) == 0 for p in prompt_token_ids):
        raise UserError("fast_generate got an empty prompt; every prompt needs at least one token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax decoding)")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch_size must be ≥ 1 or None, got {batch_size}")


@torch.no_grad()
def fast_generate(model, tokenizer, prompt_token_ids: list[list[int]], example_index: list[int],
                  group_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                  greedy: bool = False, batch_size: int | None = None, pack_weights: bool = True,
                  lean: bool = True, uniforms: torch.Tensor | None = None) -> Rollout:
    """Sample one completion per entry of ``prompt_token_ids`` (repeat a prompt n times for a group), like
    ``rollout.generate``, with ``Rollout.sampler_logprobs`` filled. ``batch_size`` caps the sequences decoded
    together (default: all); ``pack_weights=False`` multiplies by the weights as they are, without the packed copy
    (``engine.packed``: one more copy of the linear weights in memory during the call); ``lean=False`` runs every
    decode step through the model's forward instead of ``engine.decode.LeanDecoder`` (the same logits).
    ``uniforms`` [n, ≥ max_new_tokens] in [0, 1): completion b draws its t-th token with ``uniforms[b, t]`` instead
    of torch's global RNG, so a completion's draws do not depend on the other sequences in the call."""
    _check_arguments(prompt_token_ids, example_index, group_ids, max_new_tokens, temperature, top_p, batch_size)
    if uniforms is not None and (uniforms.shape[0] != len(prompt_token_ids) or uniforms.shape[1] < max_new_tokens):
        raise UserError(f"fast_generate: uniforms has shape {tuple(uniforms.shape)}; it needs one row per prompt "
                        f"({len(prompt_token_ids)}) and at least max_new_tokens={max_new_tokens} columns")
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token; set tokenizer.pad_token (load_model does)")
    eos = eos_token_ids(model, tokenizer)
    if not eos:
        raise UserError("neither the model's generation_config nor the tokenizer defines an EOS token")
    pad_id = tokenizer.pad_token_id
    bs = batch_size or len(prompt_token_ids)
    with packed_linear_weights(model) if pack_weights else nullcontext():
        chunks = [sample_batch(model, prompt_token_ids[start:start + bs], max_new_tokens, eos, pad_id, temperature,
                               top_p, greedy, lean, None if uniforms is None else uniforms[start:start + bs])
                  for start in range(0, len(prompt_token_ids), bs)]
    prompt_ids, prompt_mask = left_pad(prompt_token_ids, pad_id)
    return assemble_rollout(tokenizer, prompt_ids, prompt_mask, [ids for ids, _ in chunks], eos, pad_id,
                            example_index, group_ids, [lp for _, lp in chunks])
