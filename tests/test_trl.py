"""The TRL integration (moalign/integrations/trl/): TRL's private-hook contract, the pieces of the trainer, and
short CPU runs on a random 2-layer Llama — one process, save/resume, and two processes (torchrun, gloo)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from moalign.config import TrainConfig, build_config  # noqa: E402
from moalign.data import DataConfig, load_data  # noqa: E402
from moalign.rl.covariance import carries_signal  # noqa: E402
from moalign.errors import UserError  # noqa: E402
from moalign.integrations.trl import (  # noqa: E402
    STATE_FILE,
    TRL_VERSION,
    MultiObjectiveGRPOTrainer,
    ObjectiveReward,
    RolloutCycle,
    moalign_record,
    plan_trl_run,
    prompt_group_ids,
    prompt_key,
    reward_metrics,
    train_with_trl,
)
from moalign.objectives import Sample  # noqa: E402
from moalign.objectives.conciseness import Conciseness  # noqa: E402
from moalign.rl.estimators import get_estimator  # noqa: E402
from moalign.weighting import WEIGHTINGS, make_weighting  # noqa: E402
from moalign.weighting.base import fill_missing, per_objective_advantages  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from trl_ddp_script import build_random_model, small_run_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GROUP = 4


# ---------------------------------------------------------------------------------------------------------------
# The contract with TRL's private hooks
# ---------------------------------------------------------------------------------------------------------------


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_trl_is_the_pinned_release_and_its_private_hooks_are_unchanged():
    """MultiObjectiveGRPOTrainer overrides these private methods and relies on these lines. If this fails, TRL
    changed: re-read grpo_trainer.py, adapt moalign/integrations/trl/, then update TRL_VERSION and this test."""
    assert trl.__version__ == TRL_VERSION == "1.16.0"
    assert _parameters(GRPOTrainer._calculate_rewards) == ["self", "inputs", "prompts", "completions",
                                                           "completion_ids_list"]
    assert _parameters(GRPOTrainer._generate_and_score_completions) == ["self", "inputs"]
    assert _parameters(GRPOTrainer._compute_loss) == ["self", "model", "inputs"]
    assert _parameters(GRPOTrainer._get_per_token_logps_and_entropies)[:6] == [
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size"]
    assert _parameters(GRPOTrainer._load_optimizer_and_scheduler) == ["self", "checkpoint"]

    generate = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for line in ("rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)",
                 "self.accelerator.process_index * len(prompts)", '"advantages": advantages',
                 'output["old_per_token_logps"] = old_per_token_logps', '"completion_mask": completion_mask'):
        assert line in generate, line
    assert "rewards_per_func = gather(rewards_per_func)" in inspect.getsource(GRPOTrainer._calculate_rewards)
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    for line in ("generate_every = self.args.steps_per_generation * self.num_iterations",
                 "shuffle_sequence_dict(generation_batch)", "split_tensor_dict(generation_batch"):
        assert line in prepare, line
    assert "mini_repeat_count=self.num_generations" in inspect.getsource(GRPOTrainer._get_train_sampler)
    loss = inspect.getsource(GRPOTrainer._compute_loss)
    assert "per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(" in loss
    assert 'old_per_token_logps = inputs.get("old_per_token_logps")' in loss
    assert "self._step += 1" in inspect.getsource(GRPOTrainer.training_step)


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_groups_are_consecutive_blocks_checked_against_the_prompts():
    keys = [prompt_key({"prompt": p}) for p in ["a", "a", "b", "b", "a", "a"]]
    assert prompt_group_ids(keys, 2).tolist() == [0, 0, 1, 1, 2, 2]  # a prompt drawn twice is two groups
    with pytest.raises(RuntimeError, match="different prompts"):
        prompt_group_ids(keys, 3)  # blocks a,a,b / b,a,a mix prompts
    with pytest.raises(RuntimeError, match="multiple of num_generations"):
        prompt_group_ids(keys, 4)


def test_objective_reward_scores_local_samples_and_observes_every_process():
    eos = 9
    reward = ObjectiveReward(Conciseness())
    reward.eos_token_ids = {eos}
    reward.gather = lambda samples: samples + [Sample("other", "x", "0", 100)]  # another process's sample
    prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}], "q2"]
    completions = [[{"role": "assistant", "content": "short"}], "long one"]
    ids = [[5, 6, eos], [5, 6, 7, 8]]  # 2 tokens + EOS, 4 tokens truncated

    assert reward(prompts, completions, ids, answer=["1", 2]) == [1.0, 1.0]  # nothing observed yet: all short
    reward.observing = True
    # observed lengths 2, 4 and the other process's 100: mean 106/3 ≈ 35.3, both local samples are shorter
    assert reward(prompts, completions, ids, answer=["1", 2]) == [1.0, 1.0]
    assert (reward.objective.count, reward.objective.total_tokens) == (3, 106)
    with pytest.raises(UserError, match="column 'answer'"):
        reward(prompts, completions, ids, solution=["1", "2"])


def test_rollout_cycle_keeps_first_and_latest_loss_logprobs_per_row():
    mask = torch.ones(3, 2)
    cycle = RolloutCycle(torch.zeros(6, 1), torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6, 2),
                         first_row=3, input_ids=torch.zeros(3, 4, dtype=torch.long),
                         attention_mask=torch.ones(3, 4), loss_mask=mask, old_logprobs=None)
    cycle.record(torch.tensor([5, 3]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))  # global rows 5 and 3 (shuffled)
    cycle.record(torch.tensor([3, 4]), torch.tensor([[3.0, 3.0], [4.0, 4.0]]))  # row 3 again (a second epoch)
    assert cycle.first_logprobs[:, 0].tolist() == [2.0, 4.0, 1.0]
    assert cycle.last_logprobs[:, 0].tolist() == [3.0, 4.0, 1.0]
    assert cycle.pre_update_logprobs() is cycle.first_logprobs


def test_plan_maps_the_config_onto_grpo_arguments():
    cfg = build_config(TrainConfig, {}, [
        "rollout.prompts_per_step=4", "rollout.group_size=4", "optim.mini_batches=2", "optim.ppo_epochs=3",
        "optim.micro_batch_size=3", "steps=5", "loss.loss_agg=seq-mean-token-sum-norm", "loss.kl_estimator=k1",
        "loss.clip_eps_high=0.28", "estimator=grpo_no_std"])
    plan = plan_trl_run(cfg, Path("out"), num_processes=2, use_cpu=True)
    a = plan.arguments
    # 16 completions / (2 processes × 2 mini-batches) = 4 per process and mini-batch; micro 3 does not divide 4 → 2
    assert (a["per_device_train_batch_size"], a["gradient_accumulation_steps"]) == (2, 2)
    assert (a["steps_per_generation"], a["num_iterations"], a["num_generations"]) == (4, 3, 4)
    assert plan.optimizer_steps_per_step == 6 and a["max_steps"] == 30 and a["logging_steps"] == 6
    assert (a["epsilon"], a["epsilon_high"], a["delta"], a["loss_type"]) == (0.2, 0.28, 3.0, "dr_grpo")
    assert (a["scale_rewards"], a["use_cpu"], a["bf16"], a["fp16"]) == ("none", True, False, False)
    for precision in ("bf16-mixed", "bf16-pure"):  # accelerate's bf16 autocast, on CPU as on GPU
        mixed = cfg.model_copy(update={"precision": precision})
        assert plan_trl_run(mixed, Path("out"), num_processes=2, use_cpu=True).arguments["bf16"] is True
    assert any("micro_batch_size=3 → 2" in n for n in plan.notes) and any("k1" in n for n in plan.notes)
    plan.override({"use_vllm": False})
    assert plan.arguments["use_vllm"] is False and "GRPOConfig use_vllm=False (given directly)" in plan.notes
    with pytest.raises(UserError, match="steps_per_generation follow from the moalign config"):
        plan.override({"steps_per_generation": 1})
    with pytest.raises(UserError, match="split evenly"):
        plan_trl_run(cfg, Path("out"), num_processes=3, use_cpu=True)
    with pytest.raises(UserError, match="group_size ≥ 2"):
        plan_trl_run(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"group_size": 1})}),
                     Path("out"), 1, True)
    dr_grpo = build_config(TrainConfig, {}, ["estimator=dr_grpo"])  # paired with TRL's dr_grpo loss by default
    assert plan_trl_run(dr_grpo, Path("out"), 1, True).arguments["loss_type"] == "dr_grpo"


def test_launcher_entry_refuses_planned_trl_fields_before_touching_the_run_directory(tmp_path, capsys):
    from moalign.cli import main

    assert main(["train", "engine=trl", "--trl", "max_steps=3", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "max_steps follow from the moalign config" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_metrics_use_native_names():
    rewards = torch.tensor([[1.0, float("nan")], [0.0, 0.5], [1.0, 1.0]])
    m = reward_metrics(["acc", "len"], rewards, torch.tensor([1.0, 2.0, 3.0]))
    assert m == {"train/acc/mean": pytest.approx(2 / 3), "train/acc/missing": 0.0, "train/len/mean": 0.75,
                 "train/len/missing": 1.0, "train/score/mean": 2.0, "train/missing_rewards": 1.0}
    record = moalign_record({"loss": 1.0, "kl": 0.1, "weight/acc": 0.5, "entropy": 3.0}, {"weight/acc"})
    assert record == {"loss/total": 1.0, "loss/kl": 0.1, "weight/acc": 0.5, "trl/entropy": 3.0}


def test_unknown_weightings_are_refused_before_any_model_is_loaded():
    with pytest.raises(UserError, match="unknown weighting 'mgdaa'"):
        MultiObjectiveGRPOTrainer(model=None, reward_funcs=[], weighting="mgdaa")


# ---------------------------------------------------------------------------------------------------------------
# Training runs on a random model
# ---------------------------------------------------------------------------------------------------------------


def vowels(completions, **kwargs) -> list[float]:
    """A plain TRL reward function next to a moalign objective (conversational completions: message lists)."""
    texts = [completion[0]["content"] for completion in completions]
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in texts]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    corpus = [ex.prompt for _, split in load_data(DataConfig(num_train=64)).items() for ex in split]
    return build_random_model(tmp_path_factory.mktemp("model"), corpus)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    train = load_data(DataConfig(num_train=8, num_val=0, num_test=0)).train
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": ex.prompt}] for ex in train],
                              "answer": [ex.answer for ex in train]})


class RecordingTrainer(MultiObjectiveGRPOTrainer):
    """Keeps every generation cycle and the StepStats the weighting saw."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cycles, self.stats = [], []
        update = self.weighting.update

        def recording_update(stats):
            self.stats.append(stats)
            return update(stats)

        self.weighting.update = recording_update

    def update_weighting(self):
        self.cycles.append(self._cycle)
        return super().update_weighting()


