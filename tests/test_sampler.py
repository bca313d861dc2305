"""fast_generate against model.generate and a teacher-forced forward pass, on tiny randomly initialised models."""

import math
from contextlib import nullcontext

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.generation.logits_process import TopPLogitsWarper

from moalign.engine.embedding_rows import EmbeddingRowGradients
from moalign.engine.linear_grads import LinearGradientsInPlace
from moalign.engine.rollout import generate, micro_batch_logprobs, response_logprobs
from moalign.engine.sampler import (
    fast_generate,
    nucleus_filter,
    sample_from_logits,
    survivor_order,
)
from moalign.errors import UserError

torch.set_num_threads(1)

PAD, EOS, VOCAB = 0, 1, 32
MAX_NEW = 20


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token i is the word ``w{i}``; 0 and 1 are the special pad and EOS tokens."""
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, VOCAB)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def tiny_model(config_class, model_class, **extra) -> torch.nn.Module:
    """Random weights large enough (init 0.2) for confident predictions; the EOS output row is scaled up so that
    greedy decoding stops after some prompts and not after others. ``extra`` overrides or adds config fields."""
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
    config = config_class(**{**shape, **extra}, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    model = model_class(config).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 2
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model(LlamaConfig, LlamaForCausalLM)


def random_prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8, (n,), generator=g)
    return [torch.randint(2, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def groups_of(prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[int]]:
    """Each prompt repeated n times, and the group id of every row."""
    return [p for p in prompts for _ in range(n)], [g for g in range(len(prompts)) for _ in range(n)]


def both(model, tokenizer, prompts, **kwargs):
    index = list(range(len(prompts)))
    args = (model, tokenizer, prompts, index, index, kwargs.pop("max_new_tokens", MAX_NEW))
    return generate(*args, **kwargs), fast_generate(*args, **kwargs)


def expected_mask(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask through the first EOS and the truncation flags, by a plain loop over each row."""
    mask, truncated = torch.zeros(ids.shape), torch.ones(len(ids), dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        for t, token in enumerate(row):
            mask[b, t] = 1
            if token == EOS:
                truncated[b] = False
                break
    return mask, truncated


def assert_well_formed(rollout):
    mask, truncated = expected_mask(rollout.response_ids)
    assert torch.equal(rollout.response_mask, mask)
    assert torch.equal(rollout.truncated, truncated)
    assert (rollout.response_ids[mask == 0] == PAD).all()
    assert (rollout.sampler_logprobs[mask == 0] == 0).all()
    assert (rollout.sampler_logprobs[mask == 1] <= 0).all()


# ---- against model.generate ---------------------------------------------------------------------------------

def test_greedy_matches_generate_with_early_stops(llama, tokenizer):
    reference, fast = both(llama, tokenizer, random_prompts(12), greedy=True)
    lengths = reference.response_mask.sum(-1)
    # the case being tested: rows stop at several different lengths, others run to the budget
    assert reference.truncated.any() and (~reference.truncated).sum() >= 3 and len(set(lengths.tolist())) >= 4
    assert torch.equal(fast.response_ids, reference.response_ids)
    assert torch.equal(fast.response_mask, reference.response_mask)
    assert torch.equal(fast.truncated, reference.truncated)
    assert torch.equal(fast.prompt_ids, reference.prompt_ids) and torch.equal(fast.prompt_mask, reference.prompt_mask)
    assert fast.texts == reference.texts
    assert_well_formed(fast)


def test_greedy_matches_generate_in_chunks(llama, tokenizer):
    reference, fast = both(llama, tokenizer, random_prompts(11, seed=2), greedy=True, batch_size=4)
    assert torch.equal(fast.response_ids, reference.response_ids)
    assert torch.equal(fast.truncated, reference.truncated)


def other_model(name: str) -> torch.nn.Module:
    if name == "qwen2":  # attention biases
        return tiny_model(Qwen2Config, Qwen2ForCausalLM)
    if name == "qwen3":  # per-head q/k norms (the lean decode step runs them)
        return tiny_model(Qwen3Config, Qwen3ForCausalLM, head_dim=8)
    if name == "mistral_sliding_window":  # not a plain cache: the sampler keeps transformers' own cache for it
        return tiny_model(MistralConfig, MistralForCausalLM, sliding_window=4)
    from peft import (  # a LoRA-wrapped policy, as model.lora makes it
        LoraConfig,
        get_peft_model,
    )

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(tiny_model(LlamaConfig, LlamaForCausalLM), lora).eval()


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral_sliding_window", "llama_lora"])
def test_greedy_matches_generate_other_architectures(name, tokenizer):
    model = other_model(name)
    reference, fast = both(model, tokenizer, random_prompts(10, seed=3), greedy=True)
    assert (~reference.truncated).any()
    assert torch.equal(fast.response_ids, reference.response_ids)
    assert torch.allclose(fast.sampler_logprobs, response_logprobs(model, fast, 4), atol=1e-4)


# ---- log-probs against a teacher-forced forward pass --------------------------------------------------------

@pytest.mark.parametrize("greedy,temperature", [(True, 1.0), (False, 1.0), (False, 0.7)])
def test_sampler_logprobs_match_forward(llama, tokenizer, greedy, temperature):
    prompts, groups = groups_of(random_prompts(4, seed=4), 3)
    torch.manual_seed(0)
    rollout = fast_generate(llama, tokenizer, prompts, groups, groups, MAX_NEW, temperature=temperature,
                            greedy=greedy)
    assert_well_formed(rollout)
    assert (~rollout.truncated).any()
    forward = response_logprobs(llama, rollout, micro_batch_size=5, temperature=temperature)
    assert torch.allclose(rollout.sampler_logprobs, forward, atol=1e-4)


def test_top_p_logprobs_are_those_of_the_full_distribution(llama, tokenizer):
    prompts, groups = groups_of(random_prompts(3, seed=5), 4)
    torch.manual_seed(0)
    rollout = fast_generate(llama, tokenizer, prompts, groups, groups, MAX_NEW, temperature=0.8, top_p=0.7)
    assert_well_formed(rollout)
    assert torch.allclose(rollout.sampler_logprobs, response_logprobs(llama, rollout, 6, 0.8), atol=1e-4)


# ---- randomness ---------------------------------------------------------------------------------------------

def test_same_seed_same_samples_other_seed_other_samples(llama, tokenizer):
    prompts, groups = groups_of(random_prompts(4, seed=6), 4)

    def run(seed):
        torch.manual_seed(seed)
        return fast_generate(llama, tokenizer, prompts, groups, groups, MAX_NEW)

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.sampler_logprobs, again.sampler_logprobs)
    assert not torch.equal(first.response_ids, other.response_ids)


