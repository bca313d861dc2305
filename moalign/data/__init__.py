"""Prompts and ground-truth answers: generated arithmetic word problems, MATH-500 (verl parquet folder or the
Hugging Face Hub) or any JSONL/parquet table with ``prompt`` and ``answer`` columns."""

from __future__ import annotations

from pathlib import Path

from moalign.data.arithmetic import (
    ArithmeticProblem,
    arithmetic_splits,
    generate_problems,
    solution_steps,
)
from moalign.data.base import DEFAULT_PROMPT_SUFFIX, DataConfig, Example, Splits
from moalign.data.files import load_hub, load_tables, load_verl_folder, paper_split


def load_data(cfg: DataConfig) -> Splits:
    """The train/val/test examples described by ``cfg`` (each split cut to ``cfg.max_examples``)."""
    if cfg.source == "arithmetic":
        splits = arithmetic_splits(cfg)
    elif cfg.source == "math500":
        splits = load_verl_folder(Path(cfg.path))
    elif cfg.source == "files":
        splits = load_tables(Path(cfg.path), cfg.prompt_suffix, cfg.seed)
    else:
        splits = load_hub(cfg.hub_id, cfg.prompt_suffix)
    return splits.truncated(cfg.max_examples)


__all__ = ["ArithmeticProblem", "DEFAULT_PROMPT_SUFFIX", "DataConfig", "Example", "Splits", "generate_problems",
           "load_data", "paper_split", "solution_steps"]
