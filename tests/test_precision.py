"""precision: an optimizer step at the paper's learning rate moves the master weights in every mode that
trains (native engine and engine=trl), bf16-mixed really computes in bf16 with fp32 masters, gradients and
optimizer state, bf16-pure warns, and the bf16 sampler (packed weights, lean decode step) gives generate's tokens."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from moalign.config import TrainConfig, build_config
from moalign.engine.precision import MasterWeights, fraction_rounding_away
from moalign.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from test_sampler import LlamaConfig, LlamaForCausalLM, random_prompts, tiny_model, word_tokenizer  # noqa: E402

torch.set_num_threads(1)

LR = 1e-6  # the paper's learning rate
TINY = ["model=tiny", "steps=1", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=24",
        "log.progress=false", "threads=1", "data.num_train=16", "data.num_val=4", "data.num_test=4",
        f"optim.lr={LR}", "weighting=linear", "seed=1"]


def fraction_changed(before: dict[str, torch.Tensor], model: nn.Module) -> float:
    """The fraction of the elements of ``before``'s parameters that differ in ``model`` (compared in the model's
    dtype, so a bf16 model is compared with its initial weights cast to bf16)."""
    changed = total = 0
    for name, p in model.named_parameters():
        if name in before:
            changed += int((p.detach() != before[name].to(p.dtype)).sum())
            total += p.numel()
    return changed / total


class LinearOutputDtypes:
    """The dtypes every ``nn.Linear`` output had while the block ran (a global forward hook)."""

    def __enter__(self):
        self.dtypes: set[torch.dtype] = set()
        self._hook = nn.modules.module.register_module_forward_hook(
            lambda module, args, out: self.dtypes.add(out.dtype) if isinstance(module, nn.Linear) else None)
        return self

    def __exit__(self, *exc):
        self._hook.remove()


def native_step(tmp_path, precision: str):
    from moalign.engine.trainer import Trainer

    cfg = build_config(TrainConfig, {}, TINY + [f"precision={precision}"])
    trainer = Trainer(cfg, tmp_path)
    trainer._evaluate_start = lambda: None
    weights = trainer.master.masters if trainer.master is not None else dict(trainer.model.named_parameters())
    before = {k: v.detach().clone() for k, v in weights.items() if v.requires_grad}
    with LinearOutputDtypes() as seen:
        trainer.step()
    changed = sum(int((weights[k].detach() != v.to(weights[k].dtype)).sum()) for k, v in before.items())
    return trainer, changed / sum(v.numel() for v in before.values()), seen.dtypes


# ---- the update reaches the weights -----------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_native_step_at_lr_1e_6_moves_the_master_weights(tmp_path, precision):
    trainer, changed, linear_dtypes = native_step(tmp_path, precision)
    # Adam's first step is ≈ ±lr on every weight with a gradient: 99.7 % of the tiny model's trainable weights here
    # (its unused embedding rows have none); pure bf16 weights keep 0.6 % of those steps (the next test)
    assert changed > 0.99
    optimized = trainer.optimizer.param_groups[0]["params"]
    state = trainer.optimizer.state[optimized[0]]
    assert all(p.dtype == torch.float32 for p in optimized)
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    # the compute: every linear layer's output in bf16 under bf16-mixed (sampler, passes, update), fp32 otherwise
    assert linear_dtypes == ({torch.bfloat16} if precision == "bf16-mixed" else {torch.float32})
    if precision == "bf16-mixed":  # the working copy is the masters rounded to bf16
        assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
        for name, p in trainer.model.named_parameters():
            assert torch.equal(p, trainer.master.masters[name].to(torch.bfloat16)), name


def test_native_bf16_pure_warns_and_its_weights_barely_move(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="moalign.engine.precision"):
        trainer, changed, _ = native_step(tmp_path, "bf16-pure")
    assert "bf16-pure with optim.lr=1e-06" in caplog.text and "bf16-mixed" in caplog.text
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert changed < 0.02  # the bug bf16-mixed fixes: the step rounds away


def test_reference_computes_in_bf16_and_old_logprobs_come_from_the_sampler(tmp_path):
    from moalign.engine.trainer import Trainer

    cfg = build_config(TrainConfig, {}, TINY + ["precision=bf16-mixed", "optim.mini_batches=2"])
    trainer = Trainer(cfg, tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in trainer.reference.parameters())
    rollout = type("R", (), {"sampler_logprobs": torch.zeros(2, 3)})()
    # auto: the sampler's, in bf16 as in fp32 (a recomputed forward is no closer to the update's)
    assert trainer._sampler_logprobs_as_old(rollout) is rollout.sampler_logprobs
    trainer.cfg.loss.old_logprobs = "recompute"
    assert trainer._sampler_logprobs_as_old(rollout) is None


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory) -> Path:
    from trl_ddp_script import build_random_model

    from moalign.data import DataConfig, load_data

    corpus = [ex.prompt for _, split in load_data(DataConfig(num_train=64)).items() for ex in split]
    return build_random_model(tmp_path_factory.mktemp("model"), corpus)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-pure"])
def test_trl_step_at_lr_1e_6_moves_the_master_weights(random_model_dir, tmp_path, precision):
    from transformers import AutoModelForCausalLM
    from trl_ddp_script import small_run_overrides

    from moalign.integrations.trl import train_with_trl

    run = tmp_path / "run"
    cfg = build_config(TrainConfig, {}, small_run_overrides(random_model_dir, run) + [
        "steps=1", f"optim.lr={LR}", f"precision={precision}", "checkpoint.every=0"])
    with LinearOutputDtypes() as seen:
        train_with_trl(cfg, run)
    initial = AutoModelForCausalLM.from_pretrained(random_model_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(run / "model", dtype="auto")
    changed = fraction_changed(initial, trained)
    if precision == "bf16-pure":
        assert trained.dtype == torch.bfloat16 and changed < 0.05
    else:  # accelerate's bf16 autocast over fp32 weights: the exported master weights moved
        assert trained.dtype == torch.float32 and changed > 0.99
    assert seen.dtypes == ({torch.float32} if precision == "fp32" else {torch.bfloat16})


# ---- configuration ----------------------------------------------------------------------------------------------

def test_model_dtype_float32_reads_as_fp32_and_half_precision_names_the_new_key():
    saved = build_config(TrainConfig, {"model": {"name": "tiny", "dtype": "float32"}})  # a config saved before
    assert saved.precision == "fp32" and "dtype" not in saved.model.model_dump()
    with pytest.raises(UserError, match="model.dtype=bfloat16 is now the top-level key precision: "
                                        "precision=bf16-mixed"):
        build_config(TrainConfig, {}, ["model.dtype=bfloat16"])
    with pytest.raises(UserError, match="precision"):
        build_config(TrainConfig, {}, ["precision=fp16"])
    # the precision is the run's, not the model's: switching models keeps it (as a study's grid.model does)
    assert build_config(TrainConfig, {"precision": "bf16-mixed", "model": {"name": "tiny"}},
                        ["model=smollm2-135m"]).precision == "bf16-mixed"


def test_fraction_rounding_away_by_hand_and_against_the_rounding_itself():
    # bf16 half spacings: 2^-8 at 1.0, 2^-14 at 0.02; 0 and 2^-20 move by any step of 1e-3 (or 1e-5 below)
    w = torch.tensor([1.0, 0.02, 0.0, 2.0**-20], dtype=torch.bfloat16)
    assert fraction_rounding_away([w], 1e-3) == 0.25  # only 1.0 is stuck
    assert fraction_rounding_away([w], 1e-5) == 0.5  # 1.0 and 0.02
    assert fraction_rounding_away([w.float()], 1e-5) == 0.0  # fp32: nothing is stuck at these sizes
    weights = (torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    for step in (1e-6, 1e-5, 1e-4):
        stuck = float(((weights.float() + step).to(torch.bfloat16) == weights).float().mean())
        assert fraction_rounding_away([weights], step) == pytest.approx(stuck, abs=2e-3)


# ---- master weights and the bf16 model --------------------------------------------------------------------------

def test_master_weights_accumulate_fp32_gradients_and_refresh_the_working_copy():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.02, -3.0], [0.5, 1e-3, 2.0]]))
    original = model.weight.detach().clone()
    master = MasterWeights(model)
    assert model.weight.dtype == torch.bfloat16 and master.masters["weight"].dtype == torch.float32
    assert torch.equal(master.masters["weight"], original)  # the fp32 values, not their bf16 roundings
    for _ in range(2):  # two micro-batches: the bf16 gradients add up in fp32
        model.weight.grad = torch.full((2, 3), 1 / 3).to(torch.bfloat16)
        master.add_gradients()
        assert model.weight.grad is None
    expected = 2 * torch.tensor(1 / 3).to(torch.bfloat16).float()
    assert torch.equal(master.masters["weight"].grad, torch.full((2, 3), float(expected)))
    with torch.no_grad():
        master.masters["weight"].sub_(1e-6)  # an optimizer step too small for bf16 at these magnitudes
    master.refresh_working_copy()
    assert torch.equal(model.weight, (original - 1e-6).to(torch.bfloat16))
    restored = master.restore_fp32()
    assert restored.weight.dtype == torch.float32 and torch.equal(restored.weight, original - 1e-6)


def test_sampler_on_a_bf16_model_matches_generate_with_packed_weights_and_the_lean_decode_step():
    from moalign.engine.rollout import generate
    from moalign.engine.sampler import fast_generate

    model, tokenizer = tiny_model(LlamaConfig, LlamaForCausalLM).to(torch.bfloat16), word_tokenizer()
    prompts = random_prompts(8, seed=6)
    index = list(range(len(prompts)))
    fast = fast_generate(model, tokenizer, prompts, index, index, 16, greedy=True)
    plain = fast_generate(model, tokenizer, prompts, index, index, 16, greedy=True, pack_weights=False, lean=False)
    reference = generate(model, tokenizer, prompts, index, index, 16, greedy=True)
    assert (~reference.truncated).any()
    assert torch.equal(fast.response_ids, reference.response_ids) and torch.equal(fast.truncated, reference.truncated)
    # packed bf16 weights and the lean decode step: the same bits as the model's own forward
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.equal(fast.sampler_logprobs, plain.sampler_logprobs)


# ---- a bf16-mixed run: checkpoints, resume, export ------------------------------------------------------------

def test_bf16_mixed_resume_equals_uninterrupted_and_checkpoints_hold_the_fp32_masters(tmp_path):
    from moalign.engine.metrics import read_metrics
    from moalign.engine.trainer import Trainer

    cfg = build_config(TrainConfig, {}, TINY + ["precision=bf16-mixed", "optim.lr=1e-3", "steps=2",
                                                "checkpoint.every=1", "eval.num_prompts=2"])
    (tmp_path / "full").mkdir()
    Trainer(cfg, tmp_path / "full").run()
    part = tmp_path / "part"
    part.mkdir()
    first = Trainer(cfg.model_copy(update={"steps": 1}), part)
    first.run()
    masters = {k: v.clone() for k, v in first.master.masters.items()}
    del first
    resumed = Trainer(cfg, part, resume=True)  # the one-step run's checkpoint: its masters, not their bf16 copy
    assert all(torch.equal(resumed.master.masters[k], masters[k]) for k in masters)
    assert all(torch.equal(p, masters[k].to(torch.bfloat16)) for k, p in resumed.model.named_parameters())
    resumed.finished = False
    resumed.run()

    def step_lines(run):
        return [{k: v for k, v in line.items() if not k.startswith(("time/", "perf/"))}
                for line in read_metrics(run / "metrics.jsonl") if "loss/policy" in line]

    assert step_lines(part) == step_lines(tmp_path / "full")
    a = torch.load(sorted((tmp_path / "full" / "checkpoints").glob("*.pt"))[-1], weights_only=False)["trainable"]
    b = torch.load(sorted((part / "checkpoints").glob("*.pt"))[-1], weights_only=False)["trainable"]
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("trained", ["model.train_last_k_layers=1", "model.lora.r=4"])
def test_bf16_mixed_exports_fp32_weights_with_frozen_ones_untouched(tmp_path, trained):
    from transformers import AutoModelForCausalLM

    from moalign.engine.trainer import Trainer
    from moalign.models import load_model

    cfg = build_config(TrainConfig, {}, TINY + ["precision=bf16-mixed", "optim.lr=1e-3", trained,
                                                "eval.num_prompts=2", "eval.test_at_end=false"])
    Trainer(cfg, tmp_path).run()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype="auto").state_dict()
    initial = load_model(cfg.model)[0].state_dict()
    assert all(v.dtype == torch.float32 for v in exported.values())
    changed = {k for k in initial if not torch.equal(exported[k], initial[k])}
    if "lora" in trained:  # the adapters merged into the attention projections they target; nothing else moved
        assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                               for k in changed)
    else:  # the last block and the final norm trained; every frozen weight is its fp32 self, not a bf16 rounding
        assert changed and all(k.startswith(("model.layers.3.", "model.norm.")) for k in changed)