def test_given_uniforms_fix_each_completion_whatever_the_batch(llama, tokenizer):
    """With ``uniforms`` a completion's tokens depend on its own row of draws only: alone or among other prompts (that
    finish at other steps, so rows move in the cache), in chunks or not, and with the global RNG anywhere."""
    prompts = random_prompts(6, seed=4)
    uniforms = torch.rand((6, MAX_NEW), generator=torch.Generator().manual_seed(3))
    index = list(range(6))
    together = fast_generate(llama, tokenizer, prompts, index, index, MAX_NEW, uniforms=uniforms, pack_weights=False)
    assert together.response_mask.sum(1).unique().numel() > 1  # the completions end at different steps
    torch.manual_seed(123)
    chunked = fast_generate(llama, tokenizer, prompts, index, index, MAX_NEW, uniforms=uniforms, batch_size=4,
                            pack_weights=False)
    assert torch.equal(together.response_ids, chunked.response_ids)
    for i in (1, 4):
        alone = fast_generate(llama, tokenizer, [prompts[i]], [0], [0], MAX_NEW, uniforms=uniforms[i:i + 1],
                              pack_weights=False)
        width = alone.response_ids.shape[1]
        assert torch.equal(alone.response_ids[0], together.response_ids[i, :width])
    other = fast_generate(llama, tokenizer, prompts, index, index, MAX_NEW, uniforms=1 - uniforms, pack_weights=False)
    assert not torch.equal(other.response_ids, together.response_ids)
    with pytest.raises(UserError, match="uniforms has shape"):
        fast_generate(llama, tokenizer, prompts, index, index, MAX_NEW, uniforms=uniforms[:, :3])


