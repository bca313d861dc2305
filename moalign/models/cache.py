"""The model cache: where built-in models are kept (``$MOALIGN_CACHE``, else ``~/.cache/moalign``) and how a built
model is written there (atomically, so a crash or a concurrent build never leaves a half-written folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from moalign.errors import UserError


def cache_root() -> Path:
    return Path(os.environ.get("MOALIGN_CACHE", Path.home() / ".cache" / "moalign"))


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for a build, the caller's count restored after. How many threads split a
    sum changes its rounding, and over a warm-up of many steps the rounding changes the model: a model built on first
    use must not depend on the thread setting of whichever command happened to build it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
        shutil.rmtree(tmp, ignore_errors=True)  # guarded: the folder mkdtemp made for this call, nothing else
