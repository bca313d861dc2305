"""Crash a `moalign train` run at chosen points with SIGKILL, then resume it (driver for tests/test_reliability.py).

    python tests/fault_injection_run.py ROOT FAULT [FAULT ...] -- OVERRIDE [OVERRIDE ...]

runs, each as its own process:

1. ``moalign train OVERRIDES run_dir=ROOT/reference`` — the uninterrupted run;
2. for every FAULT (``LABEL [EXTRA_OVERRIDE ...]``, e.g. ``"update:2"`` or
   ``"write:step_0000003.pt checkpoint.every=2"``): ``moalign train OVERRIDES EXTRA run_dir=ROOT/<run>`` with
   ``MOALIGN_FAULT=LABEL`` (the run SIGKILLs itself there, see ``moalign.engine.checkpoint.fault_point``); a copy of
   what the crash left is kept as ``ROOT/<run>.after_kill``; then ``moalign train --resume ROOT/<run>``.

and writes ``ROOT/results.json``: ``{"reference": exit, "faults": {FAULT: {"run": <run>, "kill": exit, "resume":
exit}}}`` with exit codes as ``subprocess`` reports them (−9: killed by SIGKILL). Each process's output is in
``ROOT/<run>.*.log``.

Each process is a fork of this one, which has already imported torch, transformers and moalign: a run then costs
about a second instead of the ~10 s of imports of a fresh interpreter. The children run ``moalign.cli.main``, the
`moalign` command itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a forked child must not inherit tokenizer threads

import torch  # noqa: E402

import moalign.engine.trainer  # noqa: E402, F401  (imported once, here, for every child)
from moalign.cli import main  # noqa: E402
from moalign.config import ModelConfig  # noqa: E402
from moalign.engine.checkpoint import FAULT_ENV  # noqa: E402
from moalign.models import load_model  # noqa: E402


def run_child(argv: list[str], fault: str | None, log: Path) -> int:
    """``moalign <argv>`` in a forked child; its exit code, or −signal if a signal killed it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.environ.pop(FAULT_ENV, None)
            if fault:
                os.environ[FAULT_ENV] = fault
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def crash_and_resume(root: Path, faults: list[str], overrides: list[str]) -> dict:
    """The runs of the module docstring; returns what results.json holds."""
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"reference": run_child(["train", *overrides, f"run_dir={root / 'reference'}"], None,
                                            root / "reference.log"), "faults": {}}
    for spec in faults:
        label, *extra = spec.split()
        name = label.replace(":", "-").replace(".", "-")
        run_dir = root / name
        killed = run_child(["train", *overrides, *extra, f"run_dir={run_dir}"], label, root / f"{name}.kill.log")
        shutil.copytree(run_dir, root / f"{name}.after_kill")
        resumed = run_child(["train", "--resume", str(run_dir)], None, root / f"{name}.resume.log")
        results["faults"][spec] = {"run": name, "kill": killed, "resume": resumed}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--" not in args or len(args) < 2:
        sys.exit(__doc__)
    split = args.index("--")
    torch.set_num_threads(1)
    load_model(ModelConfig(name="tiny"))  # build or read the cached tiny model once, before forking
    print(json.dumps(crash_and_resume(Path(args[0]), args[1:split], args[split + 1:]), indent=2))
