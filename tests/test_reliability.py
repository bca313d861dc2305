"""Crash safety and bad input, on the `tiny` model.

* SIGKILL at chosen points (sampling, update, checkpoint write, final checkpoint, export) → ``--resume`` gives the
  uninterrupted run's metrics and weights, and the crash never leaves a torn or duplicated metrics line;
* a real SIGTERM → checkpoint → resume; a full disk while checkpointing → one-line error, resumable run;
* bad input → one line naming the problem, exit code 2, no traceback, no half-made run directory;
* objectives that fail, return NaN or text, or hang → missing rewards, the run goes on; a NaN loss skips the
  optimizer step; constant rewards (zero-variance groups) train nothing and stay finite.
"""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine import TINY

from moalign.cli import main
from moalign.config import TrainConfig, build_config, dump_config
from moalign.engine import checkpoint as ckpt
from moalign.engine.metrics import MetricsWriter, read_metrics
from moalign.engine.trainer import Trainer
from moalign.errors import UserError

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
RUN = TINY + [f"steps={STEPS}", "checkpoint.every=1"]  # the configuration of every crash test and of its reference
BATCH = 2 * 4  # rollout.prompts_per_step × rollout.group_size in TINY
EVAL_PROMPTS = 4


def comparable(run_dir: Path) -> list[dict]:
    """The metrics lines without wall-clock entries (which differ between any two runs)."""
    return [{k: v for k, v in line.items() if not k.startswith(("time/", "perf/")) and not k.endswith("seconds")}
            for line in read_metrics(run_dir / "metrics.jsonl")]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["trainable"]


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def checkpoint_files(run_dir: Path) -> list[str]:
    folder = ckpt.checkpoint_dir(run_dir)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def metric_steps(run_dir: Path) -> list[int]:
    """The step of every line, parsing each one strictly: a torn line fails here."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert comparable(run_dir) == comparable(reference)
    got, want = final_weights(run_dir), final_weights(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (run_dir / "summary.json").is_file() and (run_dir / "model" / "config.json").is_file()
    leftovers = [p.name for p in run_dir.rglob(".*tmp")]
    assert leftovers == []


# ------------------------------------------------------------------------------------------ SIGKILL anywhere

# fault → (checkpoints left by the crash, steps of the metrics lines left by the crash)
FAULTS = {
    "sample:1": ([], []),  # before anything was logged: the resume starts over
    "update:1": ([], [0]),  # the start evaluation is logged but no checkpoint exists: the metrics file is reset
    "write:step_0000002.pt": (["step_0000001.pt", ".step_0000002.pt.tmp"], [0, 1, 2]),  # mid checkpoint write
    "update:3": (["step_0000001.pt", "step_0000002.pt"], [0, 1, 2]),  # mid update, two checkpoints kept
    # the final checkpoint (the only one at step 3 with checkpoint.every=2), after the end evaluation was logged
    "write:step_0000003.pt checkpoint.every=2": (["step_0000002.pt", ".step_0000003.pt.tmp"], [0, 1, 2, 3, 3]),
    "export:3": (["step_0000002.pt", "step_0000003.pt"], [0, 1, 2, 3, 3]),  # the model half exported
}


@pytest.fixture(scope="module")
def crashes(tmp_path_factory) -> Path:
    """Run tests/fault_injection_run.py once: the reference run, then every fault killed and resumed."""
    root = tmp_path_factory.mktemp("crashes")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fault_injection_run.py"), str(root), *FAULTS, "--",
                           *RUN], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_reference_run_completes(crashes):
    results = json.loads((crashes / "results.json").read_text())
    assert results["reference"] == 0
    assert metric_steps(crashes / "reference") == [0, 1, 2, 3, 3]


@pytest.mark.parametrize("fault", FAULTS)
def test_sigkill_then_resume_equals_the_uninterrupted_run(crashes, fault):
    result = json.loads((crashes / "results.json").read_text())["faults"][fault]
    name = result["run"]
    assert result["kill"] == -signal.SIGKILL, (crashes / f"{name}.kill.log").read_text()[-2000:]
    left_checkpoints, left_steps = FAULTS[fault]
    crashed = crashes / f"{name}.after_kill"
    assert checkpoint_files(crashed) == sorted(left_checkpoints)  # the crash happened where it was meant to
    assert metric_steps(crashed) == left_steps  # whole lines only
    assert result["resume"] == 0, (crashes / f"{name}.resume.log").read_text()[-2000:]
    assert_same_run(crashes / name, crashes / "reference")


def test_resuming_a_complete_run_says_so(crashes, tmp_path, capsys):
    run_dir = tmp_path / "done"
    shutil.copytree(crashes / "reference", run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert f"{run_dir} is already complete" in " ".join(capsys.readouterr().out.split())  # unwrap rich's lines
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------------------------ SIGTERM, full disk


def test_sigterm_checkpoints_then_resume_continues_exactly(crashes, tmp_path, capsys):
    run_dir = tmp_path / "term"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # checkpoint.every=0: the only checkpoint is the one the signal asks for
    proc = subprocess.Popen([sys.executable, "-m", "moalign.cli", "train", *RUN, "checkpoint.every=0",
                             f"run_dir={run_dir}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not metric_steps(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the start evaluation is logged during step 1: signal while steps remain
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by signal 15" in err and "--resume" in err
    (saved,) = checkpoint_files(run_dir)
    assert saved < checkpoint_name(STEPS)  # stopped before the end
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, crashes / "reference")


class FullDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes are written, as on a disk that fills up."""

    def __init__(self, f, budget: int = 4096):
        self.f, self.budget = f, budget

    def write(self, data: bytes) -> int:
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def disk_fills_during_write(monkeypatch, step: int) -> None:
    def open_(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        return FullDisk(f) if Path(path).name == f".{checkpoint_name(step)}.tmp" else f

    monkeypatch.setattr(ckpt, "open", open_, raising=False)  # shadows the builtin inside checkpoint.py only


def rename_fails(monkeypatch, step: int) -> None:
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == checkpoint_name(step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def torch_save_fails(monkeypatch, step: int) -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("full_disk", [disk_fills_during_write, rename_fails, torch_save_fails])
def test_full_disk_while_checkpointing(crashes, tmp_path, monkeypatch, capsys, full_disk):
    run_dir = tmp_path / "full"
    with monkeypatch.context() as patch:
        full_disk(patch, 2)
        assert main(["train", *RUN, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not write checkpoint")
    assert "No space left on device" in err and f"--resume {run_dir}" in err and "Traceback" not in err
    assert checkpoint_files(run_dir) == [checkpoint_name(1)]  # the previous checkpoint is intact, no temporary file
    assert ckpt.load_checkpoint(ckpt.checkpoint_dir(run_dir) / checkpoint_name(1))["step"] == 1
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, crashes / "reference")


def test_metrics_write_that_fails_leaves_no_torn_line(tmp_path, monkeypatch):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"step": 1, "x": 1.0})
    whole = (tmp_path / "metrics.jsonl").read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:5]))  # the disk fills after 5 bytes
    with pytest.raises(UserError, match="No space left on device"):
        writer.write({"step": 2, "x": 2.0})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == whole


