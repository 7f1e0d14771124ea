"""TRPOTrainer: KL-constrained natural-gradient steps on RLTrainer's rollout / rewards / checkpoints.

Per step:
  rollout     N completions (num_generations per prompt)
  advantages  advantage_estimator="group": group_advantages (as GRPO), one value per completion;
              "gae": a separate critic (grpo_fast.trainer.critic.ValueModel) gives values at
              rollout time, GAE over token rewards (the sequence reward on the last token),
              optional whitening; the critic is then fitted to the returns by regression with its
              own AdamW (vf_learning_rate, vf_iters passes)
  old policy  the full next-token distribution log_softmax(logits / temperature) of every
              completion token, stored at rollout time (eval mode, detached)
  step        grpo_fast.rl.trpo_step over trainable_parameters() (the adapter only
              under peft):  maximise  L(θ) = Σ m·ρ·A / Σ m   subject to
              KL̄(θ) = Σ_t m_t · KL(π_old(·|s_t) || π_θ(·|s_t)) / Σ m  <=  max_kl,
              ρ = π_θ(a_t|s_t) / π_old(a_t|s_t); conjugate gradient on Fisher-vector products
              (double backprop through KL̄), a full step scaled to the KL bound, backtracking
              line search; a rejected step leaves the parameters bit-identical

Memory: the stored old distributions take N · T · V · 4 bytes (N completions, T completion
tokens, V vocabulary), e.g. 64 · 512 · 150k · 4 B = 20 GB for a modern vocabulary: fine for
small models and short completions, not for long ones. The surrogate gradient and each Fisher
product also hold the autograd graph of the whole rollout (micro-batches are summed into one
graph), so the rollout size is bounded by activation memory. Forward passes run in eval mode
(no dropout), so the KL at θ_old is exactly 0 and the Fisher products are deterministic.

Under torchrun (distributed=ddp; fsdp2 is refused): every rank owns whole prompt groups and
holds its share of the rollout. Each rank's surrogate and KL are its local masked sums divided
by (global completion-token count / world size), so the average over ranks is exactly the
one-process Σ m·ρ·A / Σ m and KL̄ over the global rollout; trpo_step(reduce=average over ranks)
averages g, every Fisher-vector product and the line-search scalars, so all ranks compute the
same step and decisions and the parameters stay identical without a broadcast (the policy's
forwards go through the unwrapped model; DDP only broadcasts rank 0's weights at the start).
scale_rewards="batch" uses the all-gathered rewards; gae whitening uses global statistics; the
critic regression keeps the one-process minibatch count, each rank holding
per_device_train_batch_size / world_size completions of every minibatch, its loss normalised by
the minibatch's global token count / world size and its gradients averaged (average_gradients),
so critics stay identical too.

Diagnostics: kl (the measured KL̄ after the step; 0 when it was rejected), step_accepted,
accepted_fraction (over the run so far), line_search_steps, surrogate_gain, expected_gain
(first-order prediction of the full step), step_norm, entropy (of the rollout policy); with
gae also value_loss, explained_variance, return_mean, value_mean.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..ops import gae, group_advantages, selective_log_softmax
from ..rl import explained_variance, masked_mean, masked_var, masked_whiten, token_rewards, trpo_step
from . import distributed as dist_utils
from .base import RLTrainer
from .checkpoint import quiet_progress
from .config import ConfigError, TRPOConfig
from .critic import Critic
from .rollout import Rollout

__all__ = ["TRPOConfig", "TRPOTrainer"]


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class TRPOTrainer(RLTrainer):
    """Trust Region Policy Optimization (Schulman et al. 2015) for causal LMs.

    Args:
        model, reward_funcs, train_dataset, tokenizer, peft_config, callbacks: as GRPOTrainer
            (with peft_config only the adapter moves, and the Fisher products are over it only).
        config: TRPOConfig.
        value_model: the critic with advantage_estimator="gae" (a ValueModel, a transformers model
            whose trunk gets a fresh head, or a local path); default: a copy of the policy.
        ref_model: unused (TRPO's constraint is to the rollout policy); accepted for a uniform API.

    The policy is updated only by the TRPO step (no policy optimiser or scheduler is built). The critic (gae) has its own AdamW; both its weights and its
    optimiser state are in every checkpoint, and it is saved to OUTPUT_DIR/final/value_model.
    """

    config_class = TRPOConfig
    algorithm = "trpo"

    def __init__(self, model, reward_funcs=None, train_dataset=None, *, ref_model=None, value_model=None, **kwargs):
        super().__init__(model, reward_funcs, train_dataset, **kwargs)
        cfg: TRPOConfig = self.config
        if self.dist.enabled and cfg.advantage_estimator == "gae" and cfg.per_device_train_batch_size % self.dist.world_size:
            raise ConfigError(f"per_device_train_batch_size={cfg.per_device_train_batch_size} (the critic's "
                              f"regression minibatch) cannot be split evenly over {self.dist.world_size} processes")
        # the step forwards through self.model and averages g, the Fisher products and the line-search
        # scalars itself: no DDP wrapper (FSDP2 would shard the parameters the flat vectors are built from)
        self.replicate_policy()
        self.critic: Optional[Critic] = None
        self.vf_optimizer = None
        if cfg.advantage_estimator == "gae":
            self.critic = Critic(self.model, value_model if value_model is not None else cfg.value_model,
                                 device=self.device, disable_dropout=cfg.disable_dropout, dist=self.dist)
            self.vf_optimizer = self.build_optimizer(self.critic.parameters(), lr=cfg.vf_learning_rate)
        # the policy moves only by the natural-gradient step: no policy optimiser, no scheduler
        self.steps_accepted = 0
        self.steps_tried = 0

    def extra_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"steps_accepted": self.steps_accepted, "steps_tried": self.steps_tried}
        if self.vf_optimizer is not None:
            state["vf_optimizer"] = self.vf_optimizer.state_dict()
        return state

    def save_extra_files(self, directory: str) -> None:
        if self.critic is not None:
            self.critic.save(directory)

    def load_extra_state(self, state: Dict[str, Any], path: str) -> None:
        self.steps_accepted = int(state.get("steps_accepted", 0))
        self.steps_tried = int(state.get("steps_tried", 0))
        if self.critic is not None:
            self.critic.load(path, legacy_state=state.get("critic"))
            self.vf_optimizer.load_state_dict(state["vf_optimizer"])

    def save_final(self) -> str:
        path = super().save_final()
        if self.critic is not None and self.dist.is_main:
            with quiet_progress():
                self.critic.save_final(path)
        return path

    # ------------------------------------------------------------------ advantages
    def _micro_batches(self, n: int):
        mb = self.config.per_device_train_batch_size
        return [slice(s, s + mb) for s in range(0, n, mb)]

    @torch.no_grad()
    def _old_policy(self, batch: Rollout) -> Rollout:
        """Store the rollout policy's log_softmax over V (N, T, V) and its token logps (N, T)."""
        was = self.model.training
        self.model.eval()
        full, logps = [], []
        for rows in self._micro_batches(len(batch)):
            logits = self.forward_logits(self.model, batch, rows)              # (n, T, V)
            logits = logits.to(_at_least_float32(logits.dtype))
            full.append(torch.log_softmax(logits / self.config.temperature, dim=-1)
                        .clamp(min=torch.finfo(logits.dtype).min))             # -inf -> finite: 0·(-inf) is NaN
            logps.append(selective_log_softmax(logits, batch.completion_ids[rows], self.config.temperature))
        self.model.train(was)
        batch.extras["old_log_softmax"] = torch.cat(full)                       # (N, T, V)
        return batch.with_fields(old_logps=torch.cat(logps))                    # (N, T)

    def compute_advantages(self, batch: Rollout) -> Rollout:
        cfg: TRPOConfig = self.config
        self.warn_if_no_signal(batch)
        # no reward (or masked truncation): out of the surrogate and the KL
        mask = batch.mask_without(batch.dropped(cfg.mask_truncated_completions))
        batch = batch.with_fields(loss_mask=mask)
        batch = self._old_policy(batch)
        metrics: Dict[str, float] = {}
        if cfg.advantage_estimator == "group":
            rewards = batch.rewards
            if self.dist.enabled:  # the global reward vector: scale_rewards="batch" uses the global std
                rewards = self.dist.all_gather(rewards)
            adv = group_advantages(rewards, batch.group_size, scale=cfg.scale_rewards)
            if self.dist.enabled:
                adv = adv[self.dist.rank * len(batch):(self.dist.rank + 1) * len(batch)]
            batch = batch.with_fields(advantages=adv.to(self.device)[:, None] * mask.to(torch.float32))  # (N, T)
        else:
            scores = torch.nan_to_num(batch.rewards, nan=0.0).to(self.device)
            values = self._values(batch) * mask.to(torch.float32)              # (N, T)
            rewards = token_rewards(scores, mask)
            advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            metrics["return_mean"] = float(masked_mean(returns, mask))
            metrics["value_mean"] = float(masked_mean(values, mask))
            metrics["advantage_std"] = float(masked_var(advantages, mask).sqrt())
            metrics["explained_variance"] = explained_variance(values, returns, mask)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask,
                                           sum_floats=self.dist.sum_floats if self.dist.enabled else None)
            batch = batch.with_fields(advantages=advantages)
            batch.extras["returns"] = returns
        batch.extras["metrics"] = metrics
        return batch

    def _token_denominator(self, batch: Rollout):
        """Σ m of the rollout; under torchrun the GLOBAL Σ m / world size (cached; a collective), so
        that the average over ranks of (local sum / this) is the global token mean."""
        mask = batch.mask.to(torch.float32)
        if not self.dist.enabled:
            return mask.sum().clamp(min=1)
        if "global_tokens" not in batch.extras:
            batch.extras["global_tokens"] = self.dist.sum_floats([float(mask.sum())])[0]
        return max(batch.extras["global_tokens"], 1.0) / self.dist.world_size

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Average over ranks (trpo_step's reduce)."""
        return self.dist.all_reduce(t) / self.dist.world_size

    @torch.no_grad()
    def _values(self, batch: Rollout) -> torch.Tensor:
        critic = self.critic.model
        was = critic.training
        critic.eval()
        values = torch.cat([self.critic.values(batch, rows).float() for rows in self._micro_batches(len(batch))])
        critic.train(was)
        return values

    # ------------------------------------------------------------------ surrogate and KL
    def surrogate(self, batch: Rollout) -> torch.Tensor:
        """L(θ) = Σ m·ρ·A / Σ m over the rollout (differentiable when grad is enabled); under
        torchrun this rank's share, Σ_local / (global Σ m / world size)."""
        mask = batch.mask.to(torch.float32)
        total = self._token_denominator(batch)
        out = 0.0
        for rows in self._micro_batches(len(batch)):
            logps = self.token_logps(self.model, batch, rows)                  # (n, T), fused head if any
            ratio = torch.exp(logps - batch.old_logps[rows])                   # (n, T)
            out = out + (ratio * batch.advantages[rows] * mask[rows]).sum()
        return out / total

    def mean_kl(self, batch: Rollout) -> torch.Tensor:
        """KL̄(θ) = Σ m · KL(π_old || π_θ) / Σ m, the KL over the full next-token distribution.

        Plain torch log_softmax (twice differentiable, for the Fisher-vector products). Under
        torchrun this rank's share, normalised as the surrogate.
        """
        mask = batch.mask.to(torch.float32)
        total = self._token_denominator(batch)
        old_all = batch.extras["old_log_softmax"]
        out = 0.0
        for rows in self._micro_batches(len(batch)):
            logits = self.forward_logits(self.model, batch, rows)              # (n, T, V)
            new = torch.log_softmax(logits.to(_at_least_float32(logits.dtype)) / self.config.temperature, dim=-1)
            old = old_all[rows]
            kl = (old.exp() * (old - new)).sum(-1)                              # (n, T)
            out = out + (kl * mask[rows]).sum()
        return out / total

    # ------------------------------------------------------------------ the update
    def update(self, batch: Rollout) -> Dict[str, Any]:
        cfg: TRPOConfig = self.config
        params = self.trainable_parameters()
        was = self.model.training
        self.model.eval()  # deterministic forwards: KL̄(θ_old) = 0 and reproducible Fisher products
        denom = self._token_denominator(batch)  # under torchrun: one collective, before the step
        try:
            res = trpo_step(params, lambda: self.surrogate(batch), lambda: self.mean_kl(batch), cfg.max_kl,
                            cg_iters=cfg.cg_iters, damping=cfg.cg_damping, backtrack_iters=cfg.backtrack_iters,
                            backtrack_ratio=cfg.backtrack_ratio, accept_ratio=cfg.accept_ratio,
                            reduce=self._reduce if self.dist.enabled else None)
        finally:
            self.model.train(was)
        for p in params:
            p.grad = None
        self.steps_tried += 1
        self.steps_accepted += int(res.accepted)
        old = batch.extras["old_log_softmax"]
        m = batch.mask
        entropy = -(old.exp() * old).sum(-1)                                    # (N, T)
        # under torchrun every metric is this rank's share of the global value (the step's are the same
        # on every rank), so the base trainer's plain mean over ranks gives the global values
        ent = float(masked_mean(entropy, m)) if not self.dist.enabled \
            else float((entropy * m.to(entropy.dtype)).sum()) / denom
        metrics: Dict[str, Any] = {
            "kl": res.kl, "step_accepted": float(res.accepted),
            "accepted_fraction": self.steps_accepted / self.steps_tried,
            "line_search_steps": res.line_search_steps, "surrogate_gain": res.surrogate_gain,
            "expected_gain": res.expected_gain, "step_norm": res.step_norm,
            "entropy": ent,
        }
        if self.critic is not None:
            metrics["value_loss"] = self._fit_critic(batch)
        return metrics

    def _fit_critic(self, batch: Rollout) -> float:
        """vf_iters passes of 0.5·(V - R)² regression (masked token mean per minibatch); mean loss.

        Under torchrun each rank holds per_device_train_batch_size / W rows of every minibatch (the
        same number of minibatches as one process), the loss is normalised by the minibatch's global
        token count / W and the gradients are averaged; the loss returned is this rank's share."""
        cfg: TRPOConfig = self.config
        mask = batch.mask
        returns = batch.extras["returns"]
        params = [p for g in self.vf_optimizer.param_groups for p in g["params"]]
        critic = self.critic.model
        critic.train()
        losses = []
        W = self.dist.world_size
        N, mb = len(batch), cfg.per_device_train_batch_size // W
        for _ in range(cfg.vf_iters):
            order = torch.randperm(N, generator=self.rng.generator).to(mask.device)  # the trainer's generator
            for start in range(0, N, mb):
                rows = order[start:start + mb]
                m = mask[rows].to(torch.float32)
                denom = m.sum().clamp(min=1) if not self.dist.enabled \
                    else max(self.dist.sum_floats([float(m.sum())])[0], 1.0) / W
                values = self.critic.values(batch, rows)                       # (n, T)
                loss = 0.5 * (((values - returns[rows]) ** 2) * m).sum() / denom
                self.vf_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                dist_utils.average_gradients(params, self.dist)
                if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.vf_optimizer.step()
                losses.append(float(loss.detach()))
        return sum(losses) / len(losses)
