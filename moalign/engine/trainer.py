"""The native training loop: group-sampled policy-gradient RL against several objectives.

One step, top to bottom (``Trainer.step``):

    prompts → sample n completions each → score every objective → old / reference log-probs
    → weighting: rewards [B, M] → advantages [B]    (gradient-level: per-objective gradients combined)
    → clipped surrogate + KL, mini-batches × PPO epochs, AdamW with grad-norm clipping
    → weighting.update(post-update statistics) → one metrics line → checkpoint / evaluation when due

Crash safety: a run killed at any moment resumes from its latest checkpoint (``Trainer(..., resume=True)``) and
continues exactly; ``metrics.jsonl`` is cut back to the checkpoint's offset, so no line is torn or duplicated. The
final checkpoint (``finished``) is written after the end evaluation, so a crash during the export only redoes the
export. ``ckpt.fault_point`` marks where the crash tests kill the process (inert unless MOALIGN_FAULT is set).
A resume starts from the newest checkpoint that can be read (``ckpt.load_latest_intact``). A first Ctrl-C / SIGTERM
during the loop stops after the current step and its checkpoint; a second stops at once (``engine.signals``).
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from moalign.config import TrainConfig
from moalign.data import Example, load_data
from moalign.rl.covariance import carries_signal
from moalign.diagnostics.law import LawMonitor
from moalign.diagnostics.pl import PLEstimator
from moalign.diagnostics.runs import eval_cost
from moalign.engine import checkpoint as ckpt
from moalign.engine import objective_gradients
from moalign.engine import rollout as hf_rollout
from moalign.engine.embedding_rows import EmbeddingRowGradients
from moalign.engine.evaluation import (
    EvalSettings,
    encode_prompts,
    eval_change_table,
    eval_uniforms,
    evaluate_split,
    fixed_scalarization,
    score_batch,
)
from moalign.engine.linear_grads import LinearGradientsInPlace
from moalign.engine.memory import check_sampling_fits, trim_heap_if_large
from moalign.engine.metrics import MetricsWriter
from moalign.engine.precision import MasterWeights, warn_if_updates_round_away
from moalign.engine.rollout import Rollout, micro_batch_logprobs, response_logprobs
from moalign.engine.run_dir import remove_run_entry
from moalign.engine.sampler import fast_generate
from moalign.engine.signals import STOP
from moalign.engine.trunk import FrozenTrunk
from moalign.errors import UserError
from moalign.models import load_model, prepare_trainable, select_parameters, system_prompt_for
from moalign.objectives import Objective, ScoringBatch, load_objective
from moalign.rl.estimators import get_estimator
from moalign.rl.loss import aggregate, kl_penalty, policy_loss
from moalign.weighting import StepStats, Weighting, make_weighting
from moalign.weighting.base import per_objective_advantages

tqdm_write = tqdm.write


# what a native checkpoint holds (Trainer.state_dict); a file without these keys is not one
CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "weighting", "objectives", "stream", "rng", "skipped_steps",
                   "metrics_offset", "eval_history")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_objectives_and_weighting(cfg: TrainConfig) -> tuple[list[Objective], Weighting]:
    """The run's objectives and weighting. Needs no model or data, so the CLI calls it first: a wrong objective,
    two objectives with one name or weights that do not match the objectives fail before anything heavy runs."""
    objectives = [load_objective(spec) for spec in cfg.objectives]
    names = [o.name for o in objectives]
    shared = next((n for n in names if names.count(n) > 1), None)
    if shared is not None:
        specs = [spec for spec, n in zip(cfg.objectives, names) if n == shared]
        raise UserError(f"objectives {', '.join(map(repr, specs))} are all named {shared!r} (metrics and weights are "
                        f"keyed by name); rename one as other_name=package.module:function")
    weighting = make_weighting(cfg.weighting.name, names, **cfg.weighting.params())
    return objectives, weighting


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use device=cpu")
    return torch.device(name)


def make_adamw(params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for these parameters (CPU and CUDA): one pass over each
    tensor instead of foreach's temporaries the size of the model (0.08 s vs 0.37 s per step for SmolLM2 on 2
    cores), the same update up to float rounding."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # e.g. a device or dtype without a fused kernel
        return torch.optim.AdamW(params, **kwargs)


class PromptStream:
    """Seeded, resumable order over training examples: a fresh permutation every epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


