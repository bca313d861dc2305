"""Metrics go to ``run_dir/metrics.jsonl`` as they are produced: one JSON object per line, each line written with a
single ``write`` on an O_APPEND file and fsync'ed, so a crash leaves whole lines only (a write that fails, e.g. on a
full disk, is cut back to the last whole line). Optional TensorBoard, W&B and MLflow sinks receive the scalar
entries."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

from moalign.errors import UserError


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _clean(v.item())
    return v


class MetricsWriter:
    def __init__(self, path: Path, tensorboard: bool = False, wandb: bool = False, mlflow: bool = False,
                 run_name: str = "", config: dict | None = None):
        self.path = Path(path)
        self.sinks = []
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.sinks.append(("tb", SummaryWriter(str(self.path.parent / "tensorboard"))))
            except ImportError:
                print("warning: log.tensorboard needs `pip install tensorboard`; skipping")
        if wandb:
            try:
                import wandb as wb

                self.sinks.append(("wandb", wb.init(project="moalign", name=run_name, config=config)))
            except ImportError:
                print("warning: log.wandb needs `pip install wandb`; skipping")
        if mlflow:
            try:
                import mlflow as mlf

                mlf.start_run(run_name=run_name)
                self.sinks.append(("mlflow", mlf))
            except ImportError:
                print("warning: log.mlflow needs `pip install mlflow`; skipping")

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Drop everything after ``offset`` (lines written after the checkpoint we resume from)."""
        if self.path.exists() and self.path.stat().st_size > offset:
            with open(self.path, "r+b") as f:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps({k: _clean(v) for k, v in record.items()}, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):  # a short write: the disk filled up mid-line
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, start)  # never leave a torn line behind
                raise UserError(f"could not write {self.path}: {exc.strerror or exc} (free disk space and resume "
                                f"with `moalign train --resume {self.path.parent}`)") from None
        finally:
            os.close(fd)
        step = int(record.get("step", 0))
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}
        for kind, sink in self.sinks:
            if kind == "tb":
                for k, v in scalars.items():
                    sink.add_scalar(k, v, step)
                sink.flush()
            elif kind == "wandb":
                sink.log(scalars, step=step)
            elif kind == "mlflow":
                sink.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        for kind, sink in self.sinks:
            if kind == "tb":
                sink.close()
            elif kind == "wandb":
                sink.finish()
            elif kind == "mlflow":
                sink.end_run()


def read_metrics(path: Path) -> list[dict]:
    """All whole lines of a metrics file (a torn last line, impossible with MetricsWriter, is skipped)."""
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
