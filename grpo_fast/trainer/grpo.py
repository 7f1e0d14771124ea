"""GRPOTrainer: group-relative advantages + the clipped surrogate of grpo_fast.policy_loss.

The update rule on top of RLTrainer's rollout / rewards / logging / checkpoints:
  advantages  group_advantages(rewards, G) (C++ core; NaN rewards -> advantage 0)
  old logps   only when num_iterations > 1 (the rollout policy, before any update)
  ref logps   only when beta > 0 (frozen copy, or the PEFT base with the adapter disabled)
  update      num_iterations x [gradient_accumulation_steps micro-batches -> one optimiser step]

Under torchrun each rank holds whole groups (its slice of the step's prompts): advantages are
computed on the all-gathered reward vector (so scale_rewards="batch" uses the global batch std),
dapo's normaliser is the all-rank token count over the world size (DDP / FSDP2 average the
gradients), and the other losses average micro-batch means, which the gradient average makes
the global mean; no gradient sync on all but the last micro-batch. The result equals a
one-process step on the same global batch (tests/test_distributed.py).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from ..ops import group_advantages, policy_loss, selective_log_softmax
from . import distributed as dist_utils
from .base import RLTrainer
from .config import GRPOConfig
from .rollout import Rollout

__all__ = ["GRPOTrainer"]


class GRPOTrainer(RLTrainer):
    """Group Relative Policy Optimization (DeepSeekMath), with TRL's options.

    Args:
        model: a transformers causal LM, or a local path / name (from_pretrained, local files only).
        reward_funcs: a callable f(prompts, completions, completion_ids, **columns) -> list[float | None],
            a sequence-classification reward model given as (model, tokenizer) or RewardModel, a local
            reward-model directory, or a list of these (summed with config.reward_weights).
        train_dataset: a datasets.Dataset or a list of dicts with "prompt" (text or chat messages);
            the other columns reach the reward functions as keyword lists.
        config (or TRL's name, args): GRPOConfig.
        tokenizer (or TRL's name, processing_class): the policy's tokenizer (loaded from the model's
            path when omitted).
        ref_model: reference policy for the KL penalty (beta > 0); default: a frozen copy of model.
        peft_config: a peft config: only the adapter is trained; the reference is the base model.
        callbacks: callables cb(trainer, metrics) -> bool called after every step; True stops training.
        engine: the rollout engine (grpo_fast.trainer.engine.RolloutEngine); default: HF generate.
    """

    config_class = GRPOConfig
    algorithm = "grpo"
    update_metrics_reduced = True  # update() reduces its metrics over ranks itself, exactly

    def __init__(self, model, reward_funcs=None, train_dataset=None, *, ref_model=None, **kwargs):
        super().__init__(model, reward_funcs, train_dataset, **kwargs)
        cfg: GRPOConfig = self.config
        self.ref_model = self.build_reference_model(cfg.beta > 0, ref_model)
        self.wrapped_model = self.wrap_policy()
        self.optimizer = self.build_optimizer(self.trainable_parameters())
        self.scheduler = self.build_scheduler(self.optimizer, cfg.max_steps * cfg.num_iterations)

    # ------------------------------------------------------------------ advantages
    def compute_advantages(self, batch: Rollout) -> Rollout:
        cfg: GRPOConfig = self.config
        self.warn_if_no_signal(batch)
        rewards = batch.rewards
        if self.dist.enabled:  # N floats per rank; the global vector makes "batch" scaling exact
            rewards = self.dist.all_gather(rewards)                              # (W * N,)
        adv = group_advantages(rewards, batch.group_size, estimator=cfg.advantage_estimator,
                               scale=cfg.scale_rewards)
        if self.dist.enabled:
            N = len(batch)
            adv = adv[self.dist.rank * N:(self.dist.rank + 1) * N]
        fields = {"advantages": adv.to(self.device)}                             # (N,)
        if cfg.mask_truncated_completions:
            keep = (~batch.truncated).to(batch.completion_mask.dtype)[:, None]
            fields["loss_mask"] = batch.completion_mask * keep
        if cfg.num_iterations > 1:
            was = self.model.training
            self.model.eval()
            fields["old_logps"] = self._logps(self.model, batch)
            self.model.train(was)
        if cfg.beta > 0:
            with self.ref_context():
                fields["ref_logps"] = self._logps(self.ref_model if self.ref_model is not None else self.model, batch)
        return batch.with_fields(**fields)

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def _logps(self, model, batch: Rollout) -> torch.Tensor:
        mb = self.config.per_device_train_batch_size
        out = []
        for start in range(0, len(batch), mb):
            rows = slice(start, start + mb)
            logits = self.forward_logits(model, batch, rows)                   # (mb, T, V)
            out.append(selective_log_softmax(logits, batch.completion_ids[rows], self.config.temperature))
        return torch.cat(out)                                                   # (N, T)

    # ------------------------------------------------------------------ the update
    def update(self, batch: Rollout) -> Dict[str, Any]:
        cfg: GRPOConfig = self.config
        self.model.train()
        N = len(batch)
        mb = cfg.per_device_train_batch_size
        # this rank's micro-batches: gradient_accumulation_steps on one process, fewer when the
        # step's global batch is split over ranks (DDP's gradient average restores the global mean)
        n_micro = math.ceil(N / mb)
        mask = batch.mask
        # dapo: one normaliser for all micro-batches of the optimiser step (their total token count,
        # over all ranks; divided by the world size because the ranks' gradients are averaged)
        num_items = None
        if cfg.loss_type == "dapo":
            tokens = self.dist.sum_floats([float(mask.sum())])[0]
            num_items = max(tokens, 1.0) / self.dist.world_size
        # metrics accumulate on the device (loss, token weight, each metric x weight) and are
        # read back once per update: no host-device sync per micro-batch
        keys = ("entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "kl")
        acc = None
        present = set()
        grad_norms = []
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            it_loss = 0.0  # this optimiser step's loss (summed over its micro-batches), checked before the step
            for i, start in enumerate(range(0, N, mb)):
                rows = slice(start, start + mb)
                sync = dist_utils.gradient_sync(self.wrapped_model, self.dist, sync=i == n_micro - 1)
                with sync:
                    loss, out = self._micro_loss(batch, rows, num_items, n_micro)
                    loss.backward()
                    it_loss = it_loss + loss.detach()
                w = mask[rows].sum().to(torch.float64)
                vals = [loss.detach().to(torch.float64), w]
                for key in keys:
                    v = getattr(out, key)
                    present.update([key] if v is not None else [])
                    vals.append(v.to(torch.float64) * w if v is not None else torch.zeros_like(w))
                row = torch.stack(vals)
                acc = row if acc is None else acc + row
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
            elif self.dist.mode == "fsdp2" and self.dist.enabled:  # sharded grads: the norm is a collective
                gn = torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True)
            else:
                gn = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            grad_norms.append(dist_utils.full_tensor(gn).detach().to(torch.float64))
            if self.finite_update(it_loss, grad_norms[-1]):  # else skipped: the weights stay finite
                self.optimizer.step()
                self.scheduler.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
        values = acc.tolist()
        loss_total, weight_total = values[0], values[1]
        sums = {k: values[2 + j] for j, k in enumerate(keys) if k in present}
        grad_norms = torch.stack(grad_norms).tolist()
        keys = sorted(sums)
        # over ranks: loss is a mean of the ranks' losses (as their gradients), the rest token-weighted
        totals = self.dist.sum_floats([loss_total, weight_total] + [sums[k] for k in keys])
        loss_total, weight_total = totals[0] / self.dist.world_size, totals[1]
        sums = dict(zip(keys, totals[2:]))
        metrics: Dict[str, Any] = {"loss": loss_total / cfg.num_iterations,
                                   "grad_norm": sum(grad_norms) / len(grad_norms)}
        denom = max(weight_total, 1.0)
        for key in ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
            metrics[key] = sums[key] / denom if key in sums else (0.0 if key == "kl" else float("nan"))
        return metrics

    def _micro_loss(self, batch: Rollout, rows: slice, num_items, n_micro: int):
        cfg: GRPOConfig = self.config
        mask = batch.mask
        logits = self.forward_logits(self.wrapped_model, batch, rows)            # (mb, T, V)
        out = policy_loss(
            logits, batch.completion_ids[rows], batch.advantages[rows], mask[rows],
            old_logps=None if batch.old_logps is None else batch.old_logps[rows],
            ref_logps=None if batch.ref_logps is None else batch.ref_logps[rows],
            loss_type=cfg.loss_type, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
            epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            importance_sampling_level=cfg.importance_sampling_level, entropy_coef=cfg.entropy_coef,
            temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
            num_items_in_batch=num_items)
        # dapo is already normalised over the whole accumulated batch; the others per micro-batch
        loss = out.loss if cfg.loss_type == "dapo" else out.loss / n_micro
        return loss, out
