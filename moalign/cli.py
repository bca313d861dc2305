"""``moalign`` command line: train · algorithms · interference · theory · study · report.

User errors (bad config, data, paths) print one line and exit with code 2; ``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moalign.engine.run_dir import PreparedRunDir, prepare_run_dir, print_summary, write_config, write_summary
from moalign.errors import UserError, one_line, short_repr


def _console():
    from rich.console import Console

    return Console()


# ------------------------------------------------------------------------------------------------ train


# What a resume may change: settings that do not alter what the run computes (when it evaluates and checkpoints, how
# it logs, where and on how many threads it runs), and steps, which may only grow. Every other key (seed, model,
# data, objectives, weighting, estimator, rollout, loss, optim, the evaluation's settings, diagnostics, precision,
# engine) is refused: the saved config must go on describing the run.
RESUME_SAFE_KEYS = ("steps", "eval.every", "checkpoint", "log", "threads", "device", "run_dir")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(old, new) -> list[str]:
    """The dotted keys whose values differ between two TrainConfigs."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_resume_changes(saved, cfg, run_dir: str) -> None:
    """Refuse overrides that would change what a resumed run computes (``RESUME_SAFE_KEYS``) before anything is
    written."""
    flat = _flatten(cfg.model_dump(mode="json"))
    unsafe = [k for k in changed_keys(saved, cfg)
              if not any(k == safe or k.startswith(safe + ".") for safe in RESUME_SAFE_KEYS)]
    if unsafe:
        shown = ", ".join(f"{k}={short_repr(flat.get(k), 40)}" for k in unsafe[:6]) + (" ..." if len(unsafe) > 6 else "")
        raise UserError(f"--resume {run_dir}: {shown} would change what the run computes (a resume may change only "
                        f"steps, eval.every, checkpoint.*, log.*, threads, device); resume without them, or start a "
                        f"new run: moalign train --config {Path(run_dir) / 'config.yaml'} run_dir=NEW_DIR ...")
    if cfg.steps < saved.steps:
        raise UserError(f"--resume {run_dir}: steps={cfg.steps} is below the run's steps={saved.steps}; steps may only "
                        f"grow on resume")


def resolve_train_config(args):
    """The run's config: defaults, the YAML file (or the resumed run's config.yaml) and the overrides. A resume's
    overrides are checked against the saved config (``check_resume_changes``); nothing is written here."""
    from moalign.config import TrainConfig, build_config, load_yaml

    base = {}
    if args.resume:
        cfg_path = Path(args.resume) / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"--resume {args.resume}: no config.yaml there (not a moalign run directory, or a run "
                            f"stopped before it started: start it again without --resume)")
        base = load_yaml(cfg_path)
        if "run_dir" in base:  # the directory is where it is now (it may have been moved or copied)
            base["run_dir"] = str(args.resume)
    elif args.config:
        base = load_yaml(args.config)
    cfg = build_config(TrainConfig, base, args.overrides)
    if args.resume:
        cfg = cfg.model_copy(update={"run_dir": str(args.resume)})
        check_resume_changes(build_config(TrainConfig, base, []), cfg, args.resume)
    if cfg.run_dir is None:
        cfg = cfg.model_copy(update={"run_dir": f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.weighting.name}"})
    return cfg


def cmd_train(args) -> int:
    from moalign.engine.signals import stop_on_signals

    with stop_on_signals():  # from the start: a Ctrl-C while imports run or the model loads is not lost
        return _train(args)


def _train(args) -> int:
    from moalign.engine.trainer import load_objectives_and_weighting

    cfg = resolve_train_config(args)
    run_dir = Path(cfg.run_dir)
    args.run_dir = run_dir  # named in the message of an interrupted run
    if args.resume and (run_dir / "summary.json").is_file():
        from moalign.config import TrainConfig, build_config, load_yaml

        saved = build_config(TrainConfig, load_yaml(run_dir / "config.yaml"), [])
        changed = [k for k in changed_keys(saved, cfg) if not k.startswith(("run_dir", "log.", "threads", "device"))]
        if changed:
            raise UserError(f"--resume {run_dir}: the run is complete (it has summary.json), so {', '.join(changed[:6])} "
                            f"cannot change it; start a new run to train further")
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            print_summary(summary, run_dir)
        except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
            raise UserError(f"{run_dir / 'summary.json'} is corrupt; delete it and resume again (the final "
                            f"checkpoint rewrites it)") from None
        _console().print(f"{run_dir} is already complete (it has summary.json): nothing to resume")
        return 0
    if args.trl and cfg.engine != "trl":
        raise UserError("--trl sets GRPOConfig fields, for engine=trl only")
    load_objectives_and_weighting(cfg)  # objective and weighting errors before a model loads or run_dir is touched
    if cfg.engine == "trl":  # also under a launcher: every process runs this, the main one owns run_dir
        from moalign.integrations.trl import train_from_cli

        return train_from_cli(cfg, args)
    with prepare_run_dir(run_dir, bool(args.resume), args.overwrite) as prepared:  # locked until the run ends
        print_summary(train_native(cfg, prepared, resume=bool(args.resume)), run_dir)
    return 0


def train_native(cfg, prepared: PreparedRunDir, resume: bool = False) -> dict:
    from tqdm.auto import tqdm

    from moalign.engine.trainer import Trainer

    run_dir = prepared.path
    console = _console()
    console.print(f"[bold]moalign train[/]: model={cfg.model.name} weighting={cfg.weighting.name} "
                  f"estimator={cfg.estimator.name} steps={cfg.steps} → {run_dir}")
    write_config(run_dir, cfg)  # first: a run killed at any later moment can be resumed
    try:
        trainer = Trainer(cfg, run_dir, resume=resume)
    except UserError:
        if not resume:  # a start that fails on its input removes what it made, and only that
            prepared.abandon()
        raise
    bar = tqdm(total=cfg.steps, initial=trainer.step_idx, desc="training", unit="step", dynamic_ncols=True,
               disable=not cfg.log.progress)

    def progress(step, total, record):
        bar.update(step - bar.n)
        short = {name: record.get(f"train/{name}/mean") for name in trainer.objective_names}
        bar.set_postfix({k[:6]: f"{v:.2f}" for k, v in short.items() if v is not None})

    try:
        summary = trainer.run(progress)
    finally:
        bar.close()
    write_summary(run_dir, summary)
    return summary


# ------------------------------------------------------------------------------------------------ other commands


def cmd_algorithms(args) -> int:
    from moalign.objectives import OBJECTIVES
    from moalign.rl.estimators import ESTIMATORS, PAIRED_LOSS_AGG
    from moalign.weighting import WEIGHTINGS

    console = _console()
    for family in ("reward", "advantage", "gradient"):
        console.print(f"\n[bold underline]{family}-level weightings[/]")
        for name, cls in WEIGHTINGS.items():
            if cls.family != family:
                continue
            console.print(f"[bold cyan]{name}[/] — {cls.description}")
            hp = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items())
            console.print(f"    hyperparameters: {hp or '(none)'}", highlight=False)
            console.print(f"    extra cost per step: {cls.cost}", highlight=False)
    console.print("\n[bold underline]advantage estimators[/] (estimator=<name>)")
    for name, fn in ESTIMATORS.items():
        summary = " ".join((fn.__doc__ or "").split("\n\n")[0].split())
        console.print(f"[bold cyan]{name}[/] — {summary}", highlight=False)
        console.print(f"    loss.loss_agg: {PAIRED_LOSS_AGG.get(name, 'token-mean')} by default"
                      + (" (another is refused)" if name in PAIRED_LOSS_AGG else ""), highlight=False)
    console.print("\n[bold underline]objectives[/] (objectives=[<name>, ...])")
    for name, cls in OBJECTIVES.items():
        console.print(f"[bold cyan]{name}[/] — {cls.description}", highlight=False)
    return 0


