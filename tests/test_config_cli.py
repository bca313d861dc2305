"""Typed config, overrides and the CLI's handling of bad input (no model is loaded here)."""

import pytest
import yaml

from moalign.cli import main
from moalign.config import TrainConfig, build_config, dump_config, load_yaml
from moalign.errors import UserError


def test_defaults_and_top_level_keys():
    cfg = TrainConfig()
    assert cfg.model.name == "smollm2-135m"
    assert cfg.weighting.name == "ctwa"
    assert cfg.objectives == ["accuracy", "conciseness", "clarity"]
    for key in ("model", "data", "objectives", "weighting", "estimator", "steps", "seed", "run_dir"):
        assert key in TrainConfig.model_fields


def test_overrides_nest_and_name_shortcuts():
    cfg = build_config(TrainConfig, {}, ["model=tiny", "weighting=ctwa", "weighting.lambda_lr=0.05",
                                         "estimator=rloo", "steps=3", "seed=1", "run_dir=runs/x",
                                         "rollout.group_size=8", "objectives=[accuracy, clarity]"])
    assert cfg.model.name == "tiny"
    assert cfg.weighting.params() == {"lambda_lr": 0.05}
    assert cfg.estimator.name == "rloo"
    assert (cfg.steps, cfg.seed, cfg.run_dir, cfg.rollout.group_size) == (3, 1, "runs/x", 8)
    assert cfg.objectives == ["accuracy", "clarity"]


def test_switching_weighting_drops_old_parameters():
    base = {"weighting": {"name": "ctwa", "lambda_lr": 0.05}}
    cfg = build_config(TrainConfig, base, ["weighting=linear"])
    assert cfg.weighting.name == "linear" and cfg.weighting.params() == {}


def test_round_trip_through_yaml(tmp_path):
    cfg = build_config(TrainConfig, {}, ["weighting.tau=0.2", "steps=4"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = build_config(TrainConfig, load_yaml(p))
    assert again == cfg


@pytest.mark.parametrize("override, fragment", [
    (["bogus=1"], "unknown key 'bogus'"),
    (["rollout.bogus=1"], "valid keys here: group_size"),
    (["steps=abc"], "steps"),
    (["rollout.group_size=-2"], "rollout.group_size"),
    (["loss.clip_eps_low=0"], "loss.clip_eps_low"),
    (["weighting=nope"], "unknown weighting 'nope'"),
    (["estimator=nope"], "unknown estimator 'nope'"),
    (["weighting.lambda_lr=-1"], "lambda_lr"),
    (["weighting.nope=1"], "unknown parameter(s) nope for weighting 'ctwa'"),
    (["loss.kl_estimator=k7"], "k1, k2, k3"),
    (["objectives=[accuracy, accuracy]"], "distinct"),
    (["steps"], "not key=value"),
])
def test_bad_overrides_give_one_line_errors(override, fragment):
    with pytest.raises(UserError) as err:
        build_config(TrainConfig, {}, override)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: 3\nmodel: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_yaml(p)
    q = tmp_path / "list.yaml"
    q.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(UserError, match="mapping"):
        load_yaml(q)


def test_cli_exit_code_2_without_traceback(capsys, tmp_path):
    assert main(["train", "bogus=1", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config error: unknown key 'bogus'") and "Traceback" not in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_debug_shows_traceback(tmp_path):
    with pytest.raises(UserError):
        main(["--debug", "train", "bogus=1"])


def test_cli_refuses_existing_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert main(["train", f"run_dir={run}", "steps=1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").exists()  # nothing was touched


def test_cli_resume_needs_a_run_dir(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_cli_algorithms_lists_every_weighting(capsys):
    from moalign.objectives import OBJECTIVES
    from moalign.rl.estimators import ESTIMATORS
    from moalign.weighting import WEIGHTINGS

    assert main(["algorithms"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    for name in WEIGHTINGS.names() + ESTIMATORS.names() + OBJECTIVES.names():
        assert name in out
    assert "reward" in out and "gradient" in out
    assert "loss.loss_agg: seq-mean-token-sum-norm by default (another is refused)" in out  # dr_grpo's pairing
    assert "clarity — the paper's rule" in out and "clarity_refined — " in out
    assert "ideal_mode='running_max'" in out  # Tchebycheff's ideal point, the authors' choice


def test_algorithms_doc_table_matches_the_registry():
    """docs/algorithms.md's table shows what `moalign algorithms` prints: description, defaults, cost."""
    from pathlib import Path

    from moalign.weighting import WEIGHTINGS

    doc = (Path(__file__).parents[1] / "docs" / "algorithms.md").read_text()
    for name, cls in WEIGHTINGS.items():
        defaults = ", ".join(f"`{k}={f.default!r}`" for k, f in cls.Params.model_fields.items()) or "—"
        assert f"| `{name}` | {cls.family} | {cls.description} | {defaults} | {cls.cost} |" in doc, name


def test_dr_grpo_is_paired_with_the_constant_normalized_token_sum(tmp_path):
    assert build_config(TrainConfig, {}, []).loss.loss_agg == "token-mean"
    cfg = build_config(TrainConfig, {}, ["estimator=dr_grpo"])
    assert cfg.loss.loss_agg == "seq-mean-token-sum-norm"
    assert build_config(TrainConfig, {}, ["estimator=grpo", "loss.loss_agg=seq-mean-token-sum"]).loss.loss_agg == \
        "seq-mean-token-sum"
    with pytest.raises(UserError, match="estimator=dr_grpo is defined with loss.loss_agg=seq-mean-token-sum-norm.*"
                                        "estimator=grpo_no_std"):
        build_config(TrainConfig, {}, ["estimator=dr_grpo", "loss.loss_agg=token-mean"])
    saved = tmp_path / "config.yaml"  # the resolved pairing is what a run saves and reloads
    saved.write_text(dump_config(cfg))
    assert build_config(TrainConfig, load_yaml(saved), []).loss.loss_agg == "seq-mean-token-sum-norm"


@pytest.mark.parametrize("raw, expected", [
    ("[model.layers.2[89].*, model.norm.*]", ["model.layers.2[89].*", "model.norm.*"]),  # YAML can't parse it
    ("model.layers.2[8,9].*,lm_head.weight", ["model.layers.2[8,9].*", "lm_head.weight"]),  # a comma in [...] stays
    ("'[m]odel.norm.weight'", ["[m]odel.norm.weight"]),  # quoted: one pattern that starts with a bracket
    ("[lm_head.weight]", ["lm_head.weight"]),  # a YAML list
])
def test_gradient_params_from_the_command_line(raw, expected):
    cfg = build_config(TrainConfig, {}, ["weighting=mgda", f"weighting.gradient_params={raw}"])
    assert cfg.weighting.gradient_params == expected
    assert cfg.weighting.params() == {}  # not a hyperparameter of the algorithm
