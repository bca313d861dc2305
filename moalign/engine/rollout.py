"""Sampling completions and computing per-token log-probs of responses.

Layout of a batch: prompts are left-padded to ``Tp`` tokens, responses right-padded to ``Tr``; the model sees
``[prompt | response]`` with position ids ``cumsum(mask) − 1`` (as ``generate`` uses), so log-probs computed here
match the sampler's. The response mask is 1 on generated tokens up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, Tp] left-padded
    prompt_mask: torch.Tensor  # [B, Tp]
    response_ids: torch.Tensor  # [B, Tr] right-padded
    response_mask: torch.Tensor  # [B, Tr] float, 1 through the first EOS
    texts: list[str]
    group_ids: torch.Tensor  # [B] long
    example_index: list[int]  # index of each sample's example in the split
    truncated: torch.Tensor  # [B] bool: no EOS within the token budget
    sampler_logprobs: torch.Tensor | None = field(default=None)  # [B, Tr] if the sampler returns them

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_tokens(self) -> list[int]:
        """Response length in tokens, EOS excluded (what conciseness compares)."""
        lengths = self.response_mask.sum(-1) - (~self.truncated).float()
        return [int(x) for x in lengths.clamp(min=0)]

    def select(self, idx: torch.Tensor) -> "Rollout":
        sl = lambda t: None if t is None else t[idx]  # noqa: E731
        ids = idx.tolist()
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx],
                       [self.texts[i] for i in ids], self.group_ids[idx], [self.example_index[i] for i in ids],
                       self.truncated[idx], sl(self.sampler_logprobs))


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def response_mask_from_ids(response_ids: torch.Tensor, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask through the first EOS (inclusive) and whether each row was truncated (no EOS)."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response_ids == e
    seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    mask = (~seen_before).float()
    truncated = ~is_eos.any(-1)
    return mask, truncated


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [tokenizer.eos_token_id]:
        if e is not None:
            ids.add(int(e))
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompt_token_ids: list[list[int]], example_index: list[int], group_ids: list[int],
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             batch_size: int | None = None) -> Rollout:
    """Sample one completion per entry of ``prompt_token_ids`` (repeat a prompt n times for a group)."""
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad(prompt_token_ids, pad_id)
    chunks = []
    bs = batch_size or len(prompt_token_ids)
    for start in range(0, len(prompt_token_ids), bs):
        ids = prompt_ids[start:start + bs].to(device)
        am = prompt_mask[start:start + bs].to(device)
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                           top_k=0)
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=sorted(eos), **kwargs)
        chunks.append(out[:, ids.shape[1]:].cpu())
    return assemble_rollout(tokenizer, prompt_ids, prompt_mask, chunks, eos, pad_id, example_index, group_ids)


def assemble_rollout(tokenizer, prompt_ids, prompt_mask, response_chunks: list[torch.Tensor], eos: set[int],
                     pad_id: int, example_index, group_ids, logprob_chunks: list[torch.Tensor] | None = None
                     ) -> Rollout:
    """One ``Rollout`` from responses generated in chunks: right-pad to one width, mask through the first EOS,
    pad after it, decode."""
    width = max(c.shape[1] for c in response_chunks)
    pad_right = torch.nn.functional.pad
    response_ids = torch.cat([pad_right(c, (0, width - c.shape[1]), value=pad_id) for c in response_chunks])
    mask, truncated = response_mask_from_ids(response_ids, eos)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    texts = tokenizer.batch_decode([r[m.bool()] for r, m in zip(response_ids, mask)], skip_special_tokens=True)
    logprobs = None
    if logprob_chunks is not None:
        logprobs = torch.cat([pad_right(lp, (0, width - lp.shape[1])) for lp in logprob_chunks]) * mask
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, texts, torch.tensor(group_ids, dtype=torch.long),
                   list(example_index), truncated, sampler_logprobs=logprobs)


def response_logprobs(model, rollout: Rollout, micro_batch_size: int, temperature: float = 1.0,
                      grad: bool = False, share_prompts: bool | None = None,
                      trunk_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """log π(response token | prefix) for every response position, [B, Tr] (0 where masked out).

    Only the response positions go through the LM head (``logits_to_keep``), one micro-batch at a time, so the
    full-vocabulary logits of the whole batch never exist at once. Keep a group's rows next to each other (as the
    trainer lays rollouts out) so that micro-batches share prompts (``micro_batch_logprobs``). ``trunk_hidden``:
    the frozen trunk's output for the rollout, when ``model`` runs only its top blocks (``engine.trunk``)."""
    outs = []
    for start in range(0, len(rollout), micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        outs.append(micro_batch_logprobs(model, rollout.prompt_ids[sl], rollout.prompt_mask[sl],
                                         rollout.response_ids[sl], rollout.response_mask[sl], temperature, grad,
                                         share_prompts=share_prompts,
                                         trunk_hidden=None if trunk_hidden is None else trunk_hidden[sl]))
    return torch.cat(outs)


# Sharing a prompt costs a second call of the model; below this many saved FLOPs, that call's per-operation
# overhead (≈ 10 ms for a 30-layer model on a CPU) outweighs the prompt work it saves (the tiny model never shares).
MIN_SHARED_PROMPT_FLOPS = 1e9


def micro_batch_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=1.0, grad=False,
                         share_prompts=None, trunk_hidden=None):
    """log-probs [b, Tr] of the responses of one micro-batch (0 where masked out), with autograd when ``grad``; the
    model runs only as many response positions as the micro-batch's longest response.

    Sharing prompts, rows with the same prompt (the samples of a group) run it once: the prompt's keys and values
    are computed once and gathered for every row that continues it, so the prompt's forward — and backward, the
    gather's gradient summing the rows' contributions — costs one row instead of n. Same numbers as the plain
    forward up to float rounding; models whose cache is not plain full attention take the plain forward.
    ``share_prompts``: ``None`` shares when it saves at least ``MIN_SHARED_PROMPT_FLOPS``, ``True`` always,
    ``False`` never. ``trunk_hidden`` [b, Tp + Tr − 1, d]: the model's input embeddings instead of the token ids'
    (the frozen trunk's output, ``engine.trunk``)."""
    # Columns past the micro-batch's longest response are padding in every row: they are left out (attention is
    # causal, so the other positions' outputs do not change) and get log-prob 0, as the mask would give them.
    width = response_ids.shape[1]
    keep = int(response_mask.any(0).nonzero().max()) + 1 if bool(response_mask.any()) else 1
    if keep < width:
        response_ids, response_mask = response_ids[:, :keep], response_mask[:, :keep]
        if trunk_hidden is not None:
            trunk_hidden = trunk_hidden[:, :prompt_ids.shape[1] + keep - 1]
    targets = response_ids.to(next(model.parameters()).device)
    with torch.set_grad_enabled(grad):
        logits = sequence_outputs(model, prompt_ids, prompt_mask, response_ids, response_mask, share_prompts,
                                  trunk_hidden)
        lp = torch.cat([_token_logprobs(part, temperature, part_targets)
                        for part, part_targets in zip(logits, targets.split([p.shape[1] for p in logits], 1))], 1)
        return torch.nn.functional.pad(lp * response_mask.to(lp.device), (0, width - keep))


