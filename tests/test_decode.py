"""The lean decode step: bit-identical logits to the model's forward, and declined where it does not apply."""

import copy
from contextlib import nullcontext

import pytest
import torch
from test_sampler import PAD, tiny_model, word_tokenizer
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Olmo2Config,
                          Olmo2ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from moalign.engine.decode import lean_decoder
from moalign.engine.packed import packed_linear_weights
from moalign.engine.sampler import SlotCache, fast_generate, prefill


def tiny(config_class, model_class, **extra):
    return tiny_model(config_class, model_class, num_hidden_layers=3, **extra)


def decode_both_ways(model, prompts, steps=12, pack=False):
    """Logits of ``steps`` greedy decode steps, through the model's forward and through the lean decoder, each on
    its own copy of the prefill cache."""
    width = max(map(len, prompts))
    with torch.inference_mode(), packed_linear_weights(model) if pack else nullcontext():
        logits, cache, prompt_mask = prefill(model, prompts, PAD, width + steps)
        assert isinstance(cache, SlotCache)
        decoder = lean_decoder(model)
        assert decoder is not None
        mask = torch.ones(len(prompts), width + steps, dtype=torch.long)
        mask[:, :width] = prompt_mask
        start = prompt_mask.sum(-1)
        runs = []
        for lean in (False, True):
            c, tokens, out = copy.deepcopy(cache), logits.argmax(-1), []
            for s in range(steps):
                if lean:
                    z = decoder.step(tokens, mask[:, :width + s + 1], start + s, c)
                else:
                    z = model(input_ids=tokens[:, None], attention_mask=mask[:, :width + s + 1],
                              position_ids=(start + s)[:, None], past_key_values=c, use_cache=True).logits[:, -1]
                out.append(z.clone())
                tokens = z.argmax(-1)
            runs.append(torch.stack(out))
    return runs


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15], [10, 11]]  # different lengths (padding), one repeated


@pytest.mark.parametrize("make", [
    lambda: tiny(LlamaConfig, LlamaForCausalLM),
    lambda: tiny(LlamaConfig, LlamaForCausalLM, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    lambda: tiny(Qwen2Config, Qwen2ForCausalLM),
    lambda: tiny(Qwen3Config, Qwen3ForCausalLM, head_dim=8),
    lambda: tiny(MistralConfig, MistralForCausalLM, sliding_window=None),
], ids=["llama", "llama-biases-tied", "qwen2", "qwen3", "mistral"])
def test_logits_bit_identical_to_the_forward(make):
    model = make()
    plain, lean = decode_both_ways(model, PROMPTS)
    assert torch.equal(plain, lean)
    assert plain.abs().max() > 0 and len(set(plain[-1].argmax(-1).tolist())) > 1  # a real, varied computation


def test_bit_identical_with_packed_weights():
    model = tiny(LlamaConfig, LlamaForCausalLM, num_key_value_heads=4)  # also plain multi-head attention
    plain, lean = decode_both_ways(model, PROMPTS, pack=True)
    assert torch.equal(plain, lean)


def test_eager_attention_bit_identical():
    model = tiny(LlamaConfig, LlamaForCausalLM, attn_implementation="eager")
    plain, lean = decode_both_ways(model, PROMPTS)
    assert torch.equal(plain, lean)


def test_fast_generate_same_samples_with_and_without_it():
    model, tok = tiny(LlamaConfig, LlamaForCausalLM), word_tokenizer()
    prompts = [p for p in PROMPTS[:3] for _ in range(3)]
    index = [i for i in range(3) for _ in range(3)]
    runs = []
    for lean in (True, False):
        torch.manual_seed(7)
        runs.append(fast_generate(model, tok, prompts, index, index, 16, lean=lean))
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.equal(runs[0].sampler_logprobs, runs[1].sampler_logprobs)
    assert runs[0].response_mask.sum() > len(prompts)  # more than one token per row was sampled


def test_qwen3_head_norms_take_part():
    """The lean step must apply Qwen3's q/k norms: scaling their weights changes its logits as it changes the
    forward's (a step that skipped them would be bit-identical to the forward only by accident)."""
    model = tiny(Qwen3Config, Qwen3ForCausalLM, head_dim=8)
    before, _ = decode_both_ways(model, PROMPTS, steps=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(3.0)
            layer.self_attn.k_norm.weight.mul_(0.5)
    plain, lean = decode_both_ways(model, PROMPTS, steps=2)
    assert torch.equal(plain, lean) and not torch.equal(plain, before)


def test_declined_where_it_does_not_apply():
    assert lean_decoder(tiny(Olmo2Config, Olmo2ForCausalLM)) is None  # another layer class (norms over all heads)
    assert lean_decoder(tiny(MistralConfig, MistralForCausalLM, sliding_window=4)) is None  # a sliding window
    assert lean_decoder(tiny(Qwen3Config, Qwen3ForCausalLM, head_dim=8, use_sliding_window=True,
                             sliding_window=4, max_window_layers=1)) is None
    qwen_sliding = tiny(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=4,
                        max_window_layers=1)
    assert lean_decoder(qwen_sliding) is None  # a sliding-window layer
    hooked = tiny(LlamaConfig, LlamaForCausalLM)
    handle = hooked.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert lean_decoder(hooked) is None  # a hook the direct calls would skip
    handle.remove()
    assert lean_decoder(hooked) is not None
    assert lean_decoder(tiny(LlamaConfig, LlamaForCausalLM, attn_implementation="flex_attention")) is None
