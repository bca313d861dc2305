"""Training functions for the study runner's worker processes (they must pickle: module level, importable)."""

import json
import os
import time
from pathlib import Path


def pretend_to_train(cfg, run_dir: Path, resume: bool, on_step) -> dict:
    """Report every step, then write which process ran it and a summary; the ctwa seed-1 run fails."""
    if cfg.weighting.name == "ctwa" and cfg.seed == 1:
        raise RuntimeError("boom in a worker")
    for step in range(1, cfg.steps + 1):
        time.sleep(0.05)  # long enough for both workers to take runs
        on_step(step)
    (run_dir / "worker.json").write_text(json.dumps({"pid": os.getpid(), "resume": resume}))
    (run_dir / "summary.json").write_text(json.dumps({"steps": cfg.steps}))
    return {}
