"""Hostile input and faults, on the `tiny` model: what moalign deletes, reads back, runs, and how it answers.

* deletion: ``--overwrite`` empties only a recognisable run directory, never the working directory, an ancestor, the
  home directory or a root; a failed start removes only what it made (checked on whole scratch trees);
* checkpoints load without running code (a crafted one must not write its file), a torn latest one falls back to the
  one before, an unsafe one is refused, also when ``moalign study`` resumes;
* one-line errors (exit 2) for bad files, paths, read-only places, batches that cannot fit, non-finite numbers, YAML
  alias bombs and huge values;
* a run directory has one process at a time, and a resume may not change what the run computes;
* signals are honoured while the model loads, and a second Ctrl-C stops at once;
* every name a run logs is readable by the commands that read runs; report.md escapes them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_engine import TINY

from moalign import bounded_yaml
from moalign.cli import main
from moalign.config import TrainConfig, build_config
from moalign.engine import checkpoint as ckpt
from moalign.engine.memory import sampling_bytes
from moalign.models.cache import cache_root
from moalign.engine.run_dir import LOCK_FILE, RunLock, is_run_dir, remove_run_entry
from moalign.errors import UserError
from moalign.study.report import Bullets, Heading, Paragraph, Table, render_markdown

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
RUN = TINY + ["checkpoint.every=1", "eval.test_at_end=false"]  # 2 steps, a checkpoint after each


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative) with its bytes (None for a folder): a snapshot to compare."""
    return {str(p.relative_to(root)): (None if p.is_dir() and not p.is_symlink() else
                                       p.read_bytes() if p.is_file() else os.readlink(p))
            for p in sorted(root.rglob("*"))}


def one_line_error(capsys, argv: list[str], fragment: str) -> str:
    """``moalign ARGV`` exits 2 with one line, no traceback, that holds ``fragment``; returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err, err
    return err


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step tiny run with checkpoints after steps 1 and 2 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *RUN, f"run_dir={run_dir}"]) == 0
    return run_dir


def unfinished_copy(finished_run: Path, to: Path) -> Path:
    """The finished run as a run that was stopped after its last checkpoint and before its summary."""
    shutil.copytree(finished_run, to)
    (to / "summary.json").unlink()
    return to


# ------------------------------------------------------------------------------------------ deletion


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """A scratch tree: work/{keep.txt, sub/{mine.txt}}, a fake home with a file, the working directory work/sub."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("a file of the user")
    (work / "sub" / "mine.txt").write_text("another")
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("home")
    monkeypatch.setenv("MOALIGN_CACHE", str(cache_root()))  # the built models stay where they are
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work / "sub")
    return tmp_path


@pytest.mark.parametrize("run_dir, why", [
    ("..", "is the working directory"),  # an ancestor of the working directory
    (".", "is the working directory"),
    ("HOME", "is the home directory"),
    ("/", "is the working directory"),  # the root contains the working directory: refused on that ground first
])
def test_overwrite_never_empties_the_working_directory_its_ancestors_or_home(capsys, scratch, run_dir, why):
    before = tree(scratch)
    target = os.environ["HOME"] if run_dir == "HOME" else run_dir
    one_line_error(capsys, ["train", *RUN, f"run_dir={target}", "--overwrite"], f"--overwrite refuses to empty")
    assert tree(scratch) == before


def test_an_empty_run_dir_is_refused_before_anything_is_touched(capsys, scratch):
    before = tree(scratch)
    one_line_error(capsys, ["train", *RUN, "run_dir=", "--overwrite"], "run_dir: is empty; name a directory")
    assert tree(scratch) == before


def test_overwrite_refuses_a_directory_that_is_not_a_run(capsys, scratch, finished_run):
    foreign = scratch / "work" / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    one_line_error(capsys, ["train", *RUN, f"run_dir={foreign}", "--overwrite"],
                   "it is not a moalign run directory (no config.yaml of a run, no .moalign.lock)")
    run = scratch / "work" / "run"
    shutil.copytree(finished_run, run)
    (run / "analysis.ipynb").write_text("{}")  # the user's own file inside a run directory
    before = tree(scratch)
    one_line_error(capsys, ["train", *RUN, f"run_dir={run}", "--overwrite"],
                   "it holds files a run does not write (analysis.ipynb)")
    assert tree(scratch) == before