def test_given_uniforms_are_the_inverse_cdf_draws():
    """u picks the first token whose cumulative probability exceeds it (tokens 0.2 | 0.5 | 0.3)."""
    logits = torch.tensor([0.2, 0.5, 0.3]).log().repeat(4, 1)
    index, logprobs = sample_from_logits(logits.clone(), torch.tensor([0.1, 0.25, 0.69, 0.71]))
    assert index.tolist() == [0, 1, 1, 2]
    assert torch.allclose(logprobs.exp(), torch.tensor([0.2, 0.5, 0.5, 0.3]))


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_group_samples_follow_the_model_distribution(llama, tokenizer, temperature):
    # One prompt repeated 4000 times (prefilled once, its cache copied to every row): the first tokens' frequencies
    # must match softmax(z / τ) of a plain forward pass. 4000 draws over 32 tokens give TV ≈ 0.03 at most.
    prompt = random_prompts(1, seed=9)[0]
    n = 4000
    torch.manual_seed(0)
    rollout = fast_generate(llama, tokenizer, [prompt] * n, [0] * n, [0] * n, max_new_tokens=1,
                            temperature=temperature)
    with torch.no_grad():
        logits = llama(torch.tensor([prompt])).logits[0, -1]
    probs = (logits / temperature).softmax(-1)
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=VOCAB).float()
    other_temperature = (logits / (1.7 - temperature)).softmax(-1)
    assert total_variation(counts, other_temperature) > 0.08  # the test can tell temperatures apart
    assert total_variation(counts, probs) < 0.04


def test_sample_from_probabilities_frequencies_and_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20_000, 1)
    torch.manual_seed(0)
    counts = torch.bincount(sample_from_logits(probs.log())[0], minlength=6).float()
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts / counts.sum(), probs[0], atol=0.015)


def test_sample_never_picks_a_token_without_mass(monkeypatch):
    # u = total (what float rounding of u·total can give) lands past the CDF: the row must be redrawn
    probs = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, **kw))
    index, _ = sample_from_logits(probs.log())
    assert (probs.gather(-1, index[:, None]) > 0).all()


@pytest.mark.parametrize("block", [4, 256])  # several blocks, the last one partial; one padded block
def test_sample_from_logits_frequencies_logprobs_and_zero_mass(monkeypatch, block):
    import moalign.engine.sampler as sampler

    monkeypatch.setattr(sampler, "CDF_BLOCK", block)
    logits = torch.tensor([[0.3, -math.inf, 1.2, -0.5, -math.inf, 2.0, 0.0, -1.0, 0.7, -math.inf]]) * 1.5
    probs = logits.softmax(-1)[0]
    torch.manual_seed(0)
    index, logprobs = sample_from_logits(logits.repeat(40_000, 1))  # (overwrites its input: a copy here)
    counts = torch.bincount(index, minlength=10).float()
    assert counts[probs == 0].sum() == 0  # tokens without mass, inside blocks and at the end
    assert torch.allclose(counts / counts.sum(), probs, atol=0.01)
    assert total_variation(counts, (logits * 0.5).softmax(-1)[0]) > 0.1  # the check can tell another law apart
    torch.testing.assert_close(logprobs, logits.log_softmax(-1)[0][index], rtol=0, atol=1e-6)