class SnapshotAfterEachStep(TrainerCallback):
    def __init__(self):
        self.states = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states.append(copy.deepcopy(model.state_dict()))


def with_likelier_eos(model, tokenizer, factor: float):
    """Scale the EOS row of the (tied) output matrix so that a random model ends some completions early."""
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= factor
    return model


def make_trainer(model_dir: Path, dataset: Dataset, out: Path, weighting: str = "ctwa", gradient_params=None,
                 eos_factor: float = 1.0, **grpo) -> RecordingTrainer:
    settings = dict(output_dir=str(out), use_cpu=True, bf16=False, activation_checkpointing=False, seed=0,
                    per_device_train_batch_size=8, num_generations=GROUP, max_completion_length=6, learning_rate=0.05,
                    beta=0.0, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no")
    args = GRPOConfig(**{**settings, **grpo})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = with_likelier_eos(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, eos_factor)
    return RecordingTrainer(model=model, reward_funcs=[Conciseness(), vowels], args=args, train_dataset=dataset,
                            processing_class=tokenizer, weighting=weighting,
                            weighting_params={"lambda_lr": 0.5} if weighting == "ctwa" else None,
                            gradient_params=gradient_params)


def reference_logprobs(model_dir: Path, state_dict, cycle: RolloutCycle) -> torch.Tensor:
    """log π(completion token | prefix) by a plain forward of a fresh model with ``state_dict`` (no TRL code)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict(state_dict)
    T = cycle.loss_mask.shape[1]
    with torch.no_grad():
        logits = model(input_ids=cycle.input_ids, attention_mask=cycle.attention_mask).logits[:, -T - 1:-1]
    logits = logits.float()  # temperature 1
    targets = cycle.input_ids[:, -T:]
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def test_ctwa_step_sees_the_whole_batch_and_true_pre_and_post_update_logprobs(model_dir, dataset, tmp_path):
    trainer = make_trainer(model_dir, dataset, tmp_path, max_steps=2)
    initial = copy.deepcopy(trainer.model.state_dict())
    snapshots = SnapshotAfterEachStep()
    trainer.add_callback(snapshots)
    trainer.train()

    assert len(trainer.stats) == 2 and trainer.weighting_updates == 2
    stats, cycle = trainer.stats[0], trainer.cycles[0]
    B = 8
    assert stats.rewards.shape == (B, 2) and stats.group_ids.tolist() == [i // GROUP for i in range(B)]
    scores = fill_missing(stats.rewards) @ torch.tensor([0.5, 0.5])  # CTWA starts uniform
    assert torch.allclose(stats.advantages, get_estimator("grpo")(scores, stats.group_ids), atol=1e-6)
    mask = stats.response_mask.bool()
    assert torch.equal(stats.response_mask, cycle.loss_mask.float())
    # num_iterations = 1: π_old is the first loss forward, and the post-update log-probs come from a fresh forward
    old = reference_logprobs(model_dir, initial, cycle)
    new = reference_logprobs(model_dir, snapshots.states[0], cycle)
    assert torch.allclose(stats.old_logprobs[mask], old[mask], atol=1e-4)
    signal = carries_signal(stats.advantages, stats.response_mask)  # rows without a signal keep π_old
    assert torch.allclose(stats.new_logprobs[signal][mask[signal]], new[signal][mask[signal]], atol=1e-4)
    assert torch.equal(stats.new_logprobs[~signal], stats.old_logprobs[~signal])
    assert not torch.allclose(stats.new_logprobs[mask], stats.old_logprobs[mask], atol=1e-3)  # the policy moved
    # the post-update forward on a cycle whose second group ties: only the first group's rows are run
    tied = dataclasses.replace(cycle, advantages=torch.cat([cycle.advantages[:GROUP], torch.zeros(B - GROUP)]))
    tied.first_logprobs, tied.last_logprobs = cycle.first_logprobs, cycle.last_logprobs
    final = reference_logprobs(model_dir, snapshots.states[-1], cycle)
    post = trainer._post_update_logprobs(tied)
    rows = slice(0, GROUP)
    assert torch.allclose(post[rows][mask[rows]], final[rows][mask[rows]], atol=1e-4)
    assert torch.equal(post[GROUP:], tied.pre_update_logprobs()[GROUP:].float())

    weights = trainer.weighting.weights
    assert torch.isfinite(weights).all() and not torch.allclose(weights, torch.full((2,), 0.5))
    logged = trainer.state.log_history[-2]  # the last step (the very last entry is the run summary)
    assert logged["weight/conciseness"] == pytest.approx(float(weights[0]))
    assert "train/vowels/mean" in logged and "ctwa/deficit/vowels" in logged


@pytest.mark.parametrize("name", sorted(n for n, cls in WEIGHTINGS.items() if cls.family in ("reward", "advantage")))
def test_every_reward_and_advantage_level_weighting_trains(model_dir, dataset, tmp_path, name):
    trainer = make_trainer(model_dir, dataset, tmp_path, weighting=name, max_steps=1)
    trainer.train()
    stats = trainer.stats[0]
    fresh = make_weighting(name, ["conciseness", "vowels"])  # the trainer's weighting before its first update
    expected = fresh.advantages(stats.rewards, stats.group_ids, get_estimator("grpo"), stats.response_mask)
    assert torch.allclose(stats.advantages, expected.float(), atol=1e-6) and torch.isfinite(stats.advantages).all()
    logged = trainer.state.log_history[-2]
    weights = [logged[f"weight/{o}"] for o in ("conciseness", "vowels")]
    assert weights == pytest.approx(trainer.weighting.weights.tolist()) and all(map(math.isfinite, weights))


EOS_FACTOR = 100.0  # completions of several lengths, so that the two normalizations differ


@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence")])
def test_gradient_level_weighting_solves_on_the_batch_gradients_before_the_update(model_dir, dataset, tmp_path,
                                                                                   loss_type, level):
    """MGDA on TRL: G is each objective's policy gradient on the chosen parameters, normalized as TRL's loss, under
    the policy that sampled the batch (checked against autograd on a fresh copy of the initial model); the weights
    are MGDA's on that G, and TRL trains on Σ_j w_j A_j."""
    trainer = make_trainer(model_dir, dataset, tmp_path, weighting="mgda", gradient_params=["model.layers.1.mlp.*"],
                           eos_factor=EOS_FACTOR, max_steps=1, loss_type=loss_type, importance_sampling_level=level)
    seen = []
    combine = trainer.weighting.combine
    trainer.weighting.combine = lambda grads, stats: seen.append(grads.clone()) or combine(grads, stats)
    trainer.train()
    stats, cycle = trainer.stats[0], trainer.cycles[0]
    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()
             if n.startswith("model.layers.1.mlp.")]
    assert len(seen) == 1 and len(names) == 3

    model = with_likelier_eos(AutoModelForCausalLM.from_pretrained(model_dir), trainer.processing_class,
                              EOS_FACTOR)  # the initial policy, which sampled the batch
    chosen = [dict(model.named_parameters())[n] for n in names]
    T = cycle.loss_mask.shape[1]
    logits = model(input_ids=cycle.input_ids, attention_mask=cycle.attention_mask).logits[:, -T - 1:-1]
    lp = logits.float().log_softmax(-1).gather(-1, cycle.input_ids[:, -T:, None]).squeeze(-1)
    mask = cycle.loss_mask.float()
    assert len(set(mask.sum(-1).tolist())) > 1  # lengths differ: the normalizations are told apart
    per_obj = per_objective_advantages(stats.rewards, stats.group_ids, get_estimator("grpo"), stats.response_mask)
    rows = []
    for j in range(2):
        if level == "token":  # dapo: Σ over every token / the batch's token count
            loss = -(per_obj[:, j, None].float() * lp * mask).sum() / mask.sum()
        else:  # grpo, one ratio per sequence (its log is the sequence's mean log-ratio): mean over sequences
            loss = -(per_obj[:, j].float() * (lp * mask).sum(-1) / mask.sum(-1)).mean()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, chosen, retain_graph=True)]))
    torch.testing.assert_close(seen[0], torch.stack(rows), rtol=1e-4, atol=1e-7)
    fresh = make_weighting("mgda", ["conciseness", "vowels"])
    fresh.combine(torch.stack(rows), stats)
    torch.testing.assert_close(trainer.weighting.weights, fresh.weights, rtol=1e-4, atol=1e-6)
    expected = per_obj.double() @ trainer.weighting.weights
    torch.testing.assert_close(stats.advantages, expected.float(), rtol=1e-5, atol=1e-6)
    assert trainer.state.log_history[-2]["weight/vowels"] == pytest.approx(float(trainer.weighting.weights[1]))
    assert all(p.requires_grad for p in trainer.model.parameters())  # the first pass's freeze is undone