def test_overwrite_replaces_a_run_and_nothing_outside_it(capsys, scratch, finished_run):
    run = scratch / "work" / "run"
    shutil.copytree(finished_run, run)
    precious = scratch / "work" / "precious"
    precious.mkdir()
    (precious / "weights.bin").write_bytes(b"not the run's")
    shutil.rmtree(run / "model")
    (run / "model").symlink_to(precious, target_is_directory=True)  # a link inside the run is removed, not followed
    outside = {k: v for k, v in tree(scratch).items() if not k.startswith("work/run")}
    old_checkpoint = (ckpt.checkpoint_dir(run) / "step_0000002.pt").read_bytes()
    assert main(["train", *RUN, "steps=1", f"run_dir={run}", "--overwrite"]) == 0
    assert {k: v for k, v in tree(scratch).items() if not k.startswith("work/run")} == outside
    assert metric_steps(run) == [0, 1, 1]  # the new run's lines only
    assert sorted(p.name for p in ckpt.checkpoint_dir(run).iterdir()) == ["step_0000001.pt"]
    assert not (run / "model").is_symlink() and (run / "model" / "config.json").is_file()
    assert (ckpt.checkpoint_dir(run) / "step_0000001.pt").read_bytes() != old_checkpoint


def test_a_failed_start_removes_only_the_directories_it_created(capsys, scratch):
    existing = scratch / "work" / "empty_run"
    existing.mkdir()
    for run_dir in (scratch / "work" / "new" / "deeper" / "run", existing):
        one_line_error(capsys, ["train", *RUN, "model.name=/nonexistent/model", f"run_dir={run_dir}"],
                       "could not load model")
    assert not (scratch / "work" / "new").exists()  # made by the start: removed
    assert existing.is_dir() and list(existing.iterdir()) == []  # the user's: kept, emptied of what the start wrote
    assert (scratch / "work" / "keep.txt").read_text() == "a file of the user"