def test_sample_from_logits_redraws_rows_rounding_sends_past_the_mass(monkeypatch):
    import moalign.engine.sampler as sampler

    monkeypatch.setattr(sampler, "CDF_BLOCK", 4)
    logits = torch.tensor([[0.0, 1.0, -math.inf, -math.inf, -math.inf, -math.inf],
                           [0.5, -math.inf, 0.2, -math.inf, -math.inf, -math.inf]])
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, **kw))  # u = total
    index, logprobs = sample_from_logits(logits.clone())
    assert (logits.gather(-1, index[:, None]) > -math.inf).all()
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(-1, index[:, None]).squeeze(1))


def test_sample_from_logits_on_a_real_vocabulary_size():
    logits = torch.randn(64, 49_157, generator=torch.Generator().manual_seed(3)) * 3  # 193 blocks, one partial
    torch.manual_seed(1)
    index, logprobs = sample_from_logits(logits.clone())
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(-1, index[:, None]).squeeze(1),
                               rtol=0, atol=1e-5)
    assert len(set(index.tolist())) > 32  # distinct rows draw distinct tokens


# ---- pieces -------------------------------------------------------------------------------------------------

def test_nucleus_filter_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: (nucleus_filter(logits, p) > -math.inf)[0].tolist()  # noqa: E731
    assert kept(0.75) == [True, True, False, False]  # 0.5 + 0.3 ≥ 0.75
    assert kept(0.85) == [True, True, True, False]  # 0.5 + 0.3 < 0.85
    assert kept(0.1) == [True, False, False, False]  # the top token always stays
    assert torch.equal(nucleus_filter(logits, 0.85)[0, :3], logits[0, :3])


def test_nucleus_filter_matches_transformers():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 2
    for top_p in (0.3, 0.9):
        reference = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(nucleus_filter(logits, top_p) == -math.inf, reference == -math.inf)


