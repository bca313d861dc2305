"""Support for tests/test_trl.py: a tiny random Llama with a locally trained tokenizer, a user objective, the test
config, and — run as a script under ``torchrun --nproc_per_node 2`` — one process of a 2-process CPU (gloo) run.

    torchrun --nproc_per_node 2 tests/trl_ddp_script.py MODEL_DIR RUN_DIR OUT_DIR [KEY=VALUE ...]

Each process runs ``train_with_trl`` and writes its final weights (and a gradient-level weighting's weights as it
solved them each step) to ``OUT_DIR/weights_rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

PAD, EOS = "<|pad|>", "<|eos|>"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"


def vowel_fraction(prompt: str, completion: str, answer: str) -> float:
    """A user objective whose value varies even on a random model's output: the fraction of vowels."""
    letters = [c for c in completion.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0


def space_fraction(prompt: str, completion: str, answer: str) -> float:
    """A second varying user objective: the fraction of spaces (so that no objective's gradient is 0)."""
    return completion.count(" ") / len(completion) if completion else 0.0


def build_random_model(folder: Path, corpus: list[str], seed: int = 0) -> Path:
    """A 2-layer, 32-wide random Llama and a byte-level BPE tokenizer trained on ``corpus``, saved to ``folder``
    (loadable as ``model.name=<folder>``). Saving matters: TRL rebuilds the reference model from the path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=[PAD, EOS], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_run_overrides(model_dir: Path, run_dir: Path) -> list[str]:
    """A TrainConfig (as overrides) small enough for a CPU test: 4 prompts × 4 completions of ≤ 8 tokens."""
    return [f"model.name={model_dir}", f"run_dir={run_dir}", "engine=trl", "device=cpu", "threads=1",
            "objectives=[conciseness, 'trl_ddp_script:vowel_fraction']", "weighting=ctwa", "weighting.lambda_lr=0.5",
            "data.num_train=8", "data.num_val=2", "data.num_test=2", "rollout.prompts_per_step=4",
            "rollout.group_size=4", "rollout.max_new_tokens=8", "rollout.max_prompt_tokens=512",
            "optim.micro_batch_size=4", "loss.kl_coef=0", "eval.num_prompts=2", "eval.test_at_end=false",
            "checkpoint.every=1", "log.progress=false", "steps=2"]


def main() -> None:
    torch.set_num_threads(1)
    from moalign.config import TrainConfig, build_config
    import moalign.integrations.trl.trainer as trl_trainer
    from moalign.integrations.trl import train_with_trl

    model_dir, run_dir, out_dir = map(Path, sys.argv[1:4])
    overrides = small_run_overrides(model_dir, run_dir) + sys.argv[4:]  # e.g. weighting=mgda (later ones win)
    cfg = build_config(TrainConfig, {}, overrides)
    solved = []  # a gradient-level weighting's weights as each process solves them, before any broadcast
    solve = trl_trainer.solve_objective_weights

    def recording_solve(trainer, *args):
        solve(trainer, *args)
        solved.append(trainer.weighting.weights.tolist())

    trl_trainer.solve_objective_weights = recording_solve
    summary = train_with_trl(cfg, run_dir)
    rank = int(os.environ["RANK"])
    (out_dir / f"weights_rank{rank}.json").write_text(json.dumps({"final": summary["final_weights"],
                                                                  "solved": solved}))


if __name__ == "__main__":
    main()
