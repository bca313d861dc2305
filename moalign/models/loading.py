"""Load a policy model and its tokenizer from a ``ModelConfig`` (the built-ins ``tiny``, ``smollm2-135m``,
``smollm2-135m-sft``, or any Hugging Face id / local folder), and choose what of it trains."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

import torch

from moalign.errors import UserError
from moalign.models.smollm2 import SMOLLM2_NAMES, SMOLLM2_SYSTEM_PROMPT, load_smollm2

if TYPE_CHECKING:
    from moalign.config import ModelConfig

# the dtype the weights are loaded in, per TrainConfig.precision: bf16-mixed loads fp32 weights (the masters the
# optimizer updates; the engine computes with a bf16 copy, engine/precision.py)
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16-mixed": torch.float32, "bf16-pure": torch.bfloat16}


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_hf(name: str, dtype: torch.dtype, revision: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, revision=revision)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load model {name!r} (a Hugging Face id or a local folder; built-ins: tiny, "
                        f"smollm2-135m): {first}") from None
    return model, tok


def load_model(cfg: "ModelConfig", precision: str = "fp32"):
    """Return ``(model, tokenizer)``, the weights in the dtype ``precision`` keeps them in; the tokenizer has a pad
    token and a chat template."""
    _quiet_transformers()
    dtype = WEIGHT_DTYPES[precision]
    if cfg.name == "tiny":
        from moalign.models.tiny import load_tiny

        model, tok = load_tiny()
        model = model.to(dtype)
    elif cfg.name.lower() == "smollm2-135m-sft":  # the smol study's SFT starting point, built and cached on first use
        from moalign.models.sft import sft_model_path

        model, tok = _load_hf(str(sft_model_path()), dtype, None)
    elif cfg.name.lower() in SMOLLM2_NAMES:
        model, tok = load_smollm2(dtype)
    else:
        model, tok = _load_hf(cfg.name, dtype, cfg.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if tok.chat_template is None:  # plain LMs: the prompt text followed by a newline
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    model.config.use_cache = True
    return model, tok


def system_prompt_for(cfg: "ModelConfig") -> str | None:
    """The system message to use: the configured one ('' = none), else the model's default."""
    if cfg.system_prompt is not None:
        return cfg.system_prompt or None
    return SMOLLM2_SYSTEM_PROMPT if cfg.name.lower() in SMOLLM2_NAMES else None


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a HF causal LM (``model.model.layers`` for Llama/Qwen/Mistral...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("layers", "h", "blocks"):
        blocks = getattr(base, attr, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise UserError(f"cannot find the transformer blocks of {type(model).__name__} for train_last_k_layers")


def prepare_trainable(model, cfg: "ModelConfig"):
    """Freeze what is not trained: all but the last k blocks (and the final norm), or everything but LoRA adapters."""
    if cfg.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:  # pragma: no cover
            raise UserError("model.lora needs the peft package: pip install peft") from None
        lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
        try:
            return get_peft_model(model, lc)
        except ValueError as exc:
            raise UserError(f"model.lora.target_modules: {exc}") from None
    if cfg.train_last_k_layers is not None:
        blocks = transformer_blocks(model)
        k = cfg.train_last_k_layers
        if k > len(blocks):
            raise UserError(f"model.train_last_k_layers={k} but the model has {len(blocks)} blocks")
        for p in model.parameters():
            p.requires_grad_(False)
        for block in list(blocks)[-k:]:
            for p in block.parameters():
                p.requires_grad_(True)
        norm = getattr(model.get_decoder(), "norm", None)
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)
    return model


def select_parameters(model, patterns: list[str] | None) -> list:
    """The trainable parameters whose names (``model.named_parameters()``) match one of the glob ``patterns``
    (``fnmatch``, case-sensitive), in the model's order; every trainable parameter when ``patterns`` is None."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if patterns is None:
        return [p for _, p in trainable]
    chosen = [p for name, p in trainable if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    if not chosen:
        names = [name for name, _ in trainable]
        shown = ", ".join(names[:3] + (["...", names[-1]] if len(names) > 4 else names[3:]))
        raise UserError(f"weighting.gradient_params {patterns} matches no trainable parameter; the trainable "
                        f"parameters are named like: {shown}")
    return chosen