# ------------------------------------------------------------------------------------------ bad input (CLI)


def assert_user_error(capsys, argv: list[str], fragment: str, run_dir: Path) -> None:
    """One line naming the problem, exit code 2, no traceback, and no half-made run directory."""
    assert main(["train", *argv, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err
    assert not run_dir.exists() or not any(run_dir.iterdir())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


ROWS = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(12)]


@pytest.mark.parametrize("overrides, fragment", [
    (["rollout.group_size=four"], "rollout.group_size"),
    (["rollout.group_size=0"], "rollout.group_size: Input should be greater than or equal to 1"),
    (["loss.clip_eps_high=-0.1"], "loss.clip_eps_high: Input should be greater than 0"),
    (["optim.lr=0"], "optim.lr: Input should be greater than 0"),
    (["steps=0"], "steps: Input should be greater than or equal to 1"),
    (["data.difficulty=9"], "data.difficulty"),
    (["data.source=files"], "data.source='files' needs data.path"),
    (["weighting=linear", "weighting.weights=heavy"], "weights"),
    (["objectives=[politeness]"], "unknown objective 'politeness'"),
    (["objectives=[no_such_module_xyz:score]"], "cannot import module 'no_such_module_xyz'"),
    (["objectives=[accuracy, bad_objectives:accuracy]"], "are all named 'accuracy'"),
    (["objectives=[a=bad_objectives:always_one, a=bad_objectives:always_zero]"], "are all named 'a'"),
    (["model.name=/nonexistent/model-dir"], "could not load model '/nonexistent/model-dir'"),
    (["rollout.max_prompt_tokens=8"], "> rollout.max_prompt_tokens=8; raise rollout.max_prompt_tokens"),
])
def test_bad_settings(capsys, tmp_path, overrides, fragment):
    assert_user_error(capsys, [*TINY, *overrides], fragment, tmp_path / "run")


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe not text", "cannot read the file"),
    (b"", "the file has no rows"),
    (b'{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "unclosed\n', "line 2: invalid JSON"),
])
def test_unreadable_or_empty_data_file(capsys, tmp_path, content, fragment):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    assert_user_error(capsys, [*TINY, "data.source=files", f"data.path={data}"], fragment, tmp_path / "run")