def test_remove_run_entry_deletes_only_what_runs_write(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    remove_run_entry(tmp_path, "checkpoints")
    assert not (tmp_path / "checkpoints").exists()
    (tmp_path / "data").mkdir()
    for name in ("data", "..", LOCK_FILE, "/"):
        with pytest.raises(ValueError, match="is not an entry a run writes"):
            remove_run_entry(tmp_path, name)
    assert (tmp_path / "data").is_dir()


def test_every_deletion_and_checkpoint_read_in_the_package_is_a_guarded_one():
    """The only ``rmtree`` calls: ``run_dir.remove_run_entry`` (fixed names inside a run directory) and the model
    cache's own temporary folder; nothing loads with ``weights_only=False``."""
    hits = []
    for path in sorted((REPO / "moalign").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"rmtree\(|weights_only=False", line):
                hits.append((path.relative_to(REPO).as_posix(), line.strip()))
    assert hits == [
        ("moalign/engine/run_dir.py", "shutil.rmtree(path)  # guarded: a fixed entry name inside a run directory"),
        ("moalign/models/cache.py", "shutil.rmtree(tmp, ignore_errors=True)  # guarded: the folder mkdtemp made for "
                                    "this call, nothing else"),
    ]


# ------------------------------------------------------------------------------------------ checkpoints


class WritesAFile:
    """Unpickling this (with a plain pickle load) would create ``path``: ``open(path, "w")``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_crafted_checkpoint(run_dir: Path, marker: Path) -> Path:
    """Replace the run's latest checkpoint by one that keeps its state but also carries a ``WritesAFile``."""
    latest = ckpt.latest_checkpoint(run_dir)
    state = ckpt.load_checkpoint(latest)
    state["payload"] = WritesAFile(marker)
    torch.save(state, latest)
    return latest


def test_a_crafted_checkpoint_is_not_run_on_resume(capsys, tmp_path, finished_run):
    run_dir = unfinished_copy(finished_run, tmp_path / "run")
    marker = tmp_path / "PWNED"
    plant_crafted_checkpoint(run_dir, marker)
    before = tree(run_dir)
    one_line_error(capsys, ["train", "--resume", str(run_dir)],
                   "step_0000002.pt refers to io.open, which loading it would have to run (nothing was run)")
    assert not marker.exists()
    unchanged = ("checkpoints", "metrics.jsonl", "model")  # the resume rewrote config.yaml (its new place) and the lock
    assert {k: v for k, v in tree(run_dir).items() if k.startswith(unchanged)} == {
        k: v for k, v in before.items() if k.startswith(unchanged)}


def test_a_crafted_checkpoint_is_not_run_when_a_study_resumes(tmp_path, monkeypatch):
    from moalign.study.runner import run_study

    study = tmp_path / "study.yaml"
    base = build_config(TrainConfig, {}, RUN + ["steps=1"]).model_dump(mode="json")
    study.write_text(yaml.safe_dump({"name": "s", "base": base | {"run_dir": None}, "grid": {"seed": [0]}}))
    out = tmp_path / "out"
    run_study(study, out_dir=out)
    (run_dir,) = (out / "runs").iterdir()
    (run_dir / "summary.json").unlink()  # the run looks interrupted: the study resumes it from its checkpoint
    marker = tmp_path / "PWNED"
    plant_crafted_checkpoint(run_dir, marker)
    with pytest.raises(UserError, match="1 run\\(s\\) failed"):
        run_study(study, out_dir=out)
    assert not marker.exists()
    assert "refers to io.open" in (run_dir / "error.txt").read_text()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(capsys, tmp_path, finished_run, damage):
    run_dir = unfinished_copy(finished_run, tmp_path / "run")
    latest = ckpt.checkpoint_dir(run_dir) / "step_0000002.pt"
    data = latest.read_bytes()
    latest.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "garbage": b"\x00not a zip" * 50}[damage])
    assert main(["train", "--resume", str(run_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"warning: checkpoint {latest} cannot be read" in out
    assert "moved aside as step_0000002.pt.unreadable, resuming from step_0000001.pt" in out
    assert metric_steps(run_dir) == [0, 1, 2, 2]  # step 2 trained again, from step 1's checkpoint
    assert (run_dir / "summary.json").is_file()
    assert sorted(p.name for p in ckpt.checkpoint_dir(run_dir).iterdir()) == [
        "step_0000001.pt", "step_0000002.pt", "step_0000002.pt.unreadable"]


def test_no_readable_checkpoint_is_one_line_and_moves_nothing(capsys, tmp_path, finished_run):
    run_dir = unfinished_copy(finished_run, tmp_path / "run")
    for path in ckpt.checkpoint_dir(run_dir).glob("step_*.pt"):
        path.write_bytes(b"")
    one_line_error(capsys, ["train", "--resume", str(run_dir)], "can be read (checkpoint ")
    assert sorted(p.name for p in ckpt.checkpoint_dir(run_dir).iterdir()) == ["step_0000001.pt", "step_0000002.pt"]


def test_a_checkpoint_of_another_shape_is_named(tmp_path, finished_run):
    path = tmp_path / "other.pt"
    torch.save({"step": 1}, path)
    with pytest.raises(ckpt.UnreadableCheckpoint, match="is not a moalign checkpoint \\(it lacks trainable"):
        ckpt.load_checkpoint(path, required=("step", "trainable"))


# ------------------------------------------------------------------------------------------ one-line errors


def test_a_config_file_that_is_not_utf8(capsys, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("steps: 3  # réglage\n".encode("latin-1"))
    one_line_error(capsys, ["train", "--config", str(config)],
                   f"config file {config} is not UTF-8 text (byte 0xe9 at offset 13); save it as UTF-8")
    one_line_error(capsys, ["train", "--config", "/dev/null"], "config file /dev/null is not a regular file")


@pytest.mark.parametrize("run_dir", ["/dev/null", "FILE"])
def test_a_run_dir_that_is_a_file(capsys, tmp_path, run_dir):
    if run_dir == "FILE":
        run_dir = tmp_path / "results.csv"
        run_dir.write_text("a,b\n")
    one_line_error(capsys, ["train", *RUN, f"run_dir={run_dir}"],
                   f"run_dir={run_dir} is an existing file, not a directory; choose a directory path")


def read_only_file_system(monkeypatch, root: Path) -> None:
    """Creating anything under ``root`` fails with EROFS, as on a read-only mount (works as root, unlike chmod)."""
    real_mkdir, real_open = os.mkdir, os.open

    def inside(path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(root)

    def mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.exists(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def test_a_read_only_file_system(capsys, tmp_path, monkeypatch):
    (tmp_path / "mounted" / "existing").mkdir(parents=True)
    read_only_file_system(monkeypatch, tmp_path / "mounted")
    one_line_error(capsys, ["train", *RUN, f"run_dir={tmp_path / 'mounted' / 'new'}"],
                   f"cannot create run directory {tmp_path / 'mounted' / 'new'}: Read-only file system; choose a "
                   f"writable run_dir")
    one_line_error(capsys, ["train", *RUN, f"run_dir={tmp_path / 'mounted' / 'existing'}"],
                   f"cannot write in {tmp_path / 'mounted' / 'existing'}: Read-only file system; choose a writable "
                   f"directory")
    assert list((tmp_path / "mounted" / "existing").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (the EROFS test covers it)")
def test_a_read_only_directory(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line_error(capsys, ["train", *RUN, f"run_dir={locked / 'run'}"],
                       f"cannot create run directory {locked / 'run'}: Permission denied")
    finally:
        locked.chmod(0o700)


def test_a_batch_that_cannot_fit_is_refused_before_sampling(capsys, tmp_path, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the memory check")

    monkeypatch.setattr("moalign.engine.trainer.fast_generate", no_sampling)
    # 200 000 sequences of tiny need ≈ 22 GB: pin the memory there is, so that the outcome does not depend on the
    # machine's free memory
    monkeypatch.setattr("moalign.engine.memory.available_bytes", lambda device: 8e9)
    run_dir = tmp_path / "run"
    err = one_line_error(capsys, ["train", *RUN, "rollout.group_size=100000", f"run_dir={run_dir}"],
                         "rollout.prompts_per_step × rollout.group_size = 2 × 100000 = 200000 sequences sampled at "
                         "once need at least")
    assert "lower rollout.group_size, rollout.prompts_per_step or rollout.max_new_tokens" in err
    assert not run_dir.exists()


def test_sampling_bytes_by_hand():
    """2 layers × 2 kv-heads × 8 dims, keys and values, 10 positions, 3 rows, 4 bytes; + 3 rows × 100 logits × 4."""
    config = type("C", (), {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "hidden_size": 32, "vocab_size": 100})()
    assert sampling_bytes(config, rows=3, positions=10, bytes_per_value=4) == 2 * 2 * 2 * 8 * 10 * 3 * 4 + 3 * 100 * 4
    assert sampling_bytes(object(), 3, 10, 4) is None


NON_FINITE_OR_DEGENERATE = [
    (["optim.lr=.inf"], "optim.lr: Input should be a finite number (got inf)"),
    (["rollout.temperature=.inf"], "rollout.temperature: Input should be a finite number (got inf)"),
    (["rollout.temperature=1e-30"], "rollout.temperature: must be at least 0.01 (below it sampling is argmax"),
    (["eval.temperature=0.001"], "eval.temperature: must be at least 0.01"),
    (["loss.kl_coef=.inf"], "loss.kl_coef: Input should be a finite number (got inf)"),
    (["weighting.lambda_lr=.inf"], "weighting.lambda_lr: Input should be a finite number (got inf)"),
    (["weighting=linear", "weighting.weights=[.nan,1,1]"], "weighting.weights.0: Input should be a finite number"),
    (["weighting=linear", "weighting.weights=[0,0,0]"], "weighting.weights: weights are all 0: no objective would "
                                                        "give a training signal"),
    (["weighting.init_weights=[1,.inf,1]"], "weighting.init_weights.1: Input should be a finite number"),
    (["threads=100000"], "threads: 100000 is more than 4 × the"),
    (["weighting=linear", "weighting.weights=[1e308,1,1]"], "weighting.weights: 1e+308 is too large to compute with"),
    (["weighting.cov_targets=[1e39,0.1,0.1]"], "weighting.cov_targets: 1e+39 is too large to compute with"),
    (["diagnostics.j_star=.nan"], "diagnostics.j_star: Input should be a finite number"),
    (["optim.betas=[0.9,1.5]"], "optim.betas: AdamW's betas must each be in [0, 1)"),
    (["seed=-1"], "seed: Input should be greater than or equal to 0"),
    (["seed=99999999999999999999"], "seed: Input should be less than 4294967296"),
    (["device=gpu0"], "device: must be auto, cpu, cuda, cuda:N (a GPU index) or mps"),
]


@pytest.mark.parametrize("overrides, fragment", NON_FINITE_OR_DEGENERATE)
def test_non_finite_and_degenerate_settings_are_refused(capsys, tmp_path, overrides, fragment):
    run_dir = tmp_path / "run"
    one_line_error(capsys, ["train", *RUN, *overrides, f"run_dir={run_dir}"], fragment)
    assert not run_dir.exists()


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


def test_a_yaml_alias_bomb_is_refused_at_once(capsys, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 600
    start = time.perf_counter()
    one_line_error(capsys, ["train", "--config", str(bomb)],
                   f"config file {bomb} is refused: it expands to more than 100000 nodes")
    one_line_error(capsys, ["train", f"objectives={{{', '.join(BOMB.strip().splitlines())}}}"],
                   "override objectives is refused: it expands to more than 100000 nodes")
    assert time.perf_counter() - start < 10


def test_bounded_yaml_by_hand():
    assert bounded_yaml.load("a: &x [1, 2]\nb: *x\n", "t") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(UserError, match="recursive alias"):
        bounded_yaml.load("a: &x [*x]\n", "t")
    with pytest.raises(UserError, match="nested too deeply"):
        bounded_yaml.load("[" * 5000 + "]" * 5000, "t")
    assert bounded_yaml.load("", "t") is None


def test_a_huge_value_gives_a_short_error_line(capsys, tmp_path):
    huge = "[" + ", ".join(["x" * 50] * 20_000) + "]"
    err = one_line_error(capsys, ["train", f"steps={huge}", f"run_dir={tmp_path / 'run'}"], "steps:")
    assert len(err) < 1200


# ------------------------------------------------------------------------------------------ lock, resume


def test_a_second_process_on_a_run_directory_is_told_who_holds_it(capsys, tmp_path, finished_run):
    run_dir = unfinished_copy(finished_run, tmp_path / "run")
    before = tree(run_dir)
    with RunLock(run_dir):  # another process holds the run (a second open file: flock conflicts as between processes)
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        for argv in (["train", "--resume", str(run_dir)], ["train", *RUN, f"run_dir={run_dir}", "--overwrite"]):
            one_line_error(capsys, argv, f"{run_dir} is in use by process {os.getpid()} on {holder['host']} "
                                         f"(started {holder['started']}); wait for it to finish or stop it")
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        with RunLock(fresh):  # two fresh starts on one (default) name: the second is refused
            one_line_error(capsys, ["train", *RUN, f"run_dir={fresh}"], f"{fresh} is in use by process")
    after = tree(run_dir)
    assert {k: v for k, v in after.items() if k != LOCK_FILE} == {k: v for k, v in before.items() if k != LOCK_FILE}
    assert main(["train", "--resume", str(run_dir)]) == 0  # free again


@pytest.mark.parametrize("overrides, fragment", [
    (["seed=99", "optim.lr=1e-4"], "optim.lr=0.0001, seed=99 would change what the run computes"),
    (["weighting=mgda"], "weighting.name='mgda' would change what the run computes"),
    (["objectives=[accuracy,clarity]"], "objectives=['accuracy', 'clarity'] would change what the run computes"),
    (["model.train_last_k_layers=1"], "model.train_last_k_layers=1 would change"),
    (["steps=1"], "steps=1 is below the run's steps=2; steps may only grow on resume"),
])
def test_resume_refuses_changes_before_writing_anything(capsys, tmp_path, finished_run, overrides, fragment):
    run_dir = unfinished_copy(finished_run, tmp_path / "run")
    before = tree(run_dir)
    one_line_error(capsys, ["train", "--resume", str(run_dir), *overrides], fragment)
    assert tree(run_dir) == before  # config.yaml included
    assert main(["train", "--resume", str(run_dir)]) == 0  # a plain resume still works


def test_resume_may_grow_steps_and_change_logging(capsys, tmp_path, finished_run):
    run_dir = unfinished_copy(finished_run, tmp_path / "run")
    assert main(["train", "--resume", str(run_dir), "steps=3", "log.progress=false", "checkpoint.keep=3"]) == 0
    assert metric_steps(run_dir) == [0, 1, 2, 2, 3, 3]  # the end of step 2 is an evaluation between, then step 3
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["steps"] == 3 and saved["checkpoint"]["keep"] == 3
    one_line_error(capsys, ["train", "--resume", str(run_dir), "steps=4"],
                   "the run is complete (it has summary.json), so steps cannot change it")


# ------------------------------------------------------------------------------------------ signals


def start_cli(args: list[str], tmp_path: Path, ignore_sigint: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None  # a background job
    return subprocess.Popen([sys.executable, "-u", "-m", "moalign.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)


def wait_for(stream, text: bytes, seen: bytearray, timeout: float = 120) -> None:
    """Read ``stream`` into ``seen`` until ``text`` appears."""
    deadline = time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
        ready, _, _ = select.select([stream], [], [], 0.05)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, seen.decode(errors="replace")[-2000:]  # the process ended first
            seen += chunk


def test_sigint_while_the_model_loads_is_not_lost(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_cli(["train", *RUN, f"run_dir={run_dir}"], tmp_path, ignore_sigint=True)
    wait_for(proc.stdout, b"moalign train:", bytearray())  # printed just before the data and model load
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"stopped at once by signal 2" in err
    assert not (run_dir / "summary.json").exists() and ckpt.latest_checkpoint(run_dir) is None


def test_a_second_ctrl_c_stops_at_once_even_in_a_hanging_objective(tmp_path):
    run_dir = tmp_path / "run"
    # bad_objectives:hangs takes 5 s per sample: step 1's scoring alone takes 40 s
    proc = start_cli(["train", *RUN, "objectives=[accuracy, bad_objectives:hangs]", "log.progress=true",
                      f"run_dir={run_dir}"], tmp_path)
    seen = bytearray()
    wait_for(proc.stderr, b"training:", seen)  # the progress bar: the trainer's loop starts
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    wait_for(proc.stderr, b"stopping at the end of this step", seen)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 5
    assert proc.returncode == 130
    assert b"stopped at once by signal 2 (a second signal" in seen + err


# ------------------------------------------------------------------------------------------ names from runs


def test_a_user_objective_named_by_its_spec_is_readable_by_every_command(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *RUN, "steps=1", "objectives=[accuracy, bad_objectives:always_one]",
                 f"run_dir={run_dir}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "error" not in summary["interference"] and summary["objectives"] == ["accuracy", "always_one"]
    capsys.readouterr()
    assert main(["interference", str(run_dir)]) == 0
    assert "always_one" in capsys.readouterr().out
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    assert "always_one" in (tmp_path / "report" / "report.md").read_text()


def test_objective_names_from_specs_without_a_logged_scalarization():
    from moalign.diagnostics.runs import _objective_names

    config = {"objectives": ["accuracy", "pkg.mod:const", "short=pkg.mod:long_name",
                             {"function": "pkg:fn", "timeout_s": 5}, {"name": "polite", "function": "pkg:p"}]}
    assert _objective_names(config, [], Path(".")) == ["accuracy", "const", "short", "fn", "polite"]
    logged = [{"step": 0, "scalarization/b": 0.5, "scalarization/a": 0.5}]
    assert _objective_names(config, logged, Path(".")) == ["b", "a"]


def test_report_md_escapes_names_from_runs():
    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>![t](http://x/t.png)`code`"
    text = render_markdown(f"moalign report: {hostile}", [
        Heading(hostile), Paragraph(f"**{hostile}** (bold stays)"), Bullets([hostile]),
        Table(["objective", hostile], [[hostile, "[+0.1, +0.2]"]], hostile)])
    assert "<" not in text and ">" not in text and "![" not in text and "](" not in text.replace("\\](", "")
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;!\\[t\\](http://x/t.png)"
                      "\\`code\\`") == 7
    assert "**&lt;script&gt;" in text and "\\[+0.1, +0.2\\]" in text


def test_is_run_dir(tmp_path, finished_run):
    assert is_run_dir(finished_run)
    (tmp_path / "config.yaml").write_text("name: my project\n")
    assert not is_run_dir(tmp_path)


# ------------------------------------------------------------------------------------------ more hostile input


def test_hostile_inputs_to_the_commands_that_read_runs(capsys, tmp_path, finished_run):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(finished_run, corrupt)
    (corrupt / "metrics.jsonl").write_bytes(b"\xff\xfe binary")
    one_line_error(capsys, ["interference", str(corrupt)], "metrics.jsonl is not UTF-8 text (byte 0xff at offset 0)")
    one_line_error(capsys, ["report", str(corrupt)], "metrics.jsonl is not UTF-8 text")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    one_line_error(capsys, ["interference", str(loop)], "is not a run directory")
    one_line_error(capsys, ["report", str(tmp_path / "empty_or_missing")], "is not a directory")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(capsys, ["report", str(finished_run), "--out", str(a_file)], "Not a directory")


def test_a_corrupt_summary_of_a_complete_run(capsys, tmp_path, finished_run):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "summary.json").write_text("{not json")
    one_line_error(capsys, ["train", "--resume", str(run_dir)], "summary.json is corrupt; delete it and resume again")
    (run_dir / "summary.json").unlink()
    assert main(["train", "--resume", str(run_dir)]) == 0  # the final checkpoint: only the export and summary redone
    assert metric_steps(run_dir) == [0, 1, 2, 2]


def test_a_report_inside_a_run_does_not_block_overwrite(capsys, tmp_path, finished_run):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert main(["report", str(run_dir)]) == 0  # writes run_dir/report/
    assert main(["train", *RUN, "steps=1", f"run_dir={run_dir}", "--overwrite"]) == 0
    assert not (run_dir / "report").exists()


def test_an_exhausted_arithmetic_split_is_said_in_seconds():
    from moalign.data.arithmetic import generate_problems

    start = time.perf_counter()
    with pytest.raises(UserError, match="could only generate 435.. distinct difficulty-1 train problems \\(asked for "
                                        "100000\\); lower data.num_train"):
        generate_problems(1, 100_000, 0, "train")
    assert time.perf_counter() - start < 60  # was ≈ 10⁸ draws (tens of minutes)


def test_two_studies_on_one_directory(tmp_path):
    from moalign.study.runner import STUDY_LOCK_FILE, run_study

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "base": {"model": "tiny", "steps": 1}, "grid": {"seed": [0]}}))
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out, STUDY_LOCK_FILE):
        with pytest.raises(UserError, match=f"{out} is in use by process {os.getpid()}"):
            run_study(study, out_dir=out, train_fn=lambda *args: pytest.fail("trained while another study ran"))


@pytest.mark.parametrize("overrides, fragment", [
    (["data.num_train=2000000"], "data.num_train: Input should be less than or equal to 1000000"),
    (["data.num_val=-1"], "data.num_val: Input should be greater than or equal to 0"),
])
def test_more_refused_settings(capsys, tmp_path, overrides, fragment):
    one_line_error(capsys, ["train", *RUN, f"run_dir={tmp_path / 'run'}", *overrides], fragment)


def test_a_tilde_in_run_dir_is_the_home_directory():
    assert build_config(TrainConfig, {}, ["run_dir=~/runs/x"]).run_dir == str(Path.home() / "runs" / "x")