def test_dynamic_reweighting_trains_on_one_advantage_of_the_weighted_score(model_dir, dataset, tmp_path):
    """Dynamic on TRL: G only sets the weights; TRL trains on grpo(Σ_j w_j r_j) with the step's (initial) weights."""
    trainer = make_trainer(model_dir, dataset, tmp_path, weighting="dynamic", gradient_params=["model.norm.*"],
                           max_steps=1)
    trainer.train()
    stats = trainer.stats[0]
    scores = fill_missing(stats.rewards) @ torch.tensor([0.5, 0.5])  # uniform before the first update
    torch.testing.assert_close(stats.advantages, get_estimator("grpo")(scores, stats.group_ids), atol=1e-6, rtol=0)


def test_gradient_params_need_a_gradient_level_weighting(model_dir, dataset, tmp_path):
    with pytest.raises(UserError, match="gradient-level weightings only"):
        make_trainer(model_dir, dataset, tmp_path, weighting="linear", gradient_params=["model.*"])


def test_with_ppo_epochs_ctwa_reads_the_last_epochs_clipped_ratio(model_dir, dataset, tmp_path):
    trainer = make_trainer(model_dir, dataset, tmp_path, max_steps=2, num_iterations=2)
    assert trainer.post_update_forward is False
    initial = copy.deepcopy(trainer.model.state_dict())
    snapshots = SnapshotAfterEachStep()
    trainer.add_callback(snapshots)
    trainer.train()

    assert len(trainer.stats) == 1  # two optimizer steps (epochs) on one generation batch: one weighting update
    stats, cycle = trainer.stats[0], trainer.cycles[0]
    mask = stats.response_mask.bool()
    assert cycle.old_logprobs is not None  # TRL computed π_old itself
    # π_new is the policy the second epoch's loss saw: the model after the first optimizer step
    new = reference_logprobs(model_dir, snapshots.states[0], cycle)
    assert torch.allclose(stats.old_logprobs[mask], reference_logprobs(model_dir, initial, cycle)[mask], atol=1e-4)
    assert torch.allclose(stats.new_logprobs[mask], new[mask], atol=1e-4)


