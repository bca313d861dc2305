"""The run directory: how ``moalign train`` (either engine) and ``moalign study`` prepare it, write its config and
summary, and print the summary.

A run directory holds ``config.yaml`` (the resolved config: ``moalign train --config run_dir/config.yaml`` reproduces
the run), ``metrics.jsonl``, ``checkpoints/``, ``model/`` and, once finished, ``summary.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moalign.errors import UserError


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a crash leaves the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: pass only one of them")
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            import shutil

            shutil.rmtree(run_dir)
        elif not resume:
            raise UserError(f"run directory {run_dir} already exists; pass --resume to continue it or --overwrite "
                            f"to replace it (or choose another run_dir=...)")
    run_dir.mkdir(parents=True, exist_ok=True)


def write_config(run_dir: Path, cfg) -> None:
    from moalign.config import dump_config  # on use: the command line starts without importing torch

    write_atomically(run_dir / "config.yaml", dump_config(cfg))


def write_summary(run_dir: Path, summary: dict) -> None:
    try:
        from moalign.diagnostics.interference import interference_summary

        summary["interference"] = interference_summary(run_dir)
    except (ImportError, UserError) as exc:
        summary["interference"] = {"error": str(exc)}
    write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))


def print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    interference = summary.get("interference", {})
    for split, by_mode in summary.get("eval", {}).items():
        for mode, rows in by_mode.items():
            with_ci = (interference.get("objectives", {}) if (interference.get("split"), interference.get("mode"))
                       == (split, mode) else {})
            table = Table(title=f"held-out {split} split ({mode}): per-objective change")
            for col in ("objective", "start", "end", "change") + (("95% CI",) if with_ci else ()):
                table.add_column(col, justify="right" if col != "objective" else "left")
            for name, r in rows.items():
                ch = r["change"]
                color = "green" if ch > 0 else "red" if ch < 0 else "white"
                ci = [f"[{with_ci[name]['change_ci'][0]:+.3f}, {with_ci[name]['change_ci'][1]:+.3f}]"] \
                    if name in with_ci else []
                table.add_row(name, f"{r['start']:.3f}", f"{r['end']:.3f}", f"[{color}]{ch:+.3f}[/]", *ci)
            console.print(table)
    w = summary.get("final_weights", {})
    if w:
        console.print("final weights: " + ", ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in w.items()))
    if interference.get("verdict") is not None:
        degraded = ", ".join(interference["degraded_objectives"]) or "none"
        ci = interference["score_change_ci"]
        console.print(f"verdict ({interference['split']}, {interference['mode']}): {interference['verdict']}; degraded "
                      f"objectives (CI below 0): {degraded}; fixed-scalarization score change "
                      f"{interference['score_change']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]", highlight=False)
    cost = summary.get("eval_cost") or {}
    if cost:
        console.print("held-out evaluation cost: " + "; ".join(
            f"{mode} {c['seconds']:.1f} s for {c['evaluations']} evaluations ({c['completions']} completions, "
            f"{c['tokens']} tokens)" for mode, c in cost.items()), highlight=False)
    law = summary.get("law") or {}
    if law.get("law/batch_num_pairs"):
        console.print(f"covariance law: predicted vs next-batch sign agreement {law['law/batch_sign_agreement']:.2f}"
                      + (f", vs probe set {law['law/sign_agreement']:.2f}" if law.get("law/num_pairs") else ""),
                      highlight=False)
    console.print(f"done in {summary.get('wall_seconds', 0):.0f}s; run directory: {run_dir}")
