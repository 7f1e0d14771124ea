"""GRPO (DeepSeekMath) with TRL's options: group-relative advantages and the clipped surrogate.

On a scored rollout (rewards and loss_mask set by the loop):
  prepare   advantages  group_advantages over every rank's rewards (grpo_fast.rl; no reward -> 0)
            old logps   when num_iterations > 1, or when the engine gave its own log-probs (vLLM):
                        then the mismatch metrics and, with the IS correction, the importance weights
            ref logps   when beta > 0 (a frozen copy, or the PEFT base with the adapter disabled)
  update    num_iterations x [micro-batches of per_device_train_batch_size -> one optimiser step]

Under torchrun each rank holds whole groups, per_device_train_batch_size x gradient_accumulation_steps
completions (TRL's per-device batch). The token normaliser (dapo, cispo) is the all-rank
token count over the world size, the other losses average micro-batch means, and DDP / FSDP2
average the gradients, so a step equals a one-process step on the same global batch
(tests/test_distributed.py). No gradient sync on all but the last micro-batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict

import torch

from ..config import GRPOConfig, loss_options
from ..model import attach_reference
from ..rollout import Rollout
from ..train.advantages import engine_correction, global_group_advantages
from ..train.algorithm import Algorithm, AlgorithmContext, micro_batches, rows_of
from ..train.distributed import gradient_sync
from ..train.metrics import MetricAccumulator
from ..train.optim import OptimizerStep, build_optimizer, build_scheduler
from ..train.trainer import Trainer

__all__ = ["GRPO", "GRPOTrainer"]

# PolicyLossOutput fields that are not per-step diagnostics
_NOT_METRICS = ("loss", "logps", "entropy_kept")


class AdaptiveEntropy:
    """TRL's adaptive entropy coefficient (use_adaptive_entropy; docs/losses.md): after each optimiser
    step the coefficient moves by entropy_coef_delta towards keeping the mean kept-token entropy at
    entropy_target; a step applies it only while the last observed entropy is at or below the target."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.coef = float(cfg.entropy_coef)
        self.last = math.inf          # +inf before the first step: the first step applies 0
        self._sums = None             # (entropy x kept tokens, kept tokens) of this optimiser step

    def applied(self) -> float:
        if not self.cfg.use_adaptive_entropy:
            return self.cfg.entropy_coef
        return self.coef if self.last <= self.cfg.entropy_target else 0.0

    def observe(self, out, tokens: torch.Tensor) -> None:
        if self.cfg.use_adaptive_entropy:
            kept = tokens if out.entropy_masked_frac is None else tokens * (1 - out.entropy_masked_frac.double())
            h = out.entropy if out.entropy_kept is None else out.entropy_kept
            pair = torch.stack([h.detach().double() * kept, kept])
            self._sums = pair if self._sums is None else self._sums + pair

    def adapt(self, dist) -> None:
        """The rule, on the sums over every micro-batch and rank of the optimiser step."""
        if self._sums is None:
            return
        h_sum, n = dist.sum_floats(self._sums.tolist())
        self._sums = None
        H = h_sum / n if n > 0 else math.nan
        if not math.isfinite(H):  # no kept tokens: nothing observed, the state stays
            return
        cfg = self.cfg
        step = cfg.entropy_coef_delta if H <= cfg.entropy_target else -cfg.entropy_coef_delta
        self.coef = min(max(self.coef + step, cfg.entropy_coef_min), cfg.entropy_coef_max)
        self.last = H


