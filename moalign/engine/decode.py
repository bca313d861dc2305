"""One decode step (one new token per row, on a key/value cache) of a Llama-family decoder, without transformers'
per-call machinery.

A decode step of SmolLM2-135M on a CPU is a few hundred small operations around 211 skinny matmuls, and a share of
its time is Python: ``nn.Module.__call__`` for ~300 modules, the keyword plumbing of ``LlamaDecoderLayer`` and
``LlamaAttention``, the attention-interface lookup in every layer, the output-capturing decorators. ``LeanDecoder``
runs the same layer as ``LlamaDecoderLayer.forward`` (transformers 5; Mistral's and Qwen2's are the same layer, and
Qwen3's adds an RMSNorm over each head of q and k before the rotation, n_q and n_k below),

    h ← h + o_proj(attention(rope(n_q(q_proj(n₁(h)))), rope(n_k(k_proj(n₁(h)))), v_proj(n₁(h)), cache))
    h ← h + down_proj(act(gate_proj(n₂(h))) · up_proj(n₂(h)))

with the model's own functions and modules — its RMSNorm, rotary embedding, ``apply_rotary_pos_emb``, causal
mask, attention interface (SDPA) and linear layers (so packed weights and LoRA layers apply) — in the same order,
only called directly. The logits are therefore bit-identical to ``model(...)``'s (tests). On SmolLM2 a decode step
takes 6–8 % less time at batch 16 and 64 (steps interleaved with the plain forward's); whole sampling calls gained
1.05× at batch 16 and nothing measurable at 64 (docs/performance.md).

Only for model classes whose layer this reproduces (``SUPPORTED``), full attention in every layer (no sliding
window: Mistral's config must set ``sliding_window`` to ``None``, as Mistral-7B-v0.3 does), eager or SDPA
attention, and no forward hooks on the modules it calls directly (they would be skipped); anything else
(``lean_decoder`` returns ``None``) keeps the model's forward.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# causal LM class → its decoder layer class (the layer structure LeanDecoder.step reproduces)
SUPPORTED = {"LlamaForCausalLM": "LlamaDecoderLayer", "MistralForCausalLM": "MistralDecoderLayer",
             "Qwen2ForCausalLM": "Qwen2DecoderLayer", "Qwen3ForCausalLM": "Qwen3DecoderLayer"}


def _sliding_window(attention: nn.Module):
    """The window the layer's own forward passes to its attention function: Qwen2/3 keep one per layer (``None`` on
    full-attention layers), Mistral reads its config's, Llama has none."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in
               ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def lean_decoder(model) -> LeanDecoder | None:
    """A ``LeanDecoder`` for ``model`` (a PEFT wrapper is looked through), or ``None`` where it does not apply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_class = SUPPORTED.get(type(base).__name__)
    decoder = getattr(base, "model", None)
    if layer_class is None or decoder is None or not hasattr(decoder, "layers"):
        return None
    config = decoder.config
    if config._attn_implementation not in ("sdpa", "eager"):
        return None
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return None
    if any(type(layer).__name__ != layer_class for layer in decoder.layers):
        return None
    if any(_sliding_window(layer.self_attn) is not None for layer in decoder.layers):
        return None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    if any(_has_hooks(module) for module in base.modules()):
        return None
    return LeanDecoder(base)


class LeanDecoder:
    """``step(tokens, attention_mask, position_ids, cache)`` → next-token logits [n, V], as
    ``model(input_ids=tokens[:, None], attention_mask=..., position_ids=position_ids[:, None],
    past_key_values=cache, use_cache=True).logits[:, -1]`` computes them."""

    def __init__(self, model):
        self.model, self.decoder = model, model.model
        modeling = sys.modules[type(self.decoder.layers[0].self_attn).__module__]  # e.g. modeling_llama
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.decoder.config._attn_implementation,
                                                               modeling.eager_attention_forward)
        self.apply_rotary = modeling.apply_rotary_pos_emb
        self.head_norms = hasattr(self.decoder.layers[0].self_attn, "q_norm")

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache
             ) -> torch.Tensor:
        d = self.decoder
        h = d.embed_tokens.forward(tokens[:, None])
        positions = position_ids[:, None]
        mask = create_causal_mask(config=d.config, inputs_embeds=h, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=positions)
        cos, sin = d.rotary_emb.forward(h, position_ids=positions)
        for index, layer in enumerate(d.layers):
            attn, mlp = layer.self_attn, layer.mlp
            heads = (h.shape[0], 1, -1, attn.head_dim)
            x = layer.input_layernorm.forward(h)
            q, k = attn.q_proj.forward(x).view(heads), attn.k_proj.forward(x).view(heads)
            if self.head_norms:  # Qwen3: RMSNorm over each head's features, before the rotation
                q, k = attn.q_norm.forward(q), attn.k_norm.forward(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = attn.v_proj.forward(x).view(heads).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            k, v = cache.update(k, v, index)
            out, _ = self.attention(attn, q, k, v, mask, dropout=0.0 if not attn.training else attn.attention_dropout,
                                    scaling=attn.scaling)
            h = h + attn.o_proj.forward(out.reshape(h.shape[0], 1, -1).contiguous())
            x = layer.post_attention_layernorm.forward(h)
            h = h + mlp.down_proj.forward(mlp.act_fn(mlp.gate_proj.forward(x)) * mlp.up_proj.forward(x))
        return self.model.lm_head.forward(d.norm.forward(h))[:, -1]