def test_weighting_state_is_checkpointed_and_resumed(model_dir, dataset, tmp_path):
    first = make_trainer(model_dir, dataset, tmp_path / "a", weighting="lagrangian", max_steps=3,
                         save_strategy="steps", save_steps=1)
    first.train()
    saved = torch.load(tmp_path / "a" / "checkpoint-3" / STATE_FILE, weights_only=False)
    assert torch.equal(saved["weighting"]["duals"], first.weighting.duals) and saved["weighting_updates"] == 3
    assert saved["objectives"]["conciseness"] == first.objective_rewards[0].objective.state_dict()
    assert first.objective_rewards[0].objective.count == 3 * 8  # observed every training completion once

    resumed = make_trainer(model_dir, dataset, tmp_path / "a", weighting="lagrangian", max_steps=3,
                           save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert len(resumed.stats) == 1 and resumed.stats[0].step == 2  # only step 3 ran, numbered on from the save
    assert torch.allclose(resumed.weighting.duals, first.weighting.duals, atol=1e-6)
    assert resumed.objective_rewards[0].objective.state_dict() == saved["objectives"]["conciseness"]


def test_train_with_trl_writes_the_native_run_directory_and_resumes(model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = build_config(TrainConfig, {}, small_run_overrides(model_dir, run))
    summary = train_with_trl(cfg, run, trl_overrides={"disable_dropout": True})
    assert "GRPOConfig disable_dropout=True (given directly)" in summary["trl_notes"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 2]  # start evaluation, two steps, end evaluation
    for line in lines[1:3]:
        for key in ("train/conciseness/mean", "train/vowel_fraction/mean", "weight/conciseness", "perf/step_s"):
            assert key in line, key
    assert len(lines[0]["eval/val/sampled/vowel_fraction/per_prompt"]) == 2
    assert len(lines[0]["eval/val/sampled/vowel_fraction/per_sample"][0]) == cfg.eval.samples
    assert lines[0]["scalarization/conciseness"] == lines[0]["scalarization/vowel_fraction"] == 0.5  # ctwa's λ0
    assert summary["eval_cost"]["sampled"]["completions"] == 2 * 2 * cfg.eval.samples  # start and end, 2 prompts
    assert summary["final_weights"] == {k: v for k, v in lines[2].items() if k.startswith("weight/")}
    assert set(summary["eval"]["val"]["sampled"]) == {"conciseness", "vowel_fraction"}
    assert json.loads((run / "summary.json").read_text())["engine"] == "trl"
    assert (run / "model" / "config.json").is_file()

    longer = train_with_trl(cfg.model_copy(update={"steps": 3}), run)  # resumes from checkpoint-2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 3]
    assert longer["steps"] == 3


# nash_mtl: G all-reduced over the processes before each solves its weights on it (two objectives that vary on a
# random model, so that neither gradient is 0 and the weights depend on G)
NASH_MTL = ["weighting=nash_mtl", "weighting.gradient_params=[model.layers.1.*]",
            "objectives=['trl_ddp_script:vowel_fraction', 'trl_ddp_script:space_fraction']"]


@pytest.mark.skipif(not hasattr(torch.distributed, "is_gloo_available") or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("extra", [[], NASH_MTL], ids=["ctwa", "nash_mtl"])
def test_two_processes_hold_identical_weights(model_dir, tmp_path, extra):
    scratch = tmp_path / "tmp"  # torchrun's own temporary folders (torchelastic_*) go there, not into /tmp
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "trl_ddp_script.py"), str(model_dir), str(tmp_path / "run"), str(tmp_path), *extra]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = [json.loads((tmp_path / f"weights_rank{r}.json").read_text()) for r in (0, 1)]
    assert weights[0]["final"] == weights[1]["final"]
    values = list(weights[0]["final"].values())
    assert all(math.isfinite(v) for v in values) and any(v != 0.5 for v in values)  # moved from uniform 1/M
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 2]  # only the main process wrote
    if not extra:
        assert lines[1]["ctwa/num_valid_w"] == 16  # CTWA's statistic saw both processes' 8 completions
    else:  # each step's weights, solved separately by each process on the all-reduced G, agree exactly
        assert len(weights[0]["solved"]) == 2 and weights[0]["solved"] == weights[1]["solved"]