class GRPO(Algorithm):
    name = "grpo"

    def __init__(self, ctx: AlgorithmContext, ref_model=None):
        super().__init__(ctx)
        cfg: GRPOConfig = self.config
        if cfg.beta > 0:
            attach_reference(self.policy, ref_model, dtype=cfg.dtype, device=self.device, fused=cfg.fused_lm_head,
                             dist=self.dist, check_ids=ctx.check_ids)
        self.wrap_policy()
        self.optimizer = build_optimizer(self.trainable_parameters(), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, cfg.max_steps * cfg.num_iterations)
        self.optim_step = OptimizerStep(self.optimizer, self.scheduler, max_grad_norm=cfg.max_grad_norm,
                                        dist=self.dist, max_consecutive_nonfinite=cfg.max_consecutive_nonfinite)
        self.entropy = AdaptiveEntropy(cfg)

    # ------------------------------------------------------------------ state
    @property
    def entropy_coef(self) -> float:
        return self.entropy.coef

    def state_dict(self) -> Dict[str, Any]:
        return {"entropy_coef": float(self.entropy.coef), "last_entropy": float(self.entropy.last)}

    def load_state_dict(self, state: Dict[str, Any], path: str) -> None:
        self.entropy.coef = float(state.get("entropy_coef", self.config.entropy_coef))
        self.entropy.last = float(state.get("last_entropy", math.inf))

    # ------------------------------------------------------------------ prepare
    def prepare(self, batch: Rollout, step: int) -> Rollout:
        cfg: GRPOConfig = self.config
        fields: Dict[str, Any] = {"advantages": global_group_advantages(
            batch.rewards, batch.group_size, estimator=cfg.advantage_estimator, scale=cfg.scale_rewards,
            dist=self.dist, device=self.device)}                                   # (N,)
        metrics: Dict[str, float] = {}
        if cfg.num_iterations > 1 or batch.sampling_logps is not None:
            old = self.policy.rollout_logps(self.policy.model, batch, cfg.per_device_train_batch_size)   # (N, T)
            # an engine's samples (vLLM): the mismatch metrics; with the IS correction the loss weighs each
            # sample by trainer / engine likelihood and keeps these as old log-probs, as TRL does
            weights, metrics = engine_correction(batch, old, cfg)
            if weights is not None:
                fields["importance_weights"] = weights
            if cfg.num_iterations > 1 or weights is not None:
                fields["old_logps"] = old
        if cfg.beta > 0:
            fields["ref_logps"] = self.policy.reference_logps(batch, cfg.per_device_train_batch_size)
        out = batch.with_fields(**fields)
        out.extras["metrics"] = metrics
        return out

    # ------------------------------------------------------------------ update
    def update(self, batch: Rollout, step: int) -> Dict[str, Any]:
        cfg: GRPOConfig = self.config
        policy, dist = self.policy, self.dist
        policy.model.train()
        mask = batch.loss_mask
        chunks = micro_batches(len(batch), cfg.per_device_train_batch_size)
        # this rank's micro-batches: gradient_accumulation_steps of per_device_train_batch_size (TRL's per-device
        # batch; the gradient average over ranks gives the global mean)
        gather = dist.gather_ragged if dist.enabled and cfg.top_entropy_quantile < 1 else None
        num_items = dist.token_normaliser(mask)
        acc = MetricAccumulator()
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            coef = self.entropy.applied()
            options = loss_options(cfg, entropy_coef=coef, num_items_in_batch=num_items, entropy_gather=gather,
                                   gradient_accumulation_steps=len(chunks))
            total = 0.0  # this optimiser step's loss (summed over its micro-batches), checked before the step
            for i, rows in enumerate(chunks):
                opt = dataclasses.replace(options, sampling_logps=rows_of(batch.sampling_logps, rows),
                                          importance_weights=rows_of(batch.importance_weights, rows))
                with gradient_sync(policy.wrapped, dist, sync=i == len(chunks) - 1):
                    out = policy.loss(policy.wrapped, batch, rows, batch.advantages[rows], mask[rows], opt,
                                      old_logps=rows_of(batch.old_logps, rows), ref_logps=rows_of(batch.ref_logps, rows))
                    self.optim_step.backward(out.loss)        # through the loss scale (float16)
                total = total + out.loss.detach()
                tokens = mask[rows].sum().to(torch.float64)
                for name in out._fields:
                    if name not in _NOT_METRICS:
                        acc.add(name, getattr(out, name), tokens)
                self.entropy.observe(out, tokens)
            self.entropy.adapt(dist)
            acc.add("grad_norm", self.optim_step(total, step))
            acc.add("loss", total)
            if cfg.entropy_coef or cfg.use_adaptive_entropy:
                acc.add("entropy_coef", coef)                    # the coefficient the loss used
        metrics: Dict[str, Any] = {"kl": 0.0, "entropy": math.nan, "clip_ratio_low": math.nan,
                                   "clip_ratio_high": math.nan, "clip_ratio_region": math.nan}
        metrics.update(acc.means(dist))
        metrics.update(self.optim_step.metrics())
        return metrics


class GRPOTrainer(Trainer):
    """Group Relative Policy Optimization (DeepSeekMath), with TRL's options.

    Args:
        model: a transformers causal LM, a local path or a hub id (from_pretrained: its cache, HF_HUB_OFFLINE).
        reward_funcs: a callable f(prompts, completions, completion_ids, **columns) -> list[float | None],
            a sequence-classification reward model given as (model, tokenizer) or RewardModel, a name
            or reward-model directory (grpo_fast.rewards.resolve_reward), or a list of these (summed
            with config.reward_weights).
        train_dataset: a datasets.Dataset or a list of dicts with "prompt" (text or chat messages);
            the other columns reach the reward functions as keyword lists.
        config (or TRL's name, args): GRPOConfig.
        tokenizer (or TRL's name, processing_class): the policy's tokenizer (loaded from the model's
            path when omitted).
        ref_model: reference policy for the KL penalty (beta > 0); default: a frozen copy of model.
        peft_config: a peft config: only the adapter is trained; the reference is the base model.
        callbacks: transformers.TrainerCallback objects, or callables cb(trainer, metrics) -> bool
            called after every step (True stops training).
        engine: a grpo_fast.rollout.RolloutEngine (default: the one config.engine / use_vllm names).
        eval_dataset: held-out prompts for eval_strategy="steps".
        tools, environment_factory, rollout_func: multi-turn rollouts with TRL's meanings (tool
            functions; an environment class or {name: class}; a custom rollout): docs/multi_turn.md.
    """

    config_class = GRPOConfig
    algorithm_class = GRPO

    @property
    def entropy_coef(self) -> float:
        return self.algorithm.entropy_coef