def test_survivor_order_fills_holes_from_the_tail():
    finished = torch.tensor([False, True, False, True, False, False])
    # 4 rows stay: rows 1 and 3 are free, rows 4 and 5 move into them
    assert survivor_order(finished).tolist() == [0, 4, 2, 5]
    assert survivor_order(torch.tensor([False, False, True])).tolist() == [0, 1]
    assert survivor_order(torch.tensor([True, False, False])).tolist() == [2, 1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments_raise_user_errors(llama, tokenizer, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(UserError, match=match):
        fast_generate(llama, tokenizer, [[2, 3]], [0], [0], **kwargs)


def test_mismatched_and_empty_inputs_raise_user_errors(llama, tokenizer):
    with pytest.raises(UserError, match="group ids"):
        fast_generate(llama, tokenizer, [[2, 3], [4]], [0, 1], [0], 4)
    with pytest.raises(UserError, match="empty prompt"):
        fast_generate(llama, tokenizer, [[2, 3], []], [0, 1], [0, 1], 4)


def test_rollout_tensors_work_under_autograd(llama, tokenizer):
    # the decode loop runs in inference mode; what it returns must still serve as gather indices of a backward pass
    rollout = fast_generate(llama, tokenizer, random_prompts(3), [0, 1, 2], [0, 1, 2], 6)
    assert not any(t.is_inference() for t in (rollout.response_ids, rollout.response_mask, rollout.sampler_logprobs))
    loss = -response_logprobs(llama, rollout, micro_batch_size=3, grad=True).sum()
    loss.backward()
    assert llama.lm_head.weight.grad is not None
    llama.zero_grad(set_to_none=True)


# ---- teacher-forced log-probs with a group's prompt run once ---------------------------------------------------

def logprobs_and_gradients(model, rollout, share_prompts, micro_batch_size):
    """Log-probs [B, Tr] and the gradient of a fixed random weighting of them w.r.t. every parameter."""
    model.zero_grad(set_to_none=True)
    lp = response_logprobs(model, rollout, micro_batch_size, temperature=0.7, grad=True, share_prompts=share_prompts)
    weights = torch.randn(lp.shape, generator=torch.Generator().manual_seed(0))
    (lp * weights).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return lp.detach(), grads


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("micro_batch_size", [3, 4, 12])  # groups split across micro-batches, whole, all at once
def test_shared_prompt_forward_equals_plain_forward(name, micro_batch_size, tokenizer):
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[name]
    model = tiny_model(config_class, model_class)
    prompts, groups = groups_of(random_prompts(3, seed=5), 4)
    torch.manual_seed(0)
    rollout = fast_generate(model, tokenizer, prompts, groups, groups, MAX_NEW)
    assert len(set(rollout.num_tokens)) > 1  # rows end at different lengths: padding inside the shared batch
    plain_lp, plain_grads = logprobs_and_gradients(model, rollout, False, micro_batch_size)
    shared_lp, shared_grads = logprobs_and_gradients(model, rollout, True, micro_batch_size)
    assert torch.allclose(shared_lp, plain_lp, atol=1e-5)
    assert plain_grads.norm() > 0
    assert (shared_grads - plain_grads).norm() / plain_grads.norm() < 1e-5


def test_shared_prompt_forward_runs_each_prompt_once(llama, tokenizer):
    prompts, groups = groups_of(random_prompts(2, seed=3), 3)
    rollout = fast_generate(llama, tokenizer, prompts, groups, groups, 6)
    seen = []
    hook = llama.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        response_logprobs(llama, rollout, micro_batch_size=6, share_prompts=True)
    finally:
        hook.remove()
    width, tr = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    # the 2 distinct prompts but their last token, then each of the 6 rows: that token and its response but the last
    assert seen == [(2, width - 1), (6, tr)]


@pytest.mark.parametrize("share_prompts", [False, True])
def test_micro_batch_runs_only_up_to_its_longest_response(share_prompts, tokenizer):
    """A micro-batch whose responses all end early runs that many response positions, with the log-probs and
    gradients of the full-width forward (which a longer row in the same micro-batch forces)."""
    model = tiny_model(LlamaConfig, LlamaForCausalLM)
    prompts, groups = groups_of(random_prompts(3, seed=5), 4)
    torch.manual_seed(0)
    rollout = fast_generate(model, tokenizer, prompts, groups, groups, MAX_NEW)
    lengths = rollout.response_mask.sum(-1)
    short, long = int(lengths.argmin()), int(lengths.argmax())
    width, short_len = rollout.response_ids.shape[1], int(lengths[short])
    assert short_len < width == int(lengths[long])
    weights = torch.randn(rollout.response_ids.shape, generator=torch.Generator().manual_seed(0))

    def run(rows: list[int]):
        model.zero_grad(set_to_none=True)
        seen = []
        hook = model.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
        try:
            part = rollout.select(torch.tensor(rows))
            lp = micro_batch_logprobs(model, part.prompt_ids, part.prompt_mask, part.response_ids,
                                      part.response_mask, grad=True, share_prompts=share_prompts)
        finally:
            hook.remove()
        (lp[0] * weights[short]).sum().backward()
        return lp[0].detach(), torch.cat([p.grad.flatten() for p in model.parameters()]), seen[-1][1]

    alone_lp, alone_grads, alone_positions = run([short, short])
    full_lp, full_grads, full_positions = run([short, long])
    assert alone_lp.shape == full_lp.shape == (width,)
    assert not alone_lp[short_len:].any()
    assert torch.allclose(alone_lp, full_lp, atol=1e-6)
    assert (alone_grads - full_grads).norm() / full_grads.norm() < 1e-5
    assert full_positions - alone_positions == width - short_len  # the last call ran that many fewer positions


def test_one_token_prompt_falls_back_to_the_plain_forward(llama, tokenizer):
    """The shared call runs all prompt positions but the last: a one-token prompt would leave it a fully masked row."""
    prompts, groups = groups_of([[5], [7, 8, 9]], 3)
    torch.manual_seed(0)
    rollout = fast_generate(llama, tokenizer, prompts, groups, groups, 6)
    calls = []
    hook = llama.model.embed_tokens.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        shared = response_logprobs(llama, rollout, 6, share_prompts=True)
    finally:
        hook.remove()
    assert calls == [6]  # one plain forward over the 6 rows
    assert torch.allclose(shared, response_logprobs(llama, rollout, 6, share_prompts=False), atol=1e-6)


# ---- the input embedding's gradient added on the rows used -------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_embedding_row_gradients_equal_autograds(tied, tokenizer):
    """Same gradients as autograd's dense embedding backward, for every parameter; the pad row (``padding_idx``,
    looked up in the padded prompts and responses) gets none. Two micro-batches accumulate, as in the update."""
    model = tiny_model(LlamaConfig, LlamaForCausalLM, tie_word_embeddings=tied)
    assert model.model.embed_tokens.padding_idx == PAD
    prompts, groups = groups_of(random_prompts(3, seed=5), 4)
    torch.manual_seed(0)
    rollout = fast_generate(model, tokenizer, prompts, groups, groups, MAX_NEW)
    assert bool((rollout.prompt_ids == PAD).any()) and bool((rollout.response_ids == PAD).any())
    weights = torch.randn(rollout.response_ids.shape, generator=torch.Generator().manual_seed(0))

    def gradients(rows: EmbeddingRowGradients | None) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with rows or nullcontext():
            for sl in (slice(0, 4), slice(4, 12)):  # the second micro-batch holds two groups
                lp = micro_batch_logprobs(model, rollout.prompt_ids[sl], rollout.prompt_mask[sl],
                                          rollout.response_ids[sl], rollout.response_mask[sl], grad=True,
                                          share_prompts=True)
                (lp * weights[sl]).sum().backward()
                if rows is not None:
                    assert len(rows.records) == 2  # the shared prompts' lookup and the rows'
                    rows.flush()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    reference = gradients(None)
    rows = EmbeddingRowGradients.for_model(model)
    assert rows is not None
    by_rows = gradients(rows)
    assert rows.records == [] and not model.model.embed_tokens._forward_hooks  # nothing left behind
    assert reference.keys() == by_rows.keys()
    for name, grad in reference.items():
        assert torch.allclose(by_rows[name], grad, atol=1e-6, rtol=1e-5), name
    embedding = by_rows["model.embed_tokens.weight"]
    if not tied:  # (tied, the LM head's gradient reaches the pad row)
        assert not embedding[PAD].any()
    assert embedding[2:].abs().sum() > 0


def test_embedding_row_gradients_only_where_they_apply():
    model = tiny_model(LlamaConfig, LlamaForCausalLM)
    model.model.embed_tokens.weight.requires_grad_(False)
    assert EmbeddingRowGradients.for_model(model) is None  # a frozen embedding (LoRA, a trained top only)
    model.model.embed_tokens.weight.requires_grad_(True)
    model.model.embed_tokens.max_norm = 1.0
    assert EmbeddingRowGradients.for_model(model) is None  # max_norm renormalizes rows in the forward


# ---- linear layers' weight gradients accumulated in place ---------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_linear_gradients_in_place_equal_autograds(tied, tokenizer):
    """With the embedding's row gradients as well (as the update runs them), every parameter's gradient equals
    autograd's: shared prompts (each layer used twice per micro-batch), two micro-batches accumulating, biases."""
    model = tiny_model(Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=tied)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    prompts, groups = groups_of(random_prompts(3, seed=6), 4)
    torch.manual_seed(0)
    rollout = fast_generate(model, tokenizer, prompts, groups, groups, MAX_NEW)
    weights = torch.randn(rollout.response_ids.shape, generator=torch.Generator().manual_seed(1))

    def gradients(in_place: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        rows = EmbeddingRowGradients.for_model(model) if in_place else None
        linear = LinearGradientsInPlace.for_model(model) if in_place else None
        with rows or nullcontext(), linear or nullcontext():
            for sl in (slice(0, 4), slice(4, 12)):
                lp = micro_batch_logprobs(model, rollout.prompt_ids[sl], rollout.prompt_mask[sl],
                                          rollout.response_ids[sl], rollout.response_mask[sl], grad=True,
                                          share_prompts=True)
                (lp * weights[sl]).sum().backward()
                if rows is not None:
                    rows.flush()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    reference = gradients(False)
    in_place = gradients(True)
    linear_layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(LinearGradientsInPlace.for_model(model).layers) == len(linear_layers)
    assert not any("forward" in vars(m) for m in linear_layers)  # the layers' own forward is back
    assert reference.keys() == in_place.keys()
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(in_place[name], grad, atol=1e-6, rtol=1e-5), name


def test_linear_gradients_in_place_only_where_they_apply():
    model = tiny_model(LlamaConfig, LlamaForCausalLM, tie_word_embeddings=False)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight.requires_grad_(False)  # frozen (LoRA's base, a trunk below the trained top)
    hooked = model.model.layers[0].mlp.down_proj
    hooked.weight.register_post_accumulate_grad_hook(lambda p: None)  # a hook that would not run
    manager = LinearGradientsInPlace.for_model(model)
    assert layer not in manager.layers and hooked not in manager.layers
    assert model.lm_head in manager.layers
    x = torch.randn(3, 5, model.config.hidden_size)
    with manager:
        assert "forward" in vars(model.lm_head) and "forward" not in vars(layer)
        with torch.no_grad():  # without gradients: the plain product
            assert torch.equal(model.lm_head(x), torch.nn.functional.linear(x, model.lm_head.weight))
        assert LinearGradientsInPlace.for_model(model) is None  # patched layers are not patched twice
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with manager:
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in model.modules())  # restored on an exception too
    model.requires_grad_(False)
    assert LinearGradientsInPlace.for_model(model) is None


def test_linear_gradient_in_place_of_one_layer_against_the_formula():
    """W.grad = Σ over uses of gᵀ x, added to what ``.grad`` held; the input's gradient is g W."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x1, x2 = torch.randn(2, 5, 4, requires_grad=True), torch.randn(7, 4)
    g1, g2 = torch.randn(2, 5, 3), torch.randn(7, 3)
    layer.weight.grad = torch.ones(3, 4)
    with LinearGradientsInPlace.for_model(layer):
        ((layer(x1) * g1).sum() + (layer(x2) * g2).sum()).backward()
    expected = torch.ones(3, 4) + g1.reshape(-1, 3).t() @ x1.detach().reshape(-1, 4) + g2.t() @ x2
    assert torch.allclose(layer.weight.grad, expected, atol=1e-6)
    assert torch.allclose(x1.grad, g1 @ layer.weight.detach(), atol=1e-6)
    assert torch.allclose(layer.bias.grad, g1.sum((0, 1)) + g2.sum(0), atol=1e-6)
    layer.zero_grad(set_to_none=True)
    with LinearGradientsInPlace.for_model(layer):
        (layer(x2) * g2).sum().backward()  # no input needs a gradient (as a frozen trunk's output)
    assert torch.allclose(layer.weight.grad, g2.t() @ x2, atol=1e-6)


def test_sliding_window_cache_falls_back_to_the_plain_forward(tokenizer):
    model = tiny_model(MistralConfig, MistralForCausalLM, sliding_window=4)
    prompts, groups = groups_of(random_prompts(2, seed=3), 3)
    torch.manual_seed(0)
    rollout = fast_generate(model, tokenizer, prompts, groups, groups, 8)
    shared = response_logprobs(model, rollout, 6, share_prompts=True)
    assert torch.allclose(shared, response_logprobs(model, rollout, 6, share_prompts=False), atol=1e-5)


def test_prompts_are_shared_only_where_it_saves_work(llama, tokenizer):
    prompts, groups = groups_of(random_prompts(2, seed=3), 3)
    rollout = fast_generate(llama, tokenizer, prompts, groups, groups, 6)
    calls = []
    hook = llama.model.embed_tokens.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        response_logprobs(llama, rollout, micro_batch_size=6)  # a 20 k-parameter model: a second call costs more
    finally:
        hook.remove()
    assert calls == [6]  # one plain forward over the 6 rows