def sequence_outputs(model, prompt_ids, prompt_mask, response_ids, response_mask, share_prompts=None,
                     inputs_embeds=None, all_positions=False) -> list[torch.Tensor]:
    """The model's outputs over ``[prompt | response[:-1]]``, as parts to concatenate along time: at the Tr
    positions that predict the response tokens, or at all Tp + Tr − 1 positions with ``all_positions`` (a
    headless model's hidden states). ``inputs_embeds`` [b, Tp + Tr − 1, d] replaces the token ids' embeddings."""
    if getattr(model, "_moalign_top_only", False) != (inputs_embeds is not None):
        raise ValueError("the frozen trunk's hidden states go with a model running its top blocks only "
                         "(FrozenTrunk.top_only), and only there")
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    response_ids, response_mask = response_ids.to(device), response_mask.to(device)
    outputs = None
    if share_prompts is not False:
        outputs = _outputs_sharing_prompts(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                           inputs_embeds, all_positions,
                                           min_saved_flops=0.0 if share_prompts else MIN_SHARED_PROMPT_FLOPS)
    if outputs is None:
        outputs = _outputs(model, prompt_ids, prompt_mask, response_ids, response_mask, inputs_embeds, all_positions)
    return outputs


def _token_logprobs(logits: torch.Tensor, temperature: float, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return TokenLogProb.apply(logits, targets)


# Rows of logits per chunk in ``TokenLogProb`` on a CPU: 16 × a 49k vocabulary ≈ 3 MB, so a chunk's temporaries
# (z − max, its exp) stay in the core's cache instead of going through memory as whole-batch tensors.
CPU_ROWS_PER_CHUNK = 16


def _row_chunks(rows: int, device: torch.device) -> list[slice]:
    """Slices of ``rows`` taken one chunk at a time: ``CPU_ROWS_PER_CHUNK`` on a CPU, all at once elsewhere (an
    accelerator's kernels gain nothing from it and would pay one launch per chunk)."""
    step = CPU_ROWS_PER_CHUNK if device.type == "cpu" else max(rows, 1)
    return [slice(start, start + step) for start in range(0, rows, step)]


class TokenLogProb(torch.autograd.Function):
    """log softmax(z)[y] = z_y − logsumexp(z) for logits z [..., V] and targets y [...], with the backward

        ∂/∂z_v = g · (1[v = y] − softmax(z)_v)

    written as one vocabulary-sized tensor: (z − lse), exponentiated and scaled in place, plus g at the target.
    Autograd's own graph for the same formula (gather and logsumexp) allocates five vocabulary-sized tensors in the
    backward (z − lse, its exp, the product, the gather's zero-filled gradient, the sum), each ≈ 100 MB for a
    micro-batch of 512 response positions of a 49k vocabulary, and faults fresh pages in for each: the update's
    largest non-matmul cost.

    On a CPU both directions go through the rows a few at a time (``_row_chunks``): ``logsumexp`` over the whole
    [512, 49k] block writes and re-reads a 100 MB temporary. SmolLM2's LM head and log-probs over 4 × 128
    positions took 0.237 s whole and 0.192 s in chunks of 16 rows, 0.678 and 0.575 s with the backward
    (bench/logprob.py). Every row is computed alone either way, so the values are the same bit for bit."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        lse = flat.new_empty(flat.shape[0])
        for rows in _row_chunks(flat.shape[0], flat.device):
            torch.logsumexp(flat[rows], -1, out=lse[rows])
        lse = lse.view(logits.shape[:-1])
        ctx.save_for_backward(logits, lse, targets)
        return logits.gather(-1, targets[..., None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, targets = ctx.saved_tensors
        # a new tensor, not the saved logits in place: the per-objective gradients run this backward M times
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        flat_out, flat_in = grad_logits.view(-1, logits.shape[-1]), logits.reshape(-1, logits.shape[-1])
        flat_lse, flat_grad = lse.reshape(-1, 1), grad.reshape(-1, 1)
        for rows in _row_chunks(flat_in.shape[0], flat_in.device):
            torch.sub(flat_in[rows], flat_lse[rows], out=flat_out[rows]).exp_().mul_(-flat_grad[rows])
        grad_logits.scatter_add_(-1, targets[..., None], grad[..., None])
        return grad_logits, None


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token of a left-padded batch, as ``generate`` numbers them: ``cumsum(mask) − 1``."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _inputs(ids: torch.Tensor, embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}


def _outputs(model, prompt_ids, prompt_mask, response_ids, response_mask, inputs_embeds, all_positions
             ) -> list[torch.Tensor]:
    """``sequence_outputs`` from one forward over ``[prompt | response[:-1]]``."""
    tr = response_ids.shape[1]
    attn = torch.cat([prompt_mask, response_mask.long()], 1)[:, :-1]
    out = model(**_inputs(torch.cat([prompt_ids, response_ids[:, :-1]], 1), inputs_embeds), attention_mask=attn,
                position_ids=position_ids(attn), logits_to_keep=0 if all_positions else tr, use_cache=False)
    return [out.logits]


def _outputs_sharing_prompts(model, prompt_ids, prompt_mask, response_ids, response_mask, inputs_embeds,
                             all_positions, min_saved_flops: float) -> list[torch.Tensor] | None:
    """``sequence_outputs`` as the prompt's part [b, Tp − 1, ·] (``all_positions`` only) and the rest's
    [b, Tr, ·], running each distinct prompt once; ``None`` when sharing would save fewer than ``min_saved_flops``
    (2 per parameter per prompt position not run), a prompt has a single token, or the model's cache cannot be
    gathered row-wise.

    The shared call covers the prompts' first Tp − 1 positions; every row then runs its prompt's last token
    followed by its response, so the Tr positions that predict the response go through the LM head in one call.
    (Taking the first response token's logits from the prompt call instead would send one position per distinct
    prompt through the head on its own, and its backward writes a whole vocabulary × hidden gradient for that one
    position: an outer product plus a sum with the other calls' gradient, ≈ 0.2 s per micro-batch of SmolLM2.)"""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    distinct, row_of = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    width = prompt_ids.shape[1] - 1  # shared: all but the last column (left-padded, it holds every prompt's last token)
    saved_positions = (len(prompt_ids) - len(distinct)) * width
    if saved_positions == 0 or 2 * sum(p.numel() for p in model.parameters()) * saved_positions < min_saved_flops:
        return None
    pmask = distinct[:, width + 1:-1]  # the shared positions' mask (distinct rows are [ids | mask], Tp each)
    if not bool(pmask.any(-1).all()):
        return None  # a one-token prompt: a fully masked row in the shared call
    prompt_embeds = None
    if inputs_embeds is not None:  # any row of each distinct prompt: their prompt positions are the same
        some_row = torch.empty(len(distinct), dtype=torch.long, device=row_of.device)
        some_row[row_of] = torch.arange(len(row_of), device=row_of.device)
        prompt_embeds = inputs_embeds[some_row, :width]
    out = model(**_inputs(distinct[:, :width], prompt_embeds), attention_mask=pmask, position_ids=position_ids(pmask),
                use_cache=True, past_key_values=DynamicCache(config=model.config),
                logits_to_keep=0 if all_positions else 1)
    cache = out.past_key_values
    if cache is None or not all(type(layer) is DynamicLayer for layer in cache.layers if layer.is_initialized):
        return None  # sliding-window, linear-attention...: the plain forward handles their masks
    # Row r continues distinct prompt row_of[r]; the gathers' backward sums over a group. index_select, not
    # advanced indexing: its backward (index_add_) adds in a fixed order, where indexing's (index_put_ with
    # accumulate) adds with atomics across threads, so repeated rows made the update's gradients differ run to run.
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys.index_select(0, row_of), layer.values.index_select(0, row_of)
    attn = torch.cat([prompt_mask, response_mask.long()], 1)[:, :-1]
    rest_ids = torch.cat([prompt_ids[:, width:], response_ids[:, :-1]], 1)
    rest = model(**_inputs(rest_ids, None if inputs_embeds is None else inputs_embeds[:, width:]),
                 attention_mask=attn, position_ids=position_ids(attn)[:, width:], past_key_values=cache,
                 use_cache=True, logits_to_keep=0)
    return [out.logits.index_select(0, row_of), rest.logits] if all_positions else [rest.logits]
