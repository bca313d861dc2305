"""Run the frozen trunk once per step when only the top k blocks train (``model.train_last_k_layers=k``).

With blocks ``[0, L − k)`` and the embedding frozen, the residual stream entering block ``L − k``,

    h = blocks[:L−k](embed(x))          (per position of [prompt | response])

is the same for the policy before the update, after it, and for the reference model (a copy of the initial policy
whose trunk is the same weights). So a step computes ``h`` once (``hidden_states``) and every pass over the batch —
the reference's log-probs, the update's forward and backward, the post-update log-probs — runs only the top k
blocks, the final norm and the LM head on it (``top_only``, with ``inputs_embeds = h``). For SmolLM2 with k = 4 of
30 blocks, those passes shrink to ≈ 4/30 of the blocks' work plus the LM head.

The split is done on the model object itself, for the duration of a ``with`` block: the decoder's block list is
swapped for its top (or bottom) part, with the top blocks' cache indices renumbered from 0. That works for
decoders built like Llama (``embed_tokens`` → ``layers`` → ``norm``, every layer full attention, the embedding not
rescaled inside the forward); ``FrozenTrunk.for_model`` checks the split forward against the whole one on a small
input and declines (returns ``None``) when they differ, and the trainer then runs whole passes.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from moalign.engine.rollout import Rollout, position_ids, sequence_outputs

log = logging.getLogger(__name__)


def _decoder(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def _head_attribute(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, child in model.named_children() if child is head), None)


class FrozenTrunk:
    """Blocks ``[0, split)`` of a decoder whose parameters (and embedding) do not train."""

    def __init__(self, split: int):
        self.split = split

    # ---- building, with a check that the split forward is the whole forward

    @classmethod
    def for_model(cls, model: nn.Module, trained_blocks: int) -> "FrozenTrunk | None":
        """The trunk below the top ``trained_blocks`` blocks, or ``None`` where splitting is not possible or not
        exact for this architecture (the passes then run whole)."""
        decoder = _decoder(model)
        layers = getattr(decoder, "layers", None)
        layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        if (not isinstance(layers, nn.ModuleList) or not isinstance(getattr(decoder, "norm", None), nn.Module)
                or _head_attribute(model) is None or layer_types != {"full_attention"}
                or not 0 < trained_blocks < len(layers)
                or not all(hasattr(getattr(block, "self_attn", None), "layer_idx") for block in layers)):
            return None
        if any(p.requires_grad for block in layers[:len(layers) - trained_blocks] for p in block.parameters()):
            return None
        trunk = cls(len(layers) - trained_blocks)
        if not trunk._split_equals_whole(model):
            log.warning("%s: running the frozen trunk separately does not reproduce the whole forward; every pass "
                        "runs all blocks", type(model).__name__)
            return None
        return trunk

    @torch.no_grad()
    def _split_equals_whole(self, model: nn.Module) -> bool:
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=generator).to(device)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # one left-padded row, as rollouts are
        positions = position_ids(mask)
        was_training = model.training
        model.eval()
        try:
            whole = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            with self.bottom_only(model):
                hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            with self.top_only(model):
                split = model(inputs_embeds=hidden, attention_mask=mask, position_ids=positions,
                              use_cache=False).logits
        except Exception as exc:  # an architecture whose forward does not take the swap
            log.warning("splitting %s at block %d failed: %s", type(model).__name__, self.split, exc)
            return False
        finally:
            model.train(was_training)
        keep = mask.bool()
        return bool(torch.allclose(split[keep], whole[keep], rtol=1e-4, atol=1e-4))

    # ---- the two halves

    @contextmanager
    def top_only(self, model: nn.Module):
        """``model`` runs blocks ``[split, L)``, the final norm and the head on ``inputs_embeds`` = the trunk's
        output. Their cache indices count from 0 meanwhile (a cache's length is read from its layer 0)."""
        decoder = _decoder(model)
        layers = decoder.layers
        top = list(layers[self.split:])
        indices = [block.self_attn.layer_idx for block in top]
        for i, block in enumerate(top):
            block.self_attn.layer_idx = i
        decoder.layers = nn.ModuleList(top)
        model._moalign_top_only = True
        try:
            yield model
        finally:
            decoder.layers = layers
            for block, index in zip(top, indices):
                block.self_attn.layer_idx = index
            del model._moalign_top_only

    @contextmanager
    def bottom_only(self, model: nn.Module):
        """``model`` runs the embedding and blocks ``[0, split)``; its "logits" are the residual stream entering
        block ``split`` (no final norm, no head)."""
        decoder, head_name = _decoder(model), _head_attribute(model)
        layers, norm, head = decoder.layers, decoder.norm, getattr(model, head_name)
        decoder.layers, decoder.norm = nn.ModuleList(layers[:self.split]), nn.Identity()
        setattr(model, head_name, nn.Identity())
        try:
            yield model
        finally:
            decoder.layers, decoder.norm = layers, norm
            setattr(model, head_name, head)

    @torch.no_grad()
    def hidden_states(self, model: nn.Module, rollout: Rollout, micro_batch_size: int) -> torch.Tensor:
        """The trunk's output for every position of ``[prompt | response[:-1]]`` (what the passes feed the top
        blocks), [B, Tp + Tr − 1, d], micro-batch by micro-batch with each distinct prompt run once."""
        was_training = model.training
        model.eval()
        try:
            with self.bottom_only(model):
                parts = []
                for start in range(0, len(rollout), micro_batch_size):
                    sl = slice(start, start + micro_batch_size)
                    parts.append(torch.cat(sequence_outputs(model, rollout.prompt_ids[sl], rollout.prompt_mask[sl],
                                                            rollout.response_ids[sl], rollout.response_mask[sl],
                                                            all_positions=True), 1))
                return torch.cat(parts)
        finally:
            model.train(was_training)
