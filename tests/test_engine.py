"""End-to-end runs of the native engine on the `tiny` model: run directory contents, finite statistics, every
estimator and weighting family, determinism and exact resume."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from moalign.config import TrainConfig, build_config
from moalign.engine.metrics import read_metrics
from moalign.engine.trainer import Trainer

TINY = ["model=tiny", "steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=24",
        "eval.num_prompts=4", "optim.lr=1e-3", "log.progress=false", "threads=1", "data.num_train=16",
        "data.num_val=4", "data.num_test=4"]


def tiny_config(*extra) -> TrainConfig:
    return build_config(TrainConfig, {}, TINY + list(extra))


def run(tmp_path, *extra, name="run"):
    cfg = tiny_config(*extra)
    run_dir = tmp_path / name
    run_dir.mkdir()
    summary = Trainer(cfg, run_dir).run()
    return run_dir, summary


def test_end_to_end_ctwa_run_directory(tmp_path):
    run_dir, summary = run(tmp_path, "weighting=ctwa")
    assert (run_dir / "model" / "config.json").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == ["step_0000002.pt"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    lines = read_metrics(run_dir / "metrics.jsonl")
    steps = [line["step"] for line in lines]
    assert steps == [0, 1, 2, 2]  # start eval, two steps, end eval
    for line in lines[1:3]:
        for obj in ("accuracy", "conciseness", "clarity"):
            assert 0.0 <= line[f"train/{obj}/mean"] <= 1.0
            assert math.isfinite(line[f"weight/{obj}"]) and line[f"weight/{obj}"] > 0
            assert f"ctwa/cov/{obj}" in line and f"ctwa/ema/{obj}" in line and f"ctwa/deficit/{obj}" in line
        for key in ("loss/policy", "loss/kl", "actor/clipfrac", "actor/grad_norm", "perf/step_s",
                    "time/sample_s", "time/post_logprobs_s", "train/length/mean", "perf/peak_rss_gb"):
            assert math.isfinite(line[key]), key
        assert 0.1 < line["perf/peak_rss_gb"] < 24  # this process's high-water mark, in GB
    assert len(lines[0]["eval/val/sampled/accuracy/per_prompt"]) == 4
    assert set(summary["eval"]) == {"val", "test"} and set(summary["eval"]["val"]) == {"sampled"}
    for row in summary["eval"]["val"]["sampled"].values():
        assert row["change"] == pytest.approx(row["end"] - row["start"])


@pytest.mark.parametrize("estimator", ["grpo", "grpo_no_std", "dr_grpo", "rloo", "reinforce_pp"])
def test_every_estimator_runs(tmp_path, estimator):
    _, summary = run(tmp_path, "weighting=linear", f"estimator={estimator}", "steps=1", "eval.num_prompts=2",
                     "eval.test_at_end=false")
    assert summary["steps"] == 1


def test_gradient_level_weighting_and_last_layers(tmp_path):
    run_dir, _ = run(tmp_path, "weighting=mgda", "steps=1", "model.train_last_k_layers=1", "eval.test_at_end=false")
    line = read_metrics(run_dir / "metrics.jsonl")[1]
    assert all(math.isfinite(line[f"weight/{o}"]) for o in ("accuracy", "conciseness", "clarity"))


def test_same_seed_same_metrics(tmp_path):
    def strip(lines):
        return [{k: v for k, v in line.items() if not k.startswith(("time/", "perf/")) and not k.endswith("seconds")}
                for line in lines]

    a, _ = run(tmp_path, "weighting=ctwa", name="a")
    b, _ = run(tmp_path, "weighting=ctwa", name="b")
    assert strip(read_metrics(a / "metrics.jsonl")) == strip(read_metrics(b / "metrics.jsonl"))


def test_resume_equals_uninterrupted(tmp_path):
    full, _ = run(tmp_path, "weighting=ctwa", "steps=3", "checkpoint.every=1", name="full")
    part_cfg = tiny_config("weighting=ctwa", "steps=3", "checkpoint.every=1")
    part = tmp_path / "part"
    part.mkdir()
    trainer = Trainer(part_cfg.model_copy(update={"steps": 2}), part)
    trainer.metrics.truncate(0)
    trainer.step_idx = 0
    # run two steps by hand, checkpoint, then "crash" (drop the trainer) and resume for the remaining step
    for _ in range(2):
        record = trainer.step()
        trainer._log(record)
        trainer.save_checkpoint()
    del trainer
    resumed = Trainer(part_cfg, part, resume=True)
    assert resumed.step_idx == 2
    resumed.run()

    def strip(lines):
        return [{k: v for k, v in line.items() if not k.startswith(("time/", "perf/")) and not k.endswith("seconds")}
                for line in lines]

    assert strip(read_metrics(part / "metrics.jsonl")) == strip(read_metrics(full / "metrics.jsonl"))
    a = torch.load(sorted((full / "checkpoints").glob("*.pt"))[-1], weights_only=False)["trainable"]
    b = torch.load(sorted((part / "checkpoints").glob("*.pt"))[-1], weights_only=False)["trainable"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_tiny(tmp_path, capsys):
    from moalign.cli import main

    run_dir = tmp_path / "cli"
    assert main(["train", *TINY, "steps=1", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "change" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and "interference" in summary


def test_sampler_logprobs_serve_as_pi_old_without_a_forward(tmp_path):
    """Two mini-batches × two PPO epochs need π_old before the first update: the fast sampler's log-probs give it
    without the extra forward pass, and the update is the one a recomputed π_old gives."""
    off_policy = ["weighting=linear", "steps=1", "optim.mini_batches=2", "optim.ppo_epochs=2", "eval.test_at_end=false"]
    reused, _ = run(tmp_path, *off_policy, name="sampler")
    recomputed, _ = run(tmp_path, *off_policy, "loss.old_logprobs=recompute", name="recompute")
    a, b = (read_metrics(d / "metrics.jsonl")[1] for d in (reused, recomputed))
    assert "time/old_logprobs_s" not in a and b["time/old_logprobs_s"] > 0
    for key in ("loss/policy", "actor/grad_norm", "loss/kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-7), key
    assert a["actor/clipfrac"] == b["actor/clipfrac"]


def test_sampler_logprobs_need_the_fast_sampler():
    from moalign.errors import UserError

    with pytest.raises(UserError, match="old_logprobs=sampler needs rollout.sampler=fast"):
        tiny_config("loss.old_logprobs=sampler", "rollout.sampler=hf")


def test_adamw_uses_the_fused_kernel_on_cpu():
    from moalign.engine.trainer import make_adamw

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = make_adamw([weight], lr=0.1, weight_decay=0.0, betas=(0.9, 0.999))
    assert optimizer.defaults["fused"]
    weight.grad = torch.tensor([1.0, -1.0, 0.0])
    optimizer.step()  # Adam's first step moves each weight by lr·sign(grad)
    assert torch.allclose(weight.detach(), torch.tensor([0.9, 1.1, 1.0]), atol=1e-6)


@pytest.fixture
def logprob_calls(monkeypatch) -> list[tuple[int, int]]:
    """(rows, micro-batch size) of every ``response_logprobs`` call the trainer makes, recorded as it makes them."""
    import moalign.engine.trainer as trainer_module

    calls = []
    real = trainer_module.response_logprobs
    monkeypatch.setattr(trainer_module, "response_logprobs",
                        lambda model, r, mb, *a, **k: calls.append((len(r), mb)) or real(model, r, mb, *a, **k))
    return calls


def test_post_update_forward_runs_only_the_rows_that_carry_a_signal(tmp_path, logprob_calls):
    """A completion with zero advantage has w = 0 whatever π_new: the post-update forward skips it (its old
    log-probs stand in), and the training signal and CTWA's covariances are those of the full forward."""
    from moalign.rl.covariance import group_covariance, training_signal
    from moalign.engine.rollout import response_logprobs
    from moalign.weighting import StepStats

    t = Trainer(tiny_config("weighting=ctwa"), tmp_path)
    groups = [0] * 4 + [1] * 4
    prompts = [t.prompt_tokens["train"][g] for g in groups]
    torch.manual_seed(0)
    rollout = t.generate(t.model, t.tokenizer, prompts, groups, groups, t.cfg.rollout.max_new_tokens)
    mask = rollout.response_mask
    full = response_logprobs(t.model, rollout, 8)
    old = (full - 0.05) * mask  # a π_old away from π_new, so that ratios differ from 1
    advantages = torch.tensor([0.7, -0.2, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0])  # group 1 tied: no signal
    rewards = torch.rand(8, 3)
    stats = StepStats(0, rewards, rollout.group_ids, advantages.clone(), advantages, mask, old)
    new = t._post_update_logprobs(rollout, None, stats, mb=8)
    assert [rows for rows, _ in logprob_calls] == [3]
    assert torch.equal(new[3:], old[3:])
    torch.testing.assert_close(new[:3], full[:3], rtol=0, atol=1e-5)
    with_skip, without = (training_signal(advantages, old, lp, mask) for lp in (new, full))
    torch.testing.assert_close(with_skip.w, without.w, rtol=1e-5, atol=1e-7)
    assert with_skip.w[3:].abs().sum() == 0 and with_skip.unclipped_fraction == without.unclipped_fraction
    cov = [group_covariance(rewards, s.w, rollout.group_ids).cov for s in (with_skip, without)]
    torch.testing.assert_close(cov[0], cov[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("setting, expected", [([], 8), (["optim.logprob_micro_batch_size=null"], 2)])
def test_passes_without_gradients_use_their_own_micro_batch(tmp_path, logprob_calls, setting, expected):
    cfg = tiny_config("weighting=ctwa", "steps=1", "optim.micro_batch_size=2", "loss.kl_coef=0.01", *setting)
    Trainer(cfg, tmp_path).step()
    sizes = [mb for _, mb in logprob_calls]
    assert sizes and set(sizes) == {expected}  # the reference and post-update log-probs


def test_gradient_level_update_on_a_parameter_subset(tmp_path, monkeypatch):
    """weighting.gradient_params: the weighting sees the objectives' gradients on the chosen parameters only, and
    every trainable parameter gets Σ_j w_j ∇L_j with the weights it chose there (autograd, whole batch at once)."""
    from moalign.engine.rollout import micro_batch_logprobs
    from moalign.rl.loss import aggregate, policy_loss
    from moalign.weighting import StepStats, make_weighting

    t = Trainer(tiny_config("weighting=mgda", "weighting.gradient_params=[model.layers.1.mlp.*, model.norm.*]",
                            "optim.micro_batch_size=3"), tmp_path)
    chosen_names = [n for n, p in t.model.named_parameters() if p.requires_grad
                    and (n.startswith("model.layers.1.mlp.") or n.startswith("model.norm."))]
    assert len(chosen_names) == 4 and len(t.objective_params) == 4 < len(t.params)
    groups = [0] * 4 + [1] * 4
    torch.manual_seed(0)
    rollout = t.generate(t.model, t.tokenizer, [t.prompt_tokens["train"][g] for g in groups], groups, groups,
                         t.cfg.rollout.max_new_tokens)
    mask = rollout.response_mask
    per_obj = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    stats = StepStats(0, torch.rand(8, 3), rollout.group_ids, per_obj.sum(1), per_obj.sum(1), mask, mask.float())
    seen = []
    combine = t.weighting.combine
    monkeypatch.setattr(t.weighting, "combine", lambda g, s: seen.append(g.shape) or combine(g, s))
    t.optimizer.zero_grad(set_to_none=True)
    t._mini_batch_gradients(rollout, None, None, None, per_obj.sum(1), per_obj, stats)
    got = [p.grad.clone() for p in t.params]
    assert seen == [(3, sum(p.numel() for p in t.objective_params))]  # G on the chosen parameters only
    assert all(p.requires_grad for p in t.params)  # the first pass's freeze is undone

    # the same by hand: one forward over the whole batch, each objective's loss gradient on every parameter
    t.optimizer.zero_grad(set_to_none=True)
    lp = micro_batch_logprobs(t.model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, mask,
                              t.cfg.rollout.temperature, grad=True)
    agg = dict(mode=t.cfg.loss.loss_agg, norm_len=t.cfg.rollout.max_new_tokens, num_tokens=float(mask.sum()),
               num_seqs=8.0)
    grads = []
    for j in range(3):
        loss = aggregate(policy_loss(lp, lp.detach(), per_obj[:, j], mask, 0.2, 0.2, 3.0).per_token, mask, **agg)
        grads.append(torch.autograd.grad(loss, t.params, retain_graph=True))
    chosen = [i for i, p in enumerate(t.params) if any(p is q for q in t.objective_params)]
    flat = lambda idx: torch.stack([torch.cat([grads[j][i].reshape(-1) for i in idx]) for j in range(3)])  # noqa: E731
    w = make_weighting("mgda", t.objective_names)
    w.combine(flat(chosen), stats)
    w_all = make_weighting("mgda", t.objective_names)
    w_all.combine(flat(range(len(t.params))), stats)
    assert not torch.allclose(w.weights, w_all.weights, atol=1e-3)  # the subset's choice is not the whole model's
    torch.testing.assert_close(t.weighting.weights, w.weights, rtol=1e-4, atol=1e-6)
    for i, g in enumerate(got):
        expected = sum(float(w.weights[j]) * grads[j][i] for j in range(3))
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7)


def test_gradient_params_errors(tmp_path):
    from moalign.errors import UserError

    with pytest.raises(UserError, match="gradient-level weightings only"):
        tiny_config("weighting=ctwa", "weighting.gradient_params=[model.norm.*]")
    with pytest.raises(UserError, match="matches no trainable parameter.*model.embed_tokens.weight"):
        Trainer(tiny_config("weighting=mgda", "weighting.gradient_params=lm_head.bias"), tmp_path)


def test_gradient_params_choose_lora_adapters(tmp_path):
    """With LoRA the trainable names are PEFT's (base_model.model....lora_B.default.weight); a pattern picks a part
    of the adapters and a step trains every adapter."""
    t = Trainer(tiny_config("weighting=nash_mtl", "model.lora.r=4", "weighting.gradient_params=*lora_B*"), tmp_path)
    names = {id(p): n for n, p in t.model.named_parameters()}
    assert t.objective_params and all("lora_B" in names[id(p)] for p in t.objective_params)
    assert any("lora_A" in names[id(p)] for p in t.params)
    before = [p.detach().clone() for p in t.params]
    record = t.step()
    assert all(math.isfinite(record[f"weight/{o}"]) for o in t.objective_names)
    assert all(not torch.equal(b, p) for b, p in zip(before, t.params) if "lora_B" in names[id(p)])


def test_gradient_level_step_statistics_use_the_weights_the_update_solved(tmp_path, monkeypatch):
    """The covariance-law statistics of a gradient-level step read Σ_j w_j A_j with this step's weights (solved in
    the update), not the previous step's."""
    from moalign.weighting.base import per_objective_advantages

    t = Trainer(tiny_config("weighting=mgda", "steps=1"), tmp_path)
    seen = []
    observe = t.law.observe_step
    monkeypatch.setattr(t.law, "observe_step", lambda stats: seen.append(stats) or observe(stats))
    before = t.weighting.weights.clone()
    record = t.step()
    stats, w = seen[0], t.weighting.weights
    assert not torch.allclose(w, before)  # the update solved new weights
    per_obj = per_objective_advantages(stats.rewards, stats.group_ids, t.estimator, stats.response_mask)
    torch.testing.assert_close(stats.advantages, (per_obj @ w.to(per_obj.dtype)).float())
    scores = torch.nan_to_num(stats.rewards) @ w.to(stats.rewards.dtype)
    assert record["train/score/mean"] == pytest.approx(float(scores.mean()), rel=1e-5)


def test_dynamic_reweighting_trains_on_one_advantage_of_the_weighted_score(tmp_path, monkeypatch):
    """Dynamic reweighting: the first pass takes the objectives' gradients (for the influence), and the update
    trains on one column, estimator(Σ_j w_j r_j) with this step's weights, not on Σ_j w_j L_j."""
    t = Trainer(tiny_config("weighting=dynamic", "steps=1", "weighting.gradient_params=[model.norm.*]"), tmp_path)
    columns = []
    policy_losses = t._policy_losses
    monkeypatch.setattr(t, "_policy_losses", lambda lp, old, adv, m, agg: columns.append(adv.clone())
                        or policy_losses(lp, old, adv, m, agg))
    seen = []
    observe = t.law.observe_step
    monkeypatch.setattr(t.law, "observe_step", lambda stats: seen.append(stats) or observe(stats))
    w = t.weighting.weights.clone()
    record = t.step()
    stats = seen[0]
    expected = t.estimator(torch.nan_to_num(stats.rewards) @ w.float(), stats.group_ids, stats.response_mask)
    torch.testing.assert_close(stats.advantages, expected.float())
    first_pass = [c for c in columns if c.shape[1] == 3]
    update_pass = [c for c in columns if c.shape[1] == 1]
    assert first_pass and update_pass and len(first_pass) + len(update_pass) == len(columns)
    torch.testing.assert_close(torch.cat(update_pass)[:, 0].sort().values, expected.float().sort().values)
    assert record["train/score/mean"] == pytest.approx(float((torch.nan_to_num(stats.rewards) @ w.float()).mean()))
    assert not torch.equal(t.weighting.weights, w)  # the influence moved the weights for the next step


def test_mu_pl_gap_uses_j_star_under_the_steps_weights(tmp_path):
    """CTWA's weights grow without renormalization: J* is the all-ones score under the weights the step trained
    with (here λ = (1, 1, 1), J* = 3), so the gap J* − J stays ≥ 0 and no point is dropped. A J* fixed from the
    initial weights (1/3 each, J* = 1) would put the batch score above it."""
    t = Trainer(tiny_config("weighting=ctwa", "steps=1"), tmp_path)
    t.weighting.log_weights = torch.zeros(3, dtype=torch.float64)  # λ = 1 for every objective
    record = t.step()
    assert record["pl/j_star"] == pytest.approx(3.0)
    assert record["pl/gap"] == pytest.approx(3.0 - record["train/score/mean"])
    assert record["pl/gap"] > 0 and record["pl/dropped_points"] == 0.0
    (tmp_path / "fixed").mkdir()
    fixed = Trainer(tiny_config("weighting=ctwa", "steps=1", "diagnostics.j_star=0.0"), tmp_path / "fixed")
    record = fixed.step()
    assert record["pl/j_star"] == 0.0 and record["pl/dropped_points"] == float(record["train/score/mean"] >= 0)