def cmd_interference(args) -> int:
    from moalign.diagnostics.interference import (
        format_interference_table,
        interference_table,
    )

    rows = interference_table([Path(p) for p in args.run_dirs], split=args.split)
    print(format_interference_table(rows))
    return 0


def cmd_theory(args) -> int:
    from moalign.theory import lab

    if args.experiment == "covariance-law":
        rows = lab.covariance_law(instances=args.instances, seed=args.seed)
    else:
        rows = lab.pl_study(seed=args.seed)
    print(lab.format_table(rows))
    return 0


def cmd_study(args) -> int:
    from moalign.engine.signals import stop_on_signals
    from moalign.study.runner import run_study

    with stop_on_signals():
        run_study(args.config, out_dir=args.out, dry_run=args.dry_run, overrides=args.overrides)
    return 0


def cmd_report(args) -> int:
    from moalign.study.report import write_report

    path = write_report(Path(args.dir), out=args.out)
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moalign", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a policy against several objectives",
                       description="Train with the config defaults, a YAML file and/or key=value overrides, e.g. "
                                   "`moalign train model=tiny weighting=ctwa weighting.lambda_lr=0.05 steps=3`.")
    t.add_argument("overrides", nargs="*", help="key=value (dotted keys nest: rollout.group_size=8)")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--trl", action="append", default=[], metavar="FIELD=VALUE",
                   help="engine=trl: a further GRPOConfig field (e.g. --trl use_vllm=true); repeatable")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("algorithms", help="list the weighting algorithms, advantage estimators and objectives")
    a.set_defaults(func=cmd_algorithms)

    i = sub.add_parser("interference", help="interference metrics of one or more runs")
    i.add_argument("run_dirs", nargs="+")
    i.add_argument("--split", default=None, choices=["val", "test"])
    i.set_defaults(func=cmd_interference)

    th = sub.add_parser("theory", help="exact softmax-policy experiments")
    th.add_argument("experiment", choices=["covariance-law", "pl"])
    th.add_argument("--instances", type=int, default=50)
    th.add_argument("--seed", type=int, default=0)
    th.set_defaults(func=cmd_theory)

    s = sub.add_parser("study", help="run a grid of training runs (a preset name or a YAML file)")
    s.add_argument("config", help="preset (quick, smol, paper) or YAML file")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--out", default=None, help="study directory (default: studies/<name>)")
    s.add_argument("--dry-run", action="store_true", help="validate the whole grid without loading models")
    s.set_defaults(func=cmd_study)

    r = sub.add_parser("report", help="HTML + Markdown report of a study or run directory")
    r.add_argument("dir")
    r.add_argument("--out", default=None)
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after flags: `train --overwrite steps=3`
    stray = [x for x in extra if x.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused a path the user gave (read-only, no permission, not a folder)
        if args.debug or exc.filename is None:
            raise
        print(f"error: {one_line(f'{exc.filename}: {exc.strerror or exc}')} (check the path and its permissions, or "
              f"choose another)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        msg = str(exc) or "interrupted"
        if args.command == "train":
            msg += f". Resume with: moalign train --resume {getattr(args, 'run_dir', None) or '<run_dir>'}"
        print(f"\n{msg}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
