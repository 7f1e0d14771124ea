"""PPOTrainer: PPO with a value model (GAE) on RLTrainer's rollout / rewards / logging / checkpoints.

Per step (Ouyang et al. 2022 / Ziegler et al. 2019 style RLHF-PPO, token-level MDP):
  rollout    N completions (num_generations per prompt, 1 by default)
  at rollout time, in eval mode and without gradients:
             old logps (policy), values (critic), ref logps (reference, when beta > 0)
  rewards    token level: the sequence reward on the last completion token, and, with
             kl_penalty="reward", -beta * (logp - ref_logp) (k1) on every token; beta fixed or
             driven by the adaptive controller of Ziegler et al. (target_kl, kl_horizon)
  GAE        grpo_fast.gae(rewards, values, mask, gamma, lam) (C++) -> advantages, returns;
             advantages optionally whitened over the batch (masked mean / std)
  update     ppo_epochs x num_mini_batches optimiser steps; each minibatch is
             gradient_accumulation_steps micro-batches of per_device_train_batch_size completions
             loss = clipped surrogate (grpo_fast.policy_loss with (B, T) advantages; dual clip
                    clip_ratio_c; kl_penalty="loss" puts beta * KL there instead)
                  + vf_coef * 0.5 * max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2)
                  - entropy_coef * H

Diagnostics: approx_kl is Schulman's k3 estimator of KL(pi_old || pi), the mean over tokens of
(rho - 1) - log rho (unbiased, never negative), measured on each minibatch before its optimiser
step; clip_fraction the fraction of tokens where the ratio clip is active; value_loss,
value_clip_fraction, explained_variance (1 - Var[R - V] / Var[R] with the rollout-time values),
return_mean, value_mean, advantage_mean/std (before whitening), kl_coef, and the rollout KL to
the reference: kl (mean over tokens of logp - ref_logp) and kl_sequence (summed over each
completion, averaged over completions; the quantity the adaptive controller steers).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..ops import gae
from ..rl import AdaptiveKLController, explained_variance, masked_mean, masked_var, masked_whiten, token_rewards
from . import distributed as dist_utils
from .base import RLTrainer
from .config import PPOConfig
from .checkpoint import quiet_progress
from .config import ConfigError
from .critic import Critic
from .policy import forward_hidden
from .rollout import Rollout

__all__ = ["PPOConfig", "PPOTrainer"]


class PPOTrainer(RLTrainer):
    """Proximal Policy Optimization with a learned value function (GAE) for causal LMs.

    Args:
        model, reward_funcs, train_dataset, tokenizer, ref_model, peft_config, callbacks: as
            GRPOTrainer (the reference model is the PEFT base with the adapter disabled under peft).
        config: PPOConfig.
        value_model: the critic: a ValueModel, a transformers model (its trunk gets a fresh head,
            used as is), or a local path; default (and config.value_model None): a copy of the
            policy with a fresh zero head. Ignored with config.share_policy_trunk.

    The critic's parameters are optimised by the same AdamW as the policy (one loss:
    policy + vf_coef * value), and saved in every checkpoint and in OUTPUT_DIR/final/value_model
    (or final/value_head.safetensors with a shared trunk).
    """

    config_class = PPOConfig
    algorithm = "ppo"

    def __init__(self, model, reward_funcs=None, train_dataset=None, *, ref_model=None, value_model=None, **kwargs):
        super().__init__(model, reward_funcs, train_dataset, **kwargs)
        cfg: PPOConfig = self.config
        if self.dist.enabled and cfg.minibatch_size % self.dist.world_size:
            raise ConfigError(f"minibatch_size = per_device_train_batch_size * gradient_accumulation_steps = "
                              f"{cfg.minibatch_size} completions cannot be split evenly over "
                              f"{self.dist.world_size} processes")
        self.ref_model = self.build_reference_model(cfg.beta > 0, ref_model)
        self.critic = Critic(self.model, value_model if value_model is not None else cfg.value_model,
                             shared_trunk=cfg.share_policy_trunk, device=self.device,
                             disable_dropout=cfg.disable_dropout, dist=self.dist)
        self.kl_ctl = AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else None
        # DDP: the loss spans policy and critic, so both gradients are averaged by hand
        # (dist_utils.average_gradients); no wrapper, the policy is broadcast once
        self.replicate_policy()
        self.optimizer = self.build_optimizer(self.trainable_parameters() + self.critic.parameters())
        self.scheduler = self.build_scheduler(self.optimizer, cfg.max_steps * cfg.ppo_epochs * cfg.num_mini_batches)

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value if self.kl_ctl is not None else self.config.beta

    def extra_state(self) -> Dict[str, Any]:
        return {"kl_coef": self.kl_ctl.value} if self.kl_ctl is not None else {}

    def save_extra_files(self, directory: str) -> None:
        self.critic.save(directory)

    def load_extra_state(self, state: Dict[str, Any], path: str) -> None:
        self.critic.load(path, legacy_state=state.get("critic"))
        if self.kl_ctl is not None and "kl_coef" in state:
            self.kl_ctl.value = float(state["kl_coef"])

    def save_final(self) -> str:
        path = super().save_final()
        if self.dist.is_main:
            with quiet_progress():
                self.critic.save_final(path)
        return path

    # ------------------------------------------------------------------ forward passes
    def forward(self, batch: Rollout, rows):
        """-> the policy's features (hidden states (n, T, H) through the fused head, else logits
        (n, T, V)) and the values (n, T) float32, with the current policy and critic."""
        shared = self.critic.head is not None
        if self.head_for(self.model) is not None:
            hidden = self.features(self.model, batch, rows)                    # (n, T, H)
            return hidden, self.critic.values(batch, rows, hidden if shared else None)
        if shared:
            logits, hidden = forward_hidden(self.model, batch, rows)
            return logits, self.critic.values(batch, rows, hidden)
        return self.forward_logits(self.model, batch, rows), self.critic.values(batch, rows)

    @torch.no_grad()
    def _rollout_stats(self, batch: Rollout):
        """old logps, values (policy and critic in eval mode) and ref logps (or None), each (N, T)."""
        cfg: PPOConfig = self.config
        modules = [self.model, self.critic.module]
        was = [m.training for m in modules]
        for m in modules:
            m.eval()
        mb = cfg.per_device_train_batch_size
        logps, values, ref = [], [], []
        try:
            for start in range(0, len(batch), mb):
                rows = slice(start, start + mb)
                ids = batch.completion_ids[rows]
                feats, v = self.forward(batch, rows)
                logps.append(self.logps_from(self.model, feats, ids))
                values.append(v.float())
                if cfg.beta > 0:
                    with self.ref_context():
                        ref_model = self.ref_model if self.ref_model is not None else self.model
                        ref.append(self.token_logps(ref_model, batch, rows))
        finally:
            for m, w in zip(modules, was):
                m.train(w)
        return torch.cat(logps), torch.cat(values), (torch.cat(ref) if ref else None)

    # ------------------------------------------------------------------ advantages
    def compute_advantages(self, batch: Rollout) -> Rollout:
        cfg: PPOConfig = self.config
        self.warn_if_no_signal(batch)
        # no reward (or masked truncation): the sample is left out of every loss
        drop = batch.dropped(cfg.mask_truncated_completions)
        mask = batch.mask_without(drop)
        batch = batch.with_fields(loss_mask=mask)
        m = mask.to(torch.float32)
        scores = torch.nan_to_num(batch.rewards, nan=0.0).to(self.device)
        old_logps, values, ref_logps = self._rollout_stats(batch)
        values = values * m
        metrics: Dict[str, float] = {"kl_coef": self.kl_coef, "kl": 0.0}
        kl_tok = None
        if ref_logps is not None:
            kl_tok = (old_logps - ref_logps) * m                                 # k1 per token
            metrics["kl"] = float(masked_mean(kl_tok, mask))
            if self.dist.enabled:  # the controller must see the global KL, so that beta stays the same on every rank
                kl_sum, n_seq = self.dist.sum_floats([float(kl_tok.sum(1)[~drop].sum()), float((~drop).sum())])
                kl_seq = kl_sum / n_seq if n_seq > 0 else float("nan")
            else:
                kl_seq = float(kl_tok.sum(1)[~drop].mean()) if (~drop).any() else float("nan")
            metrics["kl_sequence"] = kl_seq
        beta = self.kl_coef
        rewards = token_rewards(scores, mask, kl_tok if cfg.kl_penalty == "reward" else None, beta)  # (N, T)
        if kl_tok is not None and cfg.kl_penalty == "reward":
            metrics["non_score_reward"] = float((-beta * kl_tok).sum(1).mean())
        advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)   # (N, T) each
        metrics["advantage_mean"] = float(masked_mean(advantages, mask))
        metrics["advantage_std"] = float(masked_var(advantages, mask).sqrt())
        metrics["return_mean"] = float(masked_mean(returns, mask))
        metrics["value_mean"] = float(masked_mean(values, mask))
        metrics["explained_variance"] = explained_variance(values, returns, mask)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, sum_floats=self.dist.sum_floats if self.dist.enabled else None)
        # an engine's samples (vLLM): the mismatch metrics, and the IS weights of the policy term
        is_weights, engine_metrics = self.engine_correction(batch, old_logps)
        metrics.update(engine_metrics)
        batch = batch.with_fields(advantages=advantages, old_logps=old_logps, ref_logps=ref_logps,
                                  importance_weights=is_weights)
        batch.extras["values"] = values
        batch.extras["returns"] = returns
        batch.extras["token_rewards"] = rewards
        batch.extras["metrics"] = metrics
        if self.kl_ctl is not None and "kl_sequence" in metrics:
            # the controller acts on the next rollout's rewards (this one is already scored)
            n_kept = int((~drop).sum())
            if self.dist.enabled:
                n_kept = int(self.dist.sum_floats([n_kept])[0])
            self.kl_ctl.update(metrics["kl_sequence"], n_kept)
        return batch

    # ------------------------------------------------------------------ the update
    def value_loss(self, new_values, old_values, returns, mask, denom):
        """Sum over the micro-batch of the clipped squared error / denom (the minibatch token count);
        also returns the number of tokens where the clipped error was the larger."""
        cfg: PPOConfig = self.config
        m = mask.to(torch.float32)
        err = (new_values - returns) ** 2
        if cfg.cliprange_value is not None:
            clipped = old_values + (new_values - old_values).clamp(-cfg.cliprange_value, cfg.cliprange_value)
            err_clipped = (clipped - returns) ** 2
            per_token = torch.maximum(err, err_clipped)
            n_clipped = float(((err_clipped > err).float() * m).sum())
        else:
            per_token, n_clipped = err, 0.0
        return 0.5 * (per_token * m).sum() / denom, n_clipped

    def update(self, batch: Rollout) -> Dict[str, Any]:
        cfg: PPOConfig = self.config
        modules = [self.model, self.critic.module]
        for m in modules:
            m.train()
        N = len(batch)
        # under torchrun each rank holds its share of every minibatch (the gradients are averaged)
        mb, micro = cfg.minibatch_size // self.dist.world_size, cfg.per_device_train_batch_size
        mask = batch.mask
        old_values, returns = batch.extras["values"], batch.extras["returns"]
        loss_in_kl = cfg.kl_penalty == "loss" and batch.ref_logps is not None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sums: Dict[str, float] = {}
        tokens_seen = 0.0
        grad_norms, losses, pg_losses, vf_losses = [], [], [], []

        def add(key, value, weight):
            sums[key] = sums.get(key, 0.0) + float(value) * weight

        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(N, generator=self.rng.generator).to(mask.device)  # the trainer's generator: checkpointed
            for start in range(0, N, mb):
                idx = order[start:start + mb]
                n_micro = math.ceil(len(idx) / micro)
                tokens = float(mask[idx].sum().clamp(min=1))
                if self.dist.enabled:  # the minibatch's tokens on all ranks / W: averaging restores the global mean
                    tokens = max(self.dist.sum_floats([float(mask[idx].sum())])[0], 1.0) / self.dist.world_size
                self.optimizer.zero_grad(set_to_none=True)
                step_pg = step_vf = 0.0
                for ms in range(0, len(idx), micro):
                    rows = idx[ms:ms + micro]
                    feats, values = self.forward(batch, rows)                 # (n, T, H or V), (n, T)
                    out = self.policy_loss_of(
                        self.model, batch, rows, batch.advantages[rows], mask[rows], features=feats,
                        old_logps=batch.old_logps[rows],
                        importance_weights=None if batch.importance_weights is None else batch.importance_weights[rows],
                        ref_logps=batch.ref_logps[rows] if loss_in_kl else None,
                        loss_type=cfg.loss_type, beta=self.kl_coef if loss_in_kl else 0.0,
                        kl_estimator=cfg.kl_estimator, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                        clip_ratio_c=cfg.clip_ratio_c, entropy_coef=cfg.entropy_coef,
                        temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
                        num_items_in_batch=tokens, gradient_accumulation_steps=n_micro,
                        # PPO keeps the DeepSeekMath KL term (the ops default to TRL's ratio-weighted one)
                        use_bias_correction_kl=False)
                    # dapo is normalised by the minibatch's token count already; the per-micro-batch means
                    # (other loss types, the entropy bonus) are divided by n_micro inside the loss
                    pg = out.loss
                    vf, n_vclip = self.value_loss(values, old_values[rows], returns[rows], mask[rows], tokens)
                    (pg + cfg.vf_coef * vf).backward()
                    step_pg += float(pg.detach())
                    step_vf += float(vf.detach())
                    m = mask[rows].to(torch.float32)
                    w = float(m.sum())
                    tokens_seen += w
                    log_ratio = (out.logps - batch.old_logps[rows]) * m
                    add("approx_kl", masked_mean(torch.expm1(log_ratio) - log_ratio, m), w)
                    sums["value_clip_tokens"] = sums.get("value_clip_tokens", 0.0) + n_vclip
                    for key in ("entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
                        add(key, getattr(out, key), w)
                    if loss_in_kl and out.kl is not None:
                        add("kl_loss", out.kl, w)
                dist_utils.average_gradients(params, self.dist)
                if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                    gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                else:
                    gn = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                grad_norms.append(float(gn))
                pg_losses.append(step_pg)
                vf_losses.append(step_vf)
                losses.append(step_pg + cfg.vf_coef * step_vf)
                if self.finite_update(torch.tensor(losses[-1]), gn):  # else skipped: the weights stay finite
                    self.optimizer.step()
                    self.scheduler.step()
                else:
                    self.optimizer.zero_grad(set_to_none=True)
        denom = max(tokens_seen, 1.0)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        metrics: Dict[str, Any] = {"loss": mean(losses), "pg_loss": mean(pg_losses), "value_loss": mean(vf_losses),
                                   "grad_norm": mean(grad_norms)}
        for key in ("approx_kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
            metrics[key] = sums.get(key, 0.0) / denom
        metrics["clip_fraction"] = metrics["clip_ratio_region"]
        metrics["value_clip_fraction"] = sums.get("value_clip_tokens", 0.0) / denom
        if "kl_loss" in sums:
            metrics["kl_loss"] = sums["kl_loss"] / denom
        return metrics