def test_missing_data_file_and_columns(capsys, tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert_user_error(capsys, [*TINY, "data.source=files", f"data.path={missing}"], "file not found",
                      tmp_path / "run")
    renamed = write_jsonl(tmp_path / "q.jsonl", [{"question": r["prompt"], "answer": r["answer"]} for r in ROWS])
    assert_user_error(capsys, [*TINY, "data.source=files", f"data.path={renamed}"],
                      "line 1: missing column 'prompt'", tmp_path / "run")
    corrupt = tmp_path / "data.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    assert_user_error(capsys, [*TINY, "data.source=files", f"data.path={corrupt}"], "cannot read the parquet file",
                      tmp_path / "run")


def test_weights_that_do_not_match_the_objectives_fail_before_the_model_loads(capsys, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr("moalign.engine.trainer.load_model", no_model)
    assert_user_error(capsys, [*TINY, "weighting=linear", "weighting.weights=[1, 2]"],
                      "weighting.weights has 2 values but needs 3: give one value per objective", tmp_path / "run")


def test_malformed_and_unknown_yaml_config(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nrollout: {group_size: 4\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML at line 3" in err and err.count("\n") == 1
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rollout:\n  groupsize: 4\n")
    assert_user_error(capsys, ["--config", str(unknown)], "unknown key 'rollout.groupsize'", tmp_path / "run")


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path, crashes):
    run_dir = tmp_path / "run"
    shutil.copytree(crashes / "reference", run_dir)
    (run_dir / "summary.json").unlink()
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["train", "--resume", str(run_dir), "--overwrite"]) == 2
    assert "pass only one of them" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_overwrite_replaces_an_existing_run(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(build_config(TrainConfig, {}, TINY)))  # an older run's files
    (run_dir / "metrics.jsonl").write_text('{"step": 7}\n')
    (run_dir / "error.txt").write_text("from an older run")
    assert main(["train", *TINY, "steps=1", "eval.test_at_end=false", f"run_dir={run_dir}", "--overwrite"]) == 0
    assert not (run_dir / "error.txt").exists() and metric_steps(run_dir) == [0, 1, 1]


def test_debug_shows_the_traceback_of_a_data_error(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        main(["--debug", "train", *TINY, "data.source=files", f"data.path={tmp_path / 'nope.jsonl'}",
              f"run_dir={tmp_path / 'run'}"])


# ------------------------------------------------------------------------------------------ bad objectives, bad math


def tiny_trainer(tmp_path: Path, *overrides: str, objectives: list | None = None) -> Trainer:
    cfg = build_config(TrainConfig, {}, [*TINY, *overrides])
    if objectives is not None:  # dict specs (a per-objective timeout) bypass the config's list of strings
        cfg = cfg.model_copy(update={"objectives": objectives})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return Trainer(cfg, run_dir)


def finite_weights(trainer: Trainer) -> bool:
    return all(torch.isfinite(p).all() for p in trainer.params)


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # the dict spec, dumped as a config string
def test_objectives_that_raise_return_nan_or_text_or_hang_become_missing_rewards(tmp_path):
    bad = ["raises", "returns_nan", "returns_text"]
    hang = {"function": "bad_objectives:hangs", "timeout_s": 0.1}
    trainer = tiny_trainer(tmp_path, "steps=1", "eval.test_at_end=false",
                           objectives=["accuracy", *(f"bad_objectives:{b}" for b in bad), hang])
    summary = trainer.run()
    assert summary["steps"] == 1 and finite_weights(trainer)
    start, step, end = read_metrics(trainer.run_dir / "metrics.jsonl")
    for name in [*bad, "hangs"]:
        assert step[f"train/{name}/missing"] == BATCH and step[f"train/{name}/mean"] is None
        assert (start[f"eval/val/sampled/{name}/missing"] == end[f"eval/val/sampled/{name}/missing"]
                == EVAL_PROMPTS * TrainConfig().eval.samples)  # every completion of every prompt
    assert step["train/accuracy/missing"] == 0
    assert step["train/missing_rewards"] == 4 * BATCH
    assert step["train/first_reward_error"] == "raises: ValueError: this objective always fails"
    assert math.isfinite(step["loss/policy"]) and math.isfinite(step["actor/grad_norm"])


def test_non_finite_loss_skips_the_optimizer_step(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, "weighting=linear")
    before = [p.detach().clone() for p in trainer.params]
    monkeypatch.setattr(trainer.weighting, "advantages",
                        lambda rewards, *args: torch.full((rewards.shape[0],), float("nan")))
    trainer.run()
    lines = [line for line in read_metrics(trainer.run_dir / "metrics.jsonl") if "actor/skipped_steps" in line]
    assert [line["actor/skipped_steps"] for line in lines] == [1, 2]  # one optimizer step per training step
    assert all(line["loss/policy"] is None for line in lines)  # NaN, written as null
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, before)) and finite_weights(trainer)


