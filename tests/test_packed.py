"""engine.packed: linear layers multiplying by pre-packed weights (MKL fp32, oneDNN bf16) give F.linear's results,
and only when safe."""

import pytest
import torch
from torch import nn

from moalign.engine.packed import bf16_packing_available, packed_linear_weights, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no MKL packed GEMM")
torch.set_num_threads(1)


def linear(in_features=48, out_features=80, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("rows", [1, 3, 16, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_product_equals_linear(rows, bias):
    layer = linear(bias=bias)
    x = torch.randn(2, rows, 48)  # 3-D, as a decoder passes hidden states
    expected = nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad(), packed_linear_weights(layer) as n_packed:
        assert n_packed == 1 and "forward" in layer.__dict__
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert "forward" not in layer.__dict__  # the class's forward is back


def test_packed_forward_is_used_inside_and_removed_after(monkeypatch):
    calls = []
    original = torch.ops.mkl._mkl_linear

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    layer = linear()
    with torch.no_grad(), packed_linear_weights(layer):
        monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", counting)
        layer(torch.randn(5, 48))
    layer(torch.randn(5, 48))
    assert calls == [torch.Size([5, 48])]


def test_gradients_and_modified_weights_take_the_plain_product():
    layer = linear()
    x = torch.randn(4, 48)
    with packed_linear_weights(layer):
        out = layer(x)  # grad enabled: the packed product has no backward
        out.sum().backward()
        assert layer.weight.grad is not None
        with torch.no_grad():
            layer.weight.mul_(2)  # stale packed copy: must not be used
            torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_only_cpu_plain_linears_are_packed():
    class Subclass(nn.Linear):
        pass

    model = nn.Sequential(linear(), nn.ReLU(), linear(80, 8).to(torch.bfloat16), nn.Embedding(10, 4), Subclass(8, 8))
    with torch.no_grad(), packed_linear_weights(model) as n_packed:
        assert n_packed == 1 + bf16_packing_available()  # the fp32 layer by MKL, the bf16 one by oneDNN
        assert "forward" in model[0].__dict__ and "forward" not in model[4].__dict__


@pytest.mark.skipif(not bf16_packing_available(), reason="this torch build has no oneDNN bf16 linear")
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 200])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_packed_product_equals_linear(rows, bias):
    layer = linear(bias=bias).to(torch.bfloat16)
    x = torch.randn(2, rows, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
        with packed_linear_weights(layer) as n_packed:
            assert n_packed == 1
            got = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)  # the same bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_layers_step_aside_under_autocast(dtype):
    layer = linear().to(dtype)
    x = torch.randn(5, 48)
    with torch.no_grad(), packed_linear_weights(layer):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's product, not the packed one's dtype
            got = layer(x)
            expected = nn.functional.linear(x, layer.weight, layer.bias)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_whole_model_logits_unchanged():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (6, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with packed_linear_weights(model) as n_packed:
            got = model(input_ids=ids).logits
    assert n_packed == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer and the LM head
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fast_generate_packs_unless_told_not_to(monkeypatch):
    from test_sampler import LlamaConfig, LlamaForCausalLM, random_prompts, tiny_model, word_tokenizer

    from moalign.engine.sampler import fast_generate

    model, tokenizer = tiny_model(LlamaConfig, LlamaForCausalLM), word_tokenizer()
    prompts = random_prompts(4, seed=2)
    index = list(range(len(prompts)))
    calls = []
    original = torch.ops.mkl._mkl_linear
    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", lambda *args: calls.append(1) or original(*args))
    packed = fast_generate(model, tokenizer, prompts, index, index, 8, greedy=True)
    assert calls
    calls.clear()
    plain = fast_generate(model, tokenizer, prompts, index, index, 8, greedy=True, pack_weights=False)
    assert not calls
    assert torch.equal(packed.response_ids, plain.response_ids)
    torch.testing.assert_close(packed.sampler_logprobs, plain.sampler_logprobs, rtol=1e-4, atol=1e-5)