@dataclass
class Scored:
    rewards: torch.Tensor  # [B, M], NaN = missing
    errors: list[str]


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False,
                 callbacks: list[Callable[[dict], None]] | None = None,
                 on_warning: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.callbacks = callbacks or []
        # the law monitor's warnings ("step 12: warning: …"): printed above the progress bar unless the caller
        # routes them elsewhere (a study writes them to each run's warnings.log)
        self.on_warning = on_warning or tqdm_write
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)

        self.objectives, self.weighting = load_objectives_and_weighting(cfg)
        self.objective_names = [o.name for o in self.objectives]
        self.scalarization = fixed_scalarization(self.objective_names, self.weighting.weights)  # λ0, normalised
        self.eval_settings = EvalSettings.from_config(cfg)
        self.estimator = get_estimator(cfg.estimator.name)
        self.splits: dict[str, list[Example]] = dict(load_data(cfg.data).items())
        if not self.splits["train"]:
            raise UserError("the training split is empty; check data.path / data.num_train")

        model, self.tokenizer = load_model(cfg.model, cfg.precision)
        self.prompt_tokens = {name: encode_prompts(self.tokenizer, name, exs, cfg.rollout.max_prompt_tokens,
                                                   system_prompt_for(cfg.model)) for name, exs in self.splits.items()}
        check_sampling_fits(model, cfg, min(map(len, self.prompt_tokens["train"])), self.device)
        self.reference = None
        if cfg.loss.kl_coef > 0 and cfg.model.lora is None:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False).to(self.device)
            if cfg.precision == "bf16-mixed":  # it computes as the policy does
                self.reference.to(torch.bfloat16)
        self.model = prepare_trainable(model, cfg.model).to(self.device)
        # bf16-mixed: the model is a bf16 working copy; the optimizer updates fp32 masters (engine/precision.py)
        self.master = MasterWeights(self.model) if cfg.precision == "bf16-mixed" else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("no trainable parameters (check model.train_last_k_layers / model.lora)")
        # a gradient-level weighting's per-objective gradients are taken on these (weighting.gradient_params)
        self.objective_params = (select_parameters(self.model, cfg.weighting.gradient_params)
                                 if self.weighting.family == "gradient" else [])
        self.trunk = None  # the frozen blocks below the trained ones, run once per step (engine.trunk)
        if cfg.model.train_last_k_layers is not None and cfg.model.lora is None and cfg.model.reuse_frozen_trunk:
            self.trunk = FrozenTrunk.for_model(self.model, cfg.model.train_last_k_layers)
        o = cfg.optim
        self.optimized = self.master.trainable if self.master is not None else self.params
        self.optimizer = make_adamw(self.optimized, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
        warn_if_updates_round_away(self.params, o.lr, cfg.precision)
        self.stream = PromptStream(len(self.splits["train"]), cfg.seed)
        self.step_idx = 0
        self.skipped_steps = 0
        self.finished = False  # the end evaluation is logged; only the export remains
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", cfg.log.tensorboard, cfg.log.wandb,
                                     cfg.log.mlflow, run_name=self.run_dir.name, config=cfg.model_dump(mode="json"))
        self.eval_history: list[dict[str, Any]] = []
        d = cfg.diagnostics
        self.law = LawMonitor(self.objective_names, d.warn_after) if d.law else None
        self.pl = PLEstimator()
        self.j_star = math.nan  # J* of the last step's scalarization (μ-PL), set every step
        n_probe = d.probe_prompts if d.probe_prompts is not None else (8 if cfg.model.name == "tiny" else 0)
        self.num_probe = min(n_probe, len(self.splits["val"])) if d.law else 0
        self._probe_last: torch.Tensor | None = None  # probe means under the current policy (recomputable)
        self.generate = (partial(fast_generate, pack_weights=cfg.rollout.pack_weights)
                         if cfg.rollout.sampler == "fast" else hf_rollout.generate)
        if resume:
            self._resume()

    # ------------------------------------------------------------------------------------------ data

    def score(self, rollout: Rollout, split: str, observe: bool) -> Scored:
        examples = self.splits[split]
        batch = ScoringBatch.from_lists([examples[i].prompt for i in rollout.example_index], rollout.texts,
                                        [examples[i].answer for i in rollout.example_index], rollout.num_tokens)
        return Scored(*score_batch(self.objectives, batch, observe))

    # ------------------------------------------------------------------------------------------ one step

    def step(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.cfg.rollout
        timer = PhaseTimer()
        self.model.eval()
        with timer("sample", trim=True):
            idx = self.stream.take(r.prompts_per_step)
            prompts = [self.prompt_tokens["train"][i] for i in idx for _ in range(r.group_size)]
            rollout = self.generate(self.model, self.tokenizer, prompts, [i for i in idx for _ in range(r.group_size)],
                               [g for g in range(len(idx)) for _ in range(r.group_size)], r.max_new_tokens,
                               r.temperature, r.top_p)
            ckpt.fault_point(f"sample:{self.step_idx + 1}")
        with timer("score"):
            scored = self.score(rollout, "train", observe=True)
        if self.step_idx == 0:
            # The start evaluation runs here, after the first training batch was observed and before any update:
            # the policy is still the initial one, and batch-relative objectives (conciseness's running mean
            # length) have their first statistic instead of the degenerate "everything is short" start.
            self._evaluate_start()
        mb = cfg.optim.logprob_micro_batch_size or cfg.optim.micro_batch_size  # the passes without gradients
        if self.num_probe and self._probe_last is None:
            with timer("probe", trim=True):
                self._probe_last = self._probe_rewards()
        hidden = None  # the frozen trunk's output, shared by every pass below
        if self.trunk is not None:
            with timer("trunk"):
                hidden = self.trunk.hidden_states(self.model, rollout, mb)
        old_lp = None  # exactly on-policy (1 epoch, 1 mini-batch): π_old is the update's own detached forward
        if not self._exactly_on_policy():
            old_lp = self._sampler_logprobs_as_old(rollout)
            if old_lp is None:
                with timer("old_logprobs"), self._top_only(self.model):
                    old_lp = response_logprobs(self.model, rollout, mb, r.temperature, trunk_hidden=hidden).cpu()
        ref_lp = None
        if cfg.loss.kl_coef > 0:
            with timer("ref_logprobs"):
                ref_lp = self._reference_logprobs(rollout, hidden, mb)
        mask = rollout.response_mask
        w = self.weighting
        with timer("advantages"):
            if w.family == "gradient":  # per_obj: the update's first pass takes each objective's gradient
                per_obj = per_objective_advantages(scored.rewards, rollout.group_ids, self.estimator, mask)
                advantages = (w.advantages(scored.rewards, rollout.group_ids, self.estimator, mask)
                              if w.trains_on_score  # its weights are fixed within the step
                              else per_obj @ w.weights.to(per_obj.dtype))  # the update solves w and uses per_obj
            else:
                per_obj = None
                advantages = w.advantages(scored.rewards, rollout.group_ids, self.estimator, mask)
            scores = (w.scalarize(scored.rewards, rollout.group_ids) if w.family == "reward"
                      else torch.nan_to_num(scored.rewards) @ w.weights.to(scored.rewards.dtype))
        stats = StepStats(self.step_idx, scored.rewards, rollout.group_ids, scores, advantages.float(), mask, old_lp,
                          None, cfg.loss.clip_eps_low, cfg.loss.clip_eps_high)
        with timer("update"):
            upd = self._update(rollout, hidden, old_lp, ref_lp, advantages.float(), per_obj, stats)
            ckpt.fault_point(f"update:{self.step_idx + 1}")
        if per_obj is not None and not w.trains_on_score:  # the signal trained on, with the weights the update solved
            stats.advantages = (per_obj @ w.weights.to(per_obj.dtype)).float()
            stats.scores = scores = torch.nan_to_num(scored.rewards) @ w.weights.to(scored.rewards.dtype)
        if w.needs_post_update_logprobs or self.law is not None:
            with timer("post_logprobs"), self._top_only(self.model):
                self.model.eval()
                stats.new_logprobs = self._post_update_logprobs(rollout, hidden, stats, mb)
        # J* under the weights this step trained with (before update() moves them), so J* − J stays on one scale
        self.j_star = cfg.diagnostics.j_star if cfg.diagnostics.j_star is not None else self._max_score()
        with timer("weighting"):
            wmetrics = w.update(stats)
        self.step_idx += 1
        record = {"step": self.step_idx}
        record.update(self._reward_metrics(scored, scores, rollout))
        record.update(upd)
        record.update(w.metrics())
        record.update(wmetrics)
        with timer("diagnostics", trim=True):  # the end of the step
            record.update(self._diagnostics(stats, record))
        n_tok = float(mask.sum())
        record.update(timer.metrics())
        record["perf/sample_tokens_per_s"] = n_tok / max(timer.seconds["sample"], 1e-9)
        record["perf/step_s"] = sum(timer.seconds.values())
        record["perf/peak_rss_gb"] = peak_rss_gb()
        return record

    def _post_update_logprobs(self, rollout: Rollout, hidden: torch.Tensor | None, stats: StepStats, mb: int
                              ) -> torch.Tensor:
        """log π_new [B, T] on the completions that carry a training signal; the others (Â_b = 0, e.g. a group
        whose scores all tie) keep log π_old: their w_b is 0 whatever π_new (``covariance.carries_signal``), so
        skipping their forward changes no statistic. In the default job that is 0–30 % of the rows of a step."""
        rows = carries_signal(stats.advantages, rollout.response_mask).nonzero().squeeze(1)
        new = stats.old_logprobs.clone()
        if len(rows):
            new[rows] = response_logprobs(self.model, rollout.select(rows), mb, self.cfg.rollout.temperature,
                                          trunk_hidden=_rows(hidden, rows)).cpu()
        return new

    def _top_only(self, model):
        """Within the block, ``model`` runs only the blocks above the frozen trunk (when the trunk is reused)."""
        return self.trunk.top_only(model) if self.trunk is not None else nullcontext()

    def _reference_logprobs(self, rollout: Rollout, hidden: torch.Tensor | None, mb: int) -> torch.Tensor:
        t = self.cfg.rollout.temperature
        if self.reference is not None:  # its trunk is the policy's frozen trunk: the same hidden states
            with self._top_only(self.reference):
                return response_logprobs(self.reference, rollout, mb, t, trunk_hidden=hidden).cpu()
        with self.model.disable_adapter():  # LoRA: the reference is the base model without adapters
            return response_logprobs(self.model, rollout, mb, t).cpu()

    def _reward_metrics(self, scored: Scored, scores: torch.Tensor, rollout: Rollout) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for j, name in enumerate(self.objective_names):
            col = scored.rewards[:, j]
            ok = ~torch.isnan(col)
            out[f"train/{name}/mean"] = float(col[ok].mean()) if ok.any() else float("nan")
            out[f"train/{name}/missing"] = int((~ok).sum())
        out["train/score/mean"] = float(scores.mean())
        out["train/missing_rewards"] = int(torch.isnan(scored.rewards).sum())
        lengths = torch.tensor(rollout.num_tokens, dtype=torch.float32)
        out["train/length/mean"] = float(lengths.mean())
        out["train/truncated_fraction"] = float(rollout.truncated.float().mean())
        if scored.errors:
            out["train/first_reward_error"] = scored.errors[0][:200]
        return out

    # ------------------------------------------------------------------------------------------ policy update

    def _update(self, rollout, hidden, old_lp, ref_lp, advantages, per_obj, stats) -> dict[str, Any]:
        cfg = self.cfg
        o = cfg.optim
        self.model.train()
        B = len(rollout)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.step_idx)
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(o.ppo_epochs):
            for mini in torch.randperm(B, generator=gen).chunk(o.mini_batches):
                # a group's rows side by side, so that micro-batches run each prompt once (micro_batch_logprobs)
                mini = mini[torch.argsort(rollout.group_ids[mini], stable=True)]
                with self._top_only(self.model):
                    part, mini_logprobs = self._mini_batch_gradients(
                        rollout.select(mini), _rows(hidden, mini), _rows(old_lp, mini), _rows(ref_lp, mini),
                        advantages[mini], _rows(per_obj, mini), stats)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.optimized, o.grad_clip)
                if torch.isfinite(grad_norm):
                    self.optimizer.step()
                    if self.master is not None:
                        self.master.refresh_working_copy()
                else:  # a non-finite gradient would poison the weights: skip this optimizer step
                    self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                part["grad_norm"] = float(grad_norm)
                for k, v in part.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        out = {f"loss/{k}" if not k.startswith(("clip", "grad")) else f"actor/{k}": v / n_updates
               for k, v in sums.items()}
        out["actor/skipped_steps"] = self.skipped_steps
        if old_lp is None:  # on-policy: the forward of the (single) update is π_old, record it for the weighting
            stats.old_logprobs = torch.empty_like(rollout.response_mask)
            stats.old_logprobs[mini] = mini_logprobs
        return out

    def _sampler_logprobs_as_old(self, rollout: Rollout) -> torch.Tensor | None:
        """The sampler's per-token log-probs as π_old, which saves a forward pass. They are log π under the same
        weights and temperature, from the KV-cache decode instead of one forward over the sequence: equal to the
        update's forward to ≈ 1e-5 in fp32; in bf16 both they and a recomputed forward differ from it by the same
        ≈ 0.02 (median |Δ log π|, docs/performance.md), and theirs are the probabilities the tokens were drawn
        with."""
        if self.cfg.loss.old_logprobs == "recompute":
            return None
        return rollout.sampler_logprobs

    def _exactly_on_policy(self) -> bool:
        return self.cfg.optim.ppo_epochs == 1 and self.cfg.optim.mini_batches == 1

    def _mini_batch_gradients(self, mini: Rollout, hidden, old_lp, ref_lp, adv, per_obj, stats
                              ) -> tuple[dict[str, float], torch.Tensor]:
        """Accumulate the mini-batch's gradient into ``.grad`` (micro-batch by micro-batch); also return the
        forward's detached log-probs [mini, Tr] (π_old when the step is exactly on-policy).

        The policy loss is that of the advantages ``adv``, or, for a gradient-level weighting, Σ_j w_j L_j over the
        objectives' losses with the weights its ``combine`` chose from their gradients (``_objective_weights``):
        on the chosen parameters the gradient is then the weighting's direction Σ_j w_j g_j, and on the others
        the same combination of the objectives. A weighting that ``trains_on_score`` (dynamic reweighting) reads
        the gradients only for its weights and trains on ``adv``, one advantage of its weighted score."""
        lc = self.cfg.loss
        agg = dict(mode=lc.loss_agg, norm_len=self.cfg.rollout.max_new_tokens,
                   num_tokens=float(mini.response_mask.sum().clamp(min=1)), num_seqs=float(len(mini)))
        # the loss is Σ_j w_j L_j over columns of advantages: the one column adv, or each objective's
        if per_obj is None:
            columns, weights = adv[:, None], torch.ones(1, device=self.device)
        else:
            columns, weights = per_obj, self._objective_weights(mini, hidden, old_lp, per_obj, stats, agg)
            if self.weighting.trains_on_score:
                columns, weights = adv[:, None], torch.ones(1, device=self.device)
        share = (weights.abs() / weights.abs().sum().clamp(min=1e-12)).tolist()  # of each column's clip fraction
        forward_logprobs = []
        logs = {"policy": 0.0, "kl": 0.0, "clipfrac": 0.0, "clipfrac_lower": 0.0}
        # the embedding's gradient added on the rows used (engine/embedding_rows.py) and the linear layers' weight
        # gradients accumulated in place (engine/linear_grads.py)
        embedding_rows = EmbeddingRowGradients.for_model(self.model)
        with embedding_rows or nullcontext(), LinearGradientsInPlace.for_model(self.model) or nullcontext():
            for sl, m, lp in self._micro_batch_forwards(mini, hidden):
                forward_logprobs.append(lp.detach().cpu())
                old = lp.detach() if old_lp is None else old_lp[sl].to(self.device)
                kl = torch.zeros((), device=self.device)
                if ref_lp is not None:
                    kl = aggregate(kl_penalty(lp, ref_lp[sl].to(self.device), lc.kl_estimator), m, "token-mean",
                                   num_tokens=agg["num_tokens"])
                losses, parts = self._policy_losses(lp, old, columns[sl], m, agg)
                pg = sum(w * loss for w, loss in zip(weights, losses))
                (pg + lc.kl_coef * kl).backward()
                if embedding_rows is not None:
                    embedding_rows.flush()
                if self.master is not None:  # the micro-batch's bf16 gradients, accumulated in fp32
                    self.master.add_gradients()
                frac = float(m.sum()) / agg["num_tokens"]
                logs["policy"] += float(pg.detach())
                logs["kl"] += float(kl.detach())
                logs["clipfrac"] += frac * sum(s * float(pl.clipfrac) for s, pl in zip(share, parts))
                logs["clipfrac_lower"] += frac * sum(s * float(pl.clipfrac_lower) for s, pl in zip(share, parts))
        logs["total"] = logs["policy"] + lc.kl_coef * logs["kl"]
        return logs, torch.cat(forward_logprobs)

    def _micro_batch_forwards(self, mini: Rollout, hidden):
        """Per micro-batch of ``mini``: its rows, response mask and log-probs [mb, Tr] (with gradients)."""
        mb = self.cfg.optim.micro_batch_size
        for start in range(0, len(mini), mb):
            sl = slice(start, start + mb)
            lp = micro_batch_logprobs(self.model, mini.prompt_ids[sl], mini.prompt_mask[sl], mini.response_ids[sl],
                                      mini.response_mask[sl], self.cfg.rollout.temperature, grad=True,
                                      trunk_hidden=_rows(hidden, sl))
            yield sl, mini.response_mask[sl].to(self.device), lp

    def _policy_losses(self, lp, old, advantages, m, agg) -> tuple[list[torch.Tensor], list]:
        """One aggregated clipped policy loss per column of ``advantages`` [mb, K], and the ``policy_loss``
        results (for the clip fractions)."""
        lc = self.cfg.loss
        parts = [policy_loss(lp, old, advantages[:, j].float().to(self.device), m, lc.clip_eps_low,
                             lc.clip_eps_high, lc.dual_clip) for j in range(advantages.shape[1])]
        return [aggregate(pl.per_token, m, **agg) for pl in parts], parts

    def _objective_weights(self, mini: Rollout, hidden, old_lp, per_obj, stats: StepStats, agg) -> torch.Tensor:
        """First pass of a gradient-level update: the objectives' policy-loss gradients G = [g_1; …; g_M] on the
        chosen parameters (``weighting.gradient_params``), summed over the mini-batch's micro-batches, go to the
        weighting's ``combine``, which solves for the weights w of its direction Σ_j w_j g_j (every gradient-level
        weighting reads G only through GGᵀ, so loss and objective gradients give the same w). The other trainable
        parameters are frozen for this pass: its forward keeps no graph that only they need, and G is [M, P_chosen].
        Returns w [M] on the device."""
        grads = objective_gradients.gradient_matrix(per_obj.shape[1], self.objective_params, self.device)
        with objective_gradients.only_chosen_require_grad(self.params, self.objective_params):
            for sl, m, lp in self._micro_batch_forwards(mini, hidden):
                old = lp.detach() if old_lp is None else old_lp[sl].to(self.device)
                losses, _ = self._policy_losses(lp, old, per_obj[sl], m, agg)
                objective_gradients.accumulate(grads, losses, self.objective_params)
        self.weighting.combine(grads, stats)
        return self.weighting.weights.to(self.device, torch.float32)

    # ------------------------------------------------------------------------------------------ diagnostics

    def _max_score(self) -> float:
        """J* for the μ-PL estimate under the current weights: the scalarized score of a sample that satisfies every
        objective (rewards in [0, 1]); for advantage- and gradient-level weightings, the sum of the weights."""
        ones = torch.ones(1, len(self.objective_names))
        if self.weighting.family == "reward":
            return float(self.weighting.scalarize(ones, torch.zeros(1, dtype=torch.long)))
        return float(self.weighting.weights.sum())

    def _diagnostics(self, stats: StepStats, record: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        grad_norm = record.get("actor/grad_norm")
        if grad_norm is not None and math.isfinite(grad_norm):
            out.update(self.pl.update(grad_norm ** 2, record["train/score/mean"], self.j_star))
        if self.law is None:
            return out
        out.update(self.law.observe_step(stats))
        if self.num_probe:
            after = self._probe_rewards()
            out.update(self.law.realise(self._probe_last, after))
            self._probe_last = after
        messages = self.law.warnings()
        if messages:
            out["law/warning"] = "; ".join(messages)
        for message in messages:
            self.on_warning(f"step {self.step_idx}: warning: {message}")
        return out

    @torch.no_grad()
    def _probe_rewards(self) -> torch.Tensor:
        """Per-completion rewards [n, M] on the fixed probe prompts (the first val prompts, ``probe_group_size``
        samples each) under the current policy. Completion k of probe prompt i draws its tokens from the same
        uniforms at every measurement (the fast sampler; ``rollout.sampler=hf`` reseeds torch's RNG instead, which
        repeats the draws only while every sequence takes the same path), so successive measurements are paired."""
        d, r = self.cfg.diagnostics, self.cfg.rollout
        prompts = [p for p in self.prompt_tokens["val"][:self.num_probe] for _ in range(d.probe_group_size)]
        index = [i for i in range(self.num_probe) for _ in range(d.probe_group_size)]
        self.model.eval()
        if r.sampler == "fast":
            uniforms = eval_uniforms(self.cfg.seed, "probe", self.num_probe, d.probe_group_size, r.max_new_tokens)
            rollout = self.generate(self.model, self.tokenizer, prompts, index, index, r.max_new_tokens,
                                    r.temperature, r.top_p, uniforms=uniforms)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed + 7_777_777)
                rollout = self.generate(self.model, self.tokenizer, prompts, index, index, r.max_new_tokens,
                                        r.temperature, r.top_p)
        return self.score(rollout, "val", observe=False).rewards.double()

    # ------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        return evaluate_split(self.model, self.tokenizer, self.objectives, split, self.splits[split],
                              self.prompt_tokens[split], self.eval_settings)

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        named = self.master.masters if self.master is not None else dict(self.model.named_parameters())
        trainable = {k: v.detach().cpu().clone() for k, v in named.items() if v.requires_grad}
        return {"step": self.step_idx, "trainable": trainable, "optimizer": self.optimizer.state_dict(),
                "weighting": self.weighting.state_dict(),
                "objectives": {o.name: o.state_dict() for o in self.objectives},
                "stream": self.stream.state_dict(), "rng": ckpt.rng_state(), "skipped_steps": self.skipped_steps,
                "metrics_offset": self.metrics.offset(), "eval_history": self.eval_history,
                "finished": self.finished, "pl": self.pl.state_dict(),
                "law": None if self.law is None else self.law.state_dict()}

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.step_idx, self.state_dict(), self.cfg.checkpoint.keep)

    def _resume(self) -> None:
        found = ckpt.load_latest_intact(self.run_dir, CHECKPOINT_KEYS, warn=tqdm_write)
        if found is None:
            return  # nothing saved yet: the run starts over (its metrics file is reset in run())
        path, state = found
        named = dict(self.model.named_parameters())
        saved = state["trainable"]
        trainable = {k for k, v in named.items() if v.requires_grad}
        if set(saved) != trainable or any(named[k].shape != v.shape for k, v in saved.items()):
            raise UserError(f"checkpoint {path} does not hold this run's trainable parameters (other names or shapes): "
                            f"it belongs to another model or trainable part; resume with the config it was started with")
        with torch.no_grad():
            for k, v in saved.items():
                named[k].copy_(v)
        if self.master is not None:
            self.master.load(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.weighting.load_state_dict(state["weighting"])
        for o in self.objectives:
            o.load_state_dict(state["objectives"].get(o.name, {}))
        self.stream.load_state_dict(state["stream"])
        ckpt.set_rng_state(state["rng"])
        self.step_idx = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.eval_history = state["eval_history"]
        # a finished run resumed with more steps (steps may grow on resume) trains on and evaluates its new end
        self.finished = state.get("finished", False) and self.step_idx >= self.cfg.steps
        if state.get("pl") is not None:
            self.pl.load_state_dict(state["pl"])
        if self.law is not None and state.get("law") is not None:
            self.law.load_state_dict(state["law"])
        self.metrics.truncate(state["metrics_offset"])

    # ------------------------------------------------------------------------------------------ the run

    def run(self, progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.step_idx == 0:
            self.metrics.truncate(0)
        with STOP.deferring():  # a first Ctrl-C / SIGTERM stops at the end of the step (engine/signals.py)
            while self.step_idx < cfg.steps:
                record = self.step()
                due_eval = cfg.eval.every and self.step_idx % cfg.eval.every == 0 and self.step_idx < cfg.steps
                if due_eval:
                    ev = self.evaluate("val")
                    record.update(ev)
                    self.eval_history.append({"step": self.step_idx, **ev})
                self._log(record)
                if progress:
                    progress(self.step_idx, cfg.steps, record)
                if cfg.checkpoint.every and self.step_idx % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                if STOP.requested:
                    path = self.save_checkpoint()
                    raise KeyboardInterrupt(f"stopped by signal {STOP.signal} after step {self.step_idx}; "
                                            f"checkpoint {path.name}")
            if not self.finished:
                self._evaluate_end()
                self.finished = True
                path = self.save_checkpoint()
                if STOP.requested:
                    raise KeyboardInterrupt(f"stopped by signal {STOP.signal} after the end evaluation; checkpoint "
                                            f"{path.name} (a resume only exports the model)")
        self.export_model()
        self.metrics.close()
        return self.summary(time.perf_counter() - t_start)

    def _held_out_record(self) -> dict[str, Any]:
        """The evaluation line of the run's start and end: val, and test when ``eval.test_at_end``."""
        record = {"step": self.step_idx, **self.evaluate("val")}
        if self.cfg.eval.test_at_end:
            record.update(self.evaluate("test"))
        return record

    def _evaluate_start(self) -> None:
        record = self._held_out_record() | self.scalarization
        self._log(record)
        self.eval_history = [record]

    def _evaluate_end(self) -> None:
        record = self._held_out_record()
        self._log(record)
        self.eval_history.append(record)

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        for cb in self.callbacks:
            cb(record)

    def export_model(self) -> None:
        model = self.master.restore_fp32() if self.master is not None else self.model  # the end of the run
        model = model.merge_and_unload() if self.cfg.model.lora is not None else model
        out = self.run_dir / "model"
        tmp = self.run_dir / ".model.tmp"
        remove_run_entry(self.run_dir, tmp.name)
        model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        ckpt.fault_point(f"export:{self.step_idx}")
        remove_run_entry(self.run_dir, out.name)
        os.replace(tmp, out)

    def summary(self, wall_s: float) -> dict[str, Any]:
        table = eval_change_table(self.eval_history, self.objective_names)
        return {"steps": self.step_idx, "wall_seconds": wall_s, "objectives": self.objective_names,
                "weighting": self.cfg.weighting.name, "final_weights": self.weighting.named_weights(),
                "eval": table, "eval_cost": eval_cost(self.eval_history), "skipped_steps": self.skipped_steps,
                "law": None if self.law is None else self.law.summary(), "pl": {"mu_hat": self.pl.mu_hat,
                                                                                "j_star": self.j_star,
                                                                                "dropped_points": self.pl.num_dropped}}


def _rows(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[index]


def peak_rss_gb() -> float:
    """The process's resident-memory high-water mark so far (Linux reports KiB, macOS bytes; NaN on Windows)."""
    try:
        import resource
    except ImportError:
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


class PhaseTimer:
    """Seconds per phase of a step. ``trim=True`` returns what the phase freed to the system at its end
    (engine/memory.py): after sampling (the packed weights, the key/value cache) and at the end of the step. The
    passes in between (reference, update, post-update) reuse each other's freed pages instead of faulting them in
    again: on the default job's shapes that is 1.03 M → 0.80 M minor faults per step at the same peak."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, trim: bool = False):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if trim:
                trim_heap_if_large()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.seconds.items()}