def test_moalign_train_under_a_launcher_lets_only_the_main_process_prepare_the_run(tmp_path, monkeypatch, capsys):
    """``moalign train engine=trl`` (``torchrun -m moalign train ... engine=trl``) in every process of a launcher:
    each trains, only rank 0 creates run_dir, writes config.yaml and prints the summary."""
    import moalign.cli as cli
    import moalign.integrations.trl.run as integration

    calls, printed = [], []
    monkeypatch.setattr(integration, "train_with_trl", lambda cfg, run_dir, trl: calls.append((cfg, run_dir, trl))
                        or {"steps": 1})
    monkeypatch.setattr(integration, "print_summary", lambda summary, run_dir: printed.append(summary))
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "engine=trl", f"run_dir={run}", "--trl", "use_vllm=false"]) == 0
    assert not run.exists() and not printed
    cfg, run_dir, trl = calls[-1]
    assert (cfg.engine, run_dir, trl) == ("trl", run, {"use_vllm": False})
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", f"run_dir={run}", "engine=trl"]) == 0
    assert (run / "config.yaml").is_file() and printed == [{"steps": 1}] and calls[-1][0].engine == "trl"
    assert cli.main(["train", "steps=1", "engine=trl"]) == 2  # default run names hold a timestamp
    assert "every process must name the same run directory" in capsys.readouterr().err
    assert len(calls) == 2


def test_trl_fields_need_the_trl_engine(tmp_path, capsys):
    from moalign.cli import main

    assert main(["train", "model=tiny", f"run_dir={tmp_path / 'run'}", "--trl", "use_vllm=false"]) == 2
    assert "for engine=trl only" in capsys.readouterr().err and not (tmp_path / "run").exists()
