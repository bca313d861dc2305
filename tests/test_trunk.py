"""engine.trunk: the frozen trunk run once, then only the top blocks, gives the whole model's log-probs and
gradients; the split is undone on exit; architectures it cannot split exactly are declined."""

import contextlib
import copy
import math

import pytest
import torch
from test_engine import run
from test_sampler import groups_of, random_prompts, tiny_model, word_tokenizer
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

from moalign.config import ModelConfig
from moalign.engine.metrics import read_metrics
from moalign.engine.rollout import response_logprobs
from moalign.engine.sampler import fast_generate
from moalign.engine.trunk import FrozenTrunk
from moalign.models.loading import prepare_trainable

MAX_NEW = 12


def four_block_llama(trained_blocks=1):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, eos_token_id=1,
                         pad_token_id=0, bos_token_id=None)
    return prepare_trainable(LlamaForCausalLM(config).eval(), ModelConfig(train_last_k_layers=trained_blocks))


def sampled(model):
    prompts, groups = groups_of(random_prompts(3, seed=5), 4)
    torch.manual_seed(0)
    rollout = fast_generate(model, word_tokenizer(), prompts, groups, groups, MAX_NEW)
    assert len(set(rollout.num_tokens)) > 1  # rows of different lengths: padding inside the batch
    return rollout


def logprobs_and_trained_grads(model, rollout, share_prompts, micro_batch_size, trunk=None):
    """Log-probs [B, Tr] and the gradient of a fixed random weighting of them w.r.t. the trained parameters, from
    the whole model or (with ``trunk``) from the top blocks on the trunk's states."""
    hidden = None
    if trunk is not None:
        hidden = trunk.hidden_states(model, rollout, micro_batch_size)
        assert hidden.shape == (len(rollout), rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1] - 1,
                                model.config.hidden_size)
    model.zero_grad(set_to_none=True)
    with trunk.top_only(model) if trunk is not None else contextlib.nullcontext():
        lp = response_logprobs(model, rollout, micro_batch_size, temperature=0.7, grad=True,
                               share_prompts=share_prompts, trunk_hidden=hidden)
    (lp * torch.randn(lp.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return lp.detach(), grads


@pytest.mark.parametrize("share_prompts", [False, True])
@pytest.mark.parametrize("micro_batch_size", [3, 12])  # groups split across micro-batches, all rows at once
def test_top_blocks_on_trunk_states_equal_the_whole_model(share_prompts, micro_batch_size):
    model = four_block_llama(trained_blocks=1)
    trunk = FrozenTrunk.for_model(model, 1)
    assert trunk is not None and trunk.split == 3
    rollout = sampled(model)
    whole_lp, whole_grads = logprobs_and_trained_grads(model, rollout, share_prompts, micro_batch_size)
    top_lp, top_grads = logprobs_and_trained_grads(model, rollout, share_prompts, micro_batch_size, trunk)
    assert torch.allclose(top_lp, whole_lp, atol=1e-5)
    assert whole_grads.norm() > 0 and top_grads.shape == whole_grads.shape
    assert (top_grads - whole_grads).norm() / whole_grads.norm() < 1e-5


def test_reference_copy_runs_on_the_policy_trunk():
    """The trainer feeds the policy's trunk states to the reference's top blocks: exact while the trunk is frozen
    even after the top blocks of the policy moved."""
    policy = four_block_llama(trained_blocks=2)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trunk = FrozenTrunk.for_model(policy, 2)
    rollout = sampled(policy)
    hidden = trunk.hidden_states(policy, rollout, 6)
    with trunk.top_only(reference):
        split = response_logprobs(reference, rollout, 6, trunk_hidden=hidden)
    whole = response_logprobs(reference, rollout, 6)
    assert torch.allclose(split, whole, atol=1e-5)
    assert not torch.allclose(whole, response_logprobs(policy, rollout, 6), atol=1e-3)  # the top blocks differ


def test_trunk_states_only_go_with_the_top_blocks():
    model = four_block_llama(trained_blocks=1)
    trunk = FrozenTrunk.for_model(model, 1)
    rollout = sampled(model)
    hidden = trunk.hidden_states(model, rollout, 6)
    with pytest.raises(ValueError, match="top blocks only"):
        response_logprobs(model, rollout, 6, trunk_hidden=hidden)  # the whole model
    with pytest.raises(ValueError, match="top blocks only"), trunk.top_only(model):
        response_logprobs(model, rollout, 6)  # top blocks fed token embeddings


def test_the_split_is_undone_even_after_an_error():
    model = four_block_llama(trained_blocks=1)
    trunk = FrozenTrunk.for_model(model, 1)
    layers, head = model.model.layers, model.lm_head
    indices = [block.self_attn.layer_idx for block in layers]
    with pytest.raises(RuntimeError), trunk.top_only(model):
        assert len(model.model.layers) == 1 and model.model.layers[0].self_attn.layer_idx == 0
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), trunk.bottom_only(model):
        assert len(model.model.layers) == 3 and isinstance(model.lm_head, torch.nn.Identity)
        raise RuntimeError("boom")
    assert model.model.layers is layers and model.lm_head is head
    assert [block.self_attn.layer_idx for block in layers] == indices == [0, 1, 2, 3]
    assert not hasattr(model, "_moalign_top_only")


def test_gemma_scales_its_embedding_inside_the_embedding_module_so_it_splits():
    gemma = tiny_model(GemmaConfig, GemmaForCausalLM, head_dim=8).requires_grad_(False)
    gemma.model.layers[-1].requires_grad_(True)
    assert FrozenTrunk.for_model(gemma, 1) is not None  # the check compared split and whole logits


def test_declined_where_the_split_is_not_the_whole_model(caplog):
    assert FrozenTrunk.for_model(four_block_llama(trained_blocks=4), 4) is None  # nothing frozen
    everything = four_block_llama(trained_blocks=1).requires_grad_(True)
    assert FrozenTrunk.for_model(everything, 1) is None  # the "trunk" trains
    # a decoder that transforms inputs_embeds inside its forward (as GPT-2 adds position embeddings there): the
    # split forward is checked against the whole one and declined
    odd = four_block_llama(trained_blocks=1)

    def rescale(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = 2 * kwargs["inputs_embeds"]
        return args, kwargs

    odd.model.register_forward_pre_hook(rescale, with_kwargs=True)
    assert FrozenTrunk.for_model(odd, 1) is None
    assert "does not reproduce the whole forward" in caplog.text


def test_trainer_step_is_the_same_with_and_without_the_reused_trunk(tmp_path):
    def strip(lines):
        return [{k: v for k, v in line.items() if not k.startswith(("time/", "perf/")) and not k.endswith("seconds")}
                for line in lines]

    common = ["weighting=ctwa", "steps=2", "model.train_last_k_layers=1", "eval.test_at_end=false",
              "optim.mini_batches=2"]  # off-policy: π_old, reference, update and post-update passes all run
    reused, _ = run(tmp_path, *common, name="reused")
    whole, _ = run(tmp_path, *common, "model.reuse_frozen_trunk=false", name="whole")
    reused_lines, whole_lines = (read_metrics(d / "metrics.jsonl") for d in (reused, whole))
    assert any("time/trunk_s" in line for line in reused_lines)
    assert not any("time/trunk_s" in line for line in whole_lines)
    for a, b in zip(strip(reused_lines), strip(whole_lines), strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float) and math.isfinite(value):
                assert value == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
            else:
                assert value == b[key], key