@pytest.mark.parametrize("weighting", ["ctwa", "mgda"])
def test_constant_rewards_zero_variance_groups_train_nothing_and_stay_finite(tmp_path, weighting):
    trainer = tiny_trainer(tmp_path, f"weighting={weighting}", "loss.kl_coef=0", "eval.test_at_end=false",
                           objectives=["bad_objectives:always_zero", "bad_objectives:always_one"])
    before = [p.detach().clone() for p in trainer.params]
    trainer.run()
    lines = [line for line in read_metrics(trainer.run_dir / "metrics.jsonl") if "loss/policy" in line]
    assert len(lines) == 2
    for line in lines:
        assert (line["train/always_zero/mean"], line["train/always_one/mean"]) == (0.0, 1.0)
        assert line["loss/policy"] == 0.0 and line["actor/grad_norm"] == 0.0  # every advantage is 0
        assert line["actor/skipped_steps"] == 0
        weights = [v for k, v in line.items() if k.startswith("weight/")]
        assert len(weights) == 2 and all(v is not None and math.isfinite(v) for v in weights)  # NaN is written null
    # zero gradients: AdamW only decays the weights, by exactly lr · weight_decay per step
    decay = (1 - 1e-3 * 0.01) ** 2
    assert all(torch.allclose(p, q * decay, rtol=1e-6, atol=1e-7) for p, q in zip(trainer.params, before))
