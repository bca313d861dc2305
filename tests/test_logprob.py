"""The log-prob passes: the token log-prob function against autograd's own graph, and repeatable gradients."""

import torch

from moalign.engine.rollout import TokenLogProb


def reference(logits, targets):
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def test_gradcheck_float64():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda z: TokenLogProb.apply(z, targets), (logits,))


def test_values_and_gradients_match_autograd():
    torch.manual_seed(1)
    logits = torch.randn(4, 9, 50) * 5
    logits[..., 3] = -torch.inf  # a token masked out of the vocabulary
    targets = torch.randint(4, 50, (4, 9))
    weights = torch.randn(4, 9)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    out_a, out_b = TokenLogProb.apply(a, targets), reference(b, targets)
    assert torch.equal(out_a, out_b)
    (out_a * weights).sum().backward()
    (out_b * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert torch.all(a.grad[..., 3] == 0)
    # by hand at one position: g · (1[v = y] − softmax(z)_v)
    p = torch.softmax(logits[1, 2], -1)
    expected = -weights[1, 2] * p
    expected[targets[1, 2]] += weights[1, 2]
    torch.testing.assert_close(a.grad[1, 2], expected, rtol=1e-6, atol=1e-7)


def test_repeated_backward_leaves_the_graph_intact():
    """Gradient-level weightings differentiate the same log-probs once per objective (retain_graph)."""
    torch.manual_seed(2)
    logits = torch.randn(5, 11, requires_grad=True)
    out = TokenLogProb.apply(logits * 1.0, torch.randint(0, 11, (5,)))
    first = torch.autograd.grad(out.sum(), logits, retain_graph=True)[0]
    second = torch.autograd.grad(out.sum(), logits)[0]
    assert torch.equal(first, second)


def test_shared_prompt_gradients_repeat_exactly():
    """The shared-prompt forward gathers a group's prompt keys/values for its rows; with the gather's backward
    done by atomic adds across threads (advanced indexing), two identical backward passes gave different gradients."""
    from test_sampler import tiny_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from moalign.engine.rollout import micro_batch_logprobs

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_model(LlamaConfig, LlamaForCausalLM, hidden_size=128, num_attention_heads=4,
                           num_key_value_heads=4).train()
        g = torch.Generator().manual_seed(0)
        rows, prompt_len, response_len = 16, 64, 8
        prompt_ids = torch.randint(2, 32, (1, prompt_len), generator=g).repeat(rows, 1)  # one group of 16
        response_ids = torch.randint(2, 32, (rows, response_len), generator=g)
        masks = torch.ones(rows, prompt_len, dtype=torch.long), torch.ones(rows, response_len)
        grads = []
        for _ in range(3):
            lp = micro_batch_logprobs(model, prompt_ids, masks[0], response_ids, masks[1], grad=True,
                                      share_prompts=True)
            lp.sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    assert any(gr.abs().sum() > 0 for gr in grads[0])
    for again in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], again))


def test_row_chunks_give_the_same_bits(monkeypatch):
    """On a CPU the rows go through in chunks (cache-sized temporaries); every row is computed alone, so any chunk
    size gives the same values and gradients as one whole-block pass, including a last chunk that is short."""
    import moalign.engine.rollout as rollout

    torch.manual_seed(3)
    logits = torch.randn(3, 13, 97) * 4  # 39 rows: chunks of 16, 16 and 7
    targets = torch.randint(0, 97, (3, 13))
    weights = torch.randn(3, 13)
    results = []
    for rows_per_chunk in (16, 1000):
        monkeypatch.setattr(rollout, "CPU_ROWS_PER_CHUNK", rows_per_chunk)
        z = logits.clone().requires_grad_()
        out = TokenLogProb.apply(z, targets)
        (out * weights).sum().backward()
        results.append((out.detach(), z.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert [s.indices(39) for s in rollout._row_chunks(39, torch.device("cpu"))] == [(0, 39, 1)]
    monkeypatch.setattr(rollout, "CPU_ROWS_PER_CHUNK", 16)
    assert [s.indices(39) for s in rollout._row_chunks(39, torch.device("cpu"))] == [(0, 16, 1), (16, 32, 1),
                                                                                    (32, 39, 1)]
    assert rollout._row_chunks(39, torch.device("meta")) == [slice(0, 39)]
