"""The input embedding's gradient, added to its weight row by row.

For an embedding E [V, d] looked up at ids i, autograd's backward builds the dense gradient ∂L/∂E by zero-filling
a [V, d] tensor and adding each output row's gradient g_k at row i_k; with a tied LM head, that tensor is then summed
with the head's own [V, d] gradient before it reaches ``E.grad``. For SmolLM2 (49k × 576) each such tensor is 113 MB,
and a micro-batch that shares prompts looks up twice (the prompts, then the rows): on a CPU the zero-fills and sums
took ≈ 1 s of a 15 s update, most of it faulting fresh pages in (docs/performance.md).

``EmbeddingRowGradients`` computes the same sum on the rows used:

    E.grad[i_k] += g_k        for every looked-up position k        (``index_add_``, in the order of k)

It detaches the embedding's output in the forward (a leaf that collects g_k) and, in ``flush`` after the backward,
adds the rows into ``E.grad``. Rows looked up at the embedding's ``padding_idx`` get no gradient, as in autograd.
Indices add in a fixed order, so gradients repeat exactly run to run.

It applies to a plain ``nn.Embedding`` on a CPU whose weight trains (not ``max_norm``, ``scale_grad_by_freq`` or
sparse; on an accelerator the dense tensors cost little, and ``index_add_`` adds with atomics there), and only
where the loss's gradient comes from ``backward``: ``torch.autograd.grad`` over the parameters would not see the
rows.
"""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingRowGradients:
    """Context manager: within it, every forward of ``model``'s input embedding under autograd records its ids and a
    detached output; ``flush()`` adds the recorded outputs' gradients into the weight's ``.grad`` and forgets them."""

    def __init__(self, embedding: nn.Embedding):
        self.embedding = embedding
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._hook = None

    @classmethod
    def for_model(cls, model: nn.Module) -> EmbeddingRowGradients | None:
        """For ``model``'s input embedding, or ``None`` where it does not apply (see the module docstring)."""
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if (type(embedding) is not nn.Embedding or not embedding.weight.requires_grad
                or embedding.weight.device.type != "cpu" or embedding.max_norm is not None
                or embedding.scale_grad_by_freq or embedding.sparse):
            return None
        return cls(embedding)

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            return None
        leaf = output.detach().requires_grad_(True)
        self.records.append((args[0], leaf))
        return leaf

    def flush(self) -> None:
        weight = self.embedding.weight
        for ids, leaf in self.records:
            if leaf.grad is None:
                continue
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            ids, rows = ids.reshape(-1), leaf.grad.reshape(-1, weight.shape[1]).to(weight.grad.dtype)
            if self.embedding.padding_idx is not None:
                rows = rows.masked_fill((ids == self.embedding.padding_idx)[:, None], 0.0)
            weight.grad.index_add_(0, ids, rows)
        self.records.clear()

    def __enter__(self) -> EmbeddingRowGradients:
        self._hook = self.embedding.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        self.records.clear()
