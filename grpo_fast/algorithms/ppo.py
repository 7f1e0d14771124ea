"""PPO with a value model (GAE): RLHF-PPO (Ziegler et al. 2019, Ouyang et al. 2022), token-level MDP.

On a scored rollout (rewards and loss_mask set by the loop):
  prepare   in eval mode, without gradients: old log-probs (policy), values (critic), reference
            log-probs (when beta > 0); token rewards: the sequence reward at the last trained
            token, and with kl_penalty="reward" -beta * (logp - ref_logp) (k1) on every one, beta
            fixed or driven by the adaptive controller (target_kl, kl_horizon); GAE (C++) over the
            trained tokens only, optionally whitened over the batch
  update    ppo_epochs x num_mini_batches optimiser steps; each minibatch is micro-batches of
            per_device_train_batch_size; loss = clipped surrogate (dual clip clip_ratio_c;
            kl_penalty="loss" puts beta * KL there) + vf_coef * 0.5 * max((V - R)^2,
            (clip(V, V_old +- cliprange_value) - R)^2) - entropy bonus

Diagnostics: approx_kl (Schulman's k3 of KL(pi_old || pi) per minibatch, before its step),
clip_fraction, value_loss, value_clip_fraction, explained_variance, return_mean, value_mean,
advantage_mean/std (before whitening), kl_coef, and the rollout KL to the reference: kl (per token)
and kl_sequence (per completion; what the adaptive controller steers). The policy and the critic
share one AdamW; their gradients are averaged over ranks by hand (no DDP wrapper).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import torch

from ..config import PPOConfig, loss_options
from ..model import Critic, attach_reference, forward_hidden
from ..rl import AdaptiveKLController, masked_mean
from ..rollout import Rollout
from ..train.advantages import engine_correction, gae_advantages
from ..train.algorithm import Algorithm, AlgorithmContext, micro_batches, rows_of
from ..train.distributed import average_gradients
from ..train.metrics import MetricAccumulator
from ..train.optim import OptimizerStep, build_optimizer, build_scheduler
from ..train.trainer import Trainer

__all__ = ["PPO", "PPOTrainer"]


class PPO(Algorithm):
    name = "ppo"

    def __init__(self, ctx: AlgorithmContext, ref_model=None, value_model=None):
        super().__init__(ctx)
        cfg: PPOConfig = self.config
        if cfg.beta > 0:
            attach_reference(self.policy, ref_model, dtype=cfg.dtype, device=self.device, fused=cfg.fused_lm_head,
                             dist=self.dist, check_ids=ctx.check_ids)
        self.critic = Critic(self.policy.model, value_model if value_model is not None else cfg.value_model,
                             shared_trunk=cfg.share_policy_trunk, device=self.device,
                             disable_dropout=cfg.disable_dropout, dist=self.dist)
        self.kl_ctl = AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else None
        self.replicate_policy()
        self.optimizer = build_optimizer(self.trainable_parameters() + self.critic.parameters(), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, cfg.max_steps * cfg.ppo_epochs * cfg.num_mini_batches)
        self.optim_step = OptimizerStep(self.optimizer, self.scheduler, max_grad_norm=cfg.max_grad_norm,
                                        dist=self.dist, max_consecutive_nonfinite=cfg.max_consecutive_nonfinite)

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value if self.kl_ctl is not None else self.config.beta

    # ------------------------------------------------------------------ state and files
    def state_dict(self) -> Dict[str, Any]:
        return {"kl_coef": self.kl_ctl.value} if self.kl_ctl is not None else {}

    def load_state_dict(self, state: Dict[str, Any], path: str) -> None:
        self.critic.load(path, legacy_state=state.get("critic"))
        if self.kl_ctl is not None and "kl_coef" in state:
            self.kl_ctl.value = float(state["kl_coef"])

    def save_files(self, directory: str) -> None:
        self.critic.save(directory)

    def export(self, directory: str) -> None:
        self.critic.save_final(directory)

    # ------------------------------------------------------------------ forwards
    def forward(self, batch: Rollout, rows):
        """-> the policy's features (hidden states (n, T, H) through the fused head, else logits
        (n, T, V)) and the values (n, T) float32, with the current policy and critic."""
        model, shared = self.policy.model, self.critic.head is not None
        if self.policy.head_for(model) is not None:
            hidden = self.policy.features(model, batch, rows)                    # (n, T, H)
            return hidden, self.critic.values(batch, rows, hidden if shared else None)
        if shared:
            logits, hidden = forward_hidden(model, batch, rows)
            return logits, self.critic.values(batch, rows, hidden)
        return self.policy.logits(model, batch, rows), self.critic.values(batch, rows)

    @torch.no_grad()
    def _rollout_stats(self, batch: Rollout):
        """old log-probs and values (N, T), policy and critic in eval mode."""
        modules = [self.policy.model, self.critic.module]
        was = [m.training for m in modules]
        for m in modules:
            m.eval()
        logps, values = [], []
        try:
            for rows in micro_batches(len(batch), self.config.per_device_train_batch_size):
                feats, v = self.forward(batch, rows)
                logps.append(self.policy.logps_from(self.policy.model, feats, batch.completion_ids[rows]))
                values.append(v.float())
        finally:
            for m, w in zip(modules, was):
                m.train(w)
        return torch.cat(logps), torch.cat(values)

    # ------------------------------------------------------------------ prepare
    def prepare(self, batch: Rollout, step: int) -> Rollout:
        cfg: PPOConfig = self.config
        mask, dist = batch.loss_mask, self.dist
        m = mask.to(torch.float32)
        kept = mask.sum(1) > 0                                                    # (N,) samples that train
        old_logps, values = self._rollout_stats(batch)
        values = values * m
        ref_logps = self.policy.reference_logps(batch, cfg.per_device_train_batch_size) if cfg.beta > 0 else None
        metrics: Dict[str, float] = {"kl_coef": self.kl_coef, "kl": 0.0}
        kl_tok = None
        if ref_logps is not None:
            kl_tok = (old_logps - ref_logps) * m                                 # k1 per token
            metrics["kl"] = float(masked_mean(kl_tok, mask))
            # the controller must see the global KL, so that beta stays the same on every rank
            kl_sum, n_seq = dist.sum_floats([float(kl_tok.sum(1)[kept].sum()), float(kept.sum())])
            metrics["kl_sequence"] = kl_sum / n_seq if n_seq > 0 else float("nan")
        beta, in_reward = self.kl_coef, cfg.kl_penalty == "reward"
        scores = torch.nan_to_num(batch.rewards, nan=0.0).to(self.device)
        advantages, returns, rewards, gae_metrics = gae_advantages(
            scores, values, mask, gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_advantages, dist=dist,
            kl=kl_tok if in_reward else None, beta=beta)
        metrics.update(gae_metrics)
        if kl_tok is not None and in_reward:
            metrics["non_score_reward"] = float((-beta * kl_tok).sum(1).mean())
        # an engine's samples (vLLM): the mismatch metrics, and the IS weights of the policy term
        is_weights, engine_metrics = engine_correction(batch, old_logps, cfg)
        metrics.update(engine_metrics)
        batch = batch.with_fields(advantages=advantages, old_logps=old_logps, ref_logps=ref_logps,
                                  importance_weights=is_weights)
        batch.extras.update(values=values, returns=returns, token_rewards=rewards, metrics=metrics)
        if self.kl_ctl is not None and "kl_sequence" in metrics:
            # the controller acts on the next rollout's rewards (this one is already scored)
            self.kl_ctl.update(metrics["kl_sequence"], int(dist.sum_floats([float(kept.sum())])[0]))
        return batch

    # ------------------------------------------------------------------ update
    def value_loss(self, new_values, old_values, returns, mask, denom):
        """Sum over the micro-batch of the clipped squared error / denom (the minibatch token count),
        and the number of tokens where the clipped error was the larger."""
        cfg: PPOConfig = self.config
        m = mask.to(torch.float32)
        err = (new_values - returns) ** 2
        if cfg.cliprange_value is None:
            return 0.5 * (err * m).sum() / denom, 0.0
        clipped = old_values + (new_values - old_values).clamp(-cfg.cliprange_value, cfg.cliprange_value)
        err_clipped = (clipped - returns) ** 2
        n_clipped = ((err_clipped > err).float() * m).sum()
        return 0.5 * (torch.maximum(err, err_clipped) * m).sum() / denom, n_clipped

    def update(self, batch: Rollout, step: int) -> Dict[str, Any]:
        cfg: PPOConfig = self.config
        dist, policy, mask = self.dist, self.policy, batch.loss_mask
        for module in (policy.model, self.critic.module):
            module.train()
        # under torchrun each rank holds minibatch_size completions of every minibatch (per device, as TRL)
        N, mb = len(batch), cfg.minibatch_size
        old_values, returns = batch.extras["values"], batch.extras["returns"]
        in_loss = cfg.kl_penalty == "loss" and batch.ref_logps is not None
        # PPO keeps the DeepSeekMath KL term (the ops default to TRL's ratio-weighted one)
        base = loss_options(cfg, beta=self.kl_coef if in_loss else 0.0, use_bias_correction_kl=False)
        acc = MetricAccumulator()
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(N, generator=self.ctx.rng.generator).to(mask.device)  # the trainer's generator
            for start in range(0, N, mb):
                idx = order[start:start + mb]
                chunks = micro_batches(len(idx), cfg.per_device_train_batch_size)
                tokens = dist.token_normaliser(mask[idx])   # this minibatch's token normaliser
                self.optimizer.zero_grad(set_to_none=True)
                pg_sum = vf_sum = 0.0
                for chunk in chunks:
                    rows = idx[chunk]
                    opt = dataclasses.replace(base, num_items_in_batch=tokens, gradient_accumulation_steps=len(chunks),
                                              importance_weights=rows_of(batch.importance_weights, rows))
                    feats, values = self.forward(batch, rows)                     # (n, T, H or V), (n, T)
                    out = policy.loss(policy.model, batch, rows, batch.advantages[rows], mask[rows], opt,
                                      old_logps=batch.old_logps[rows], features=feats,
                                      ref_logps=batch.ref_logps[rows] if in_loss else None)
                    vf, n_vclip = self.value_loss(values, old_values[rows], returns[rows], mask[rows], tokens)
                    self.optim_step.backward(out.loss + cfg.vf_coef * vf)   # through the loss scale (float16)
                    pg_sum, vf_sum = pg_sum + out.loss.detach(), vf_sum + vf.detach()
                    m = mask[rows].to(torch.float32)
                    w = m.sum()
                    log_ratio = (out.logps - batch.old_logps[rows]) * m
                    acc.add("approx_kl", masked_mean(torch.expm1(log_ratio) - log_ratio, m), w)
                    acc.add("value_clip_fraction", n_vclip / w.clamp(min=1), w)
                    for key in ("entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
                        acc.add(key, getattr(out, key), w)
                    if in_loss:
                        acc.add("kl_loss", out.kl, w)
                average_gradients(self.optim_step.params, dist)
                loss = pg_sum + cfg.vf_coef * vf_sum
                acc.add("grad_norm", self.optim_step(loss, step))
                acc.add("loss", loss)
                acc.add("pg_loss", pg_sum)
                acc.add("value_loss", vf_sum)
        metrics = acc.means(dist)
        metrics["clip_fraction"] = metrics["clip_ratio_region"]
        metrics.update(self.optim_step.metrics())
        return metrics


class PPOTrainer(Trainer):
    """Proximal Policy Optimization with a learned value function (GAE) for causal LMs.

    Args:
        model, reward_funcs, train_dataset, tokenizer, ref_model, peft_config, callbacks, engine,
            eval_dataset, tools, environment_factory, rollout_func: as GRPOTrainer (the reference is the
            PEFT base with the adapter disabled).
        config: PPOConfig.
        value_model: the critic: a ValueModel, a transformers model (its trunk gets a fresh head,
            used as is), or a local path / hub id; default (and config.value_model None): a copy of the
            policy with a fresh zero head. Ignored with config.share_policy_trunk.

    The critic is saved in every checkpoint and in OUTPUT_DIR/final/value_model (or
    final/value_head.safetensors with a shared trunk).
    """

    config_class = PPOConfig
    algorithm_class = PPO

    critic = property(lambda self: self.algorithm.critic)
    kl_coef = property(lambda self: self.algorithm.kl_coef)
