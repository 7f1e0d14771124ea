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

from . import distributed as dist_utils
from .trainer.base import RLTrainer, Rollout, _set_dropout_zero
from .trainer.config import ConfigError, RLConfig
from .value_model import ValueHead, ValueModel, build_value_model, hidden_size_of

__all__ = ["PPOConfig", "PPOTrainer", "AdaptiveKLController", "masked_mean", "masked_whiten",
           "explained_variance"]


# ----------------------------------------------------------------------------- config
@dataclass
class PPOConfig(RLConfig):
    """Configuration of PPOTrainer (names from the PPO / RLHF papers and TRL's PPOConfig)."""

    output_dir: str = "runs/ppo"
    """Where metrics.jsonl, TensorBoard logs, plots, checkpoint-N/ and final/ are written."""
    num_generations: int = 1
    """Completions sampled per prompt (PPO needs no groups; > 1 samples each prompt several times)."""
    num_mini_batches: int = 1
    """Minibatches per rollout; one rollout is num_mini_batches * per_device_train_batch_size * gradient_accumulation_steps completions."""
    ppo_epochs: int = 4
    """Passes over the rollout per step (each pass: num_mini_batches optimiser steps in a fresh random order)."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise the advantages to mean 0, std 1 over the rollout's completion tokens."""
    epsilon: float = 0.2
    """Clip range of the importance ratio: rho >= 1 - epsilon."""
    epsilon_high: Optional[float] = None
    """Upper clip range, rho <= 1 + epsilon_high; None = epsilon."""
    clip_ratio_c: Optional[float] = None
    """Dual clip for negative advantages (Ye et al. 2020): the loss is at most -c * A; None: off (3.0 is usual)."""
    cliprange_value: Optional[float] = 0.2
    """Clip the new values to old value +- this in the value loss (max of clipped and unclipped errors); None: no clip."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0: none)."""
    loss_type: str = "dapo"
    """Policy-loss reduction (as GRPOConfig): dapo/bnpo (mean over the minibatch's tokens), grpo (per sequence), dr_grpo."""
    beta: float = 0.05
    """KL coefficient to the reference model (initial value with adaptive_kl); 0: no reference model is kept."""
    kl_penalty: str = "reward"
    """Where the KL to the reference goes: reward (k1 per token in the reward, as RLHF-PPO) or loss (policy_loss's beta)."""
    kl_estimator: str = "k3"
    """KL estimator with kl_penalty=loss: k1, k2 or k3 (the reward penalty is always k1)."""
    adaptive_kl: bool = False
    """Adapt beta towards target_kl (Ziegler et al. 2019): beta *= 1 + clip(KL / target_kl - 1, +-0.2) * N / kl_horizon."""
    target_kl: float = 6.0
    """Target of the adaptive controller: KL per completion (summed over its tokens), in nats."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in completions."""
    value_model: Optional[str] = None
    """Critic: a local path (a ValueModel.save_pretrained directory or any model's trunk); None: a copy of the policy with a fresh head."""
    share_policy_trunk: bool = False
    """Put the value head on the policy's last hidden state instead of a separate critic (one forward for logits and values)."""

    _CHOICES = dict(RLConfig._CHOICES, **{
        "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
        "kl_penalty": ("reward", "loss"),
        "kl_estimator": ("k1", "k2", "k3"),
    })

    def validate(self) -> None:
        super().validate()
        for name in ("num_generations", "num_mini_batches", "ppo_epochs", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be in [0, 1]")
        if not 0 <= self.epsilon < 1:
            raise ConfigError(f"epsilon={self.epsilon}: must be in [0, 1)")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"epsilon_high={self.epsilon_high}: must be >= 0")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1:
            raise ConfigError(f"clip_ratio_c={self.clip_ratio_c}: must be > 1")
        if self.cliprange_value is not None and self.cliprange_value <= 0:
            raise ConfigError(f"cliprange_value={self.cliprange_value}: must be > 0 or None")
        for name in ("vf_coef", "beta", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.target_kl <= 0:
            raise ConfigError(f"target_kl={self.target_kl}: must be > 0")
        if self.adaptive_kl and self.beta == 0:
            raise ConfigError("adaptive_kl=True needs an initial beta > 0")
        if self.share_policy_trunk and self.value_model is not None:
            raise ConfigError("share_policy_trunk=True puts the head on the policy: value_model must be None")
        if self.rollout_size % self.num_generations:
            raise ConfigError(f"num_mini_batches * per_device_train_batch_size * gradient_accumulation_steps = "
                              f"{self.rollout_size} completions per step is not a multiple of "
                              f"num_generations={self.num_generations}")

    @property
    def minibatch_size(self) -> int:
        """Completions per optimiser step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def rollout_size(self) -> int:
        """Completions sampled per training step."""
        return self.minibatch_size * self.num_mini_batches


# ----------------------------------------------------------------------------- helpers
class AdaptiveKLController:
    """Ziegler et al. (2019), eq. 2: a proportional controller on log(beta).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon), n = completions
    in the step. KL is per completion (summed over tokens).
    """

    def __init__(self, init_value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(init_value), float(target), int(horizon)

    def update(self, current_kl: float, n: int) -> float:
        if math.isfinite(current_kl):
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Variance over the masked entries, with Bessel's correction (0 for fewer than 2 entries)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    return (((x - mean) ** 2) * m).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens (1: perfect, 0: no better than a constant)."""
    var_r = float(masked_var(returns, mask))
    if var_r == 0.0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask)) / var_r


def policy_forward(model, batch: Rollout, rows, *, hidden: bool = False):
    """Completion logits (n, T, V) [and the policy's last hidden states (n, T, H)] in one forward.

    Same positions as RLTrainer.forward_logits: entry t belongs to the state before token t.
    """
    prompt_ids, prompt_mask = batch.prompt_ids[rows], batch.prompt_mask[rows]
    completion_ids, completion_mask = batch.completion_ids[rows], batch.completion_mask[rows]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)                 # (n, P + T)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    T = completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=T + 1, use_cache=False, output_hidden_states=hidden)
    logits = out.logits[:, :-1]                                                 # (n, T, V)
    if not hidden:
        return logits, None
    return logits, out.hidden_states[-1][:, -(T + 1):-1]                       # (n, T, H)


def critic_values(critic: ValueModel, batch: Rollout, rows) -> torch.Tensor:
    """Values (n, T) float32 of a separate critic at the completion positions."""
    prompt_ids, prompt_mask = batch.prompt_ids[rows], batch.prompt_mask[rows]
    completion_ids, completion_mask = batch.completion_ids[rows], batch.completion_mask[rows]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    T = completion_ids.shape[1]
    return critic(input_ids, attention_mask, position_ids, values_to_keep=T + 1)[:, :-1]   # (n, T)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: Optional[torch.Tensor] = None,
                  beta: float = 0.0) -> torch.Tensor:
    """(B, T) rewards: -beta * kl on every completion token, plus the score on the last one.

    scores (B,); mask (B, T) with the completion's tokens first (right padding, as the rollout
    gives); kl (B, T) per-token KL estimate or None.
    """
    m = mask.to(torch.float32)
    rewards = torch.zeros_like(m) if kl is None else -beta * kl.to(torch.float32) * m
    lengths = mask.sum(1).long()
    has = lengths > 0
    rows = torch.nonzero(has).squeeze(1)
    rewards[rows, lengths[rows] - 1] += scores[rows].to(torch.float32)
    return rewards


# ----------------------------------------------------------------------------- trainer
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

    def __init__(self, model, reward_funcs, train_dataset, *, config: Optional[PPOConfig] = None,
                 tokenizer=None, ref_model=None, peft_config=None, value_model=None, callbacks=None):
        self._user_value_model = value_model
        super().__init__(model, reward_funcs, train_dataset, config=config, tokenizer=tokenizer,
                         ref_model=ref_model, peft_config=peft_config, callbacks=callbacks)

    # ------------------------------------------------------------------ hooks
    def setup(self) -> None:
        cfg: PPOConfig = self.config
        self.build_reference_model(cfg.beta > 0)

        self.value_head: Optional[ValueHead] = None
        self.value_model: Optional[ValueModel] = None
        if cfg.share_policy_trunk:
            self.value_head = ValueHead(hidden_size_of(self.model.config)).to(self.device)
        else:
            spec = self._user_value_model if self._user_value_model is not None else cfg.value_model
            self.value_model = build_value_model(spec, self.model).to(self.device)
            if cfg.disable_dropout:
                _set_dropout_zero(self.value_model)
            self.value_model.train()
        self._user_value_model = None
        self.kl_ctl = AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else None
        if self.dist.enabled:
            # DDP: the policy and critic gradients are averaged by hand (one loss over both modules);
            # FSDP2 would shard the policy but not the critic or its head: not supported yet
            if self.dist.mode != "ddp":
                raise ConfigError(f"PPOTrainer under torchrun supports distributed=ddp, not {self.dist.mode}")
            if cfg.minibatch_size % self.dist.world_size:
                raise ConfigError(f"minibatch_size = per_device_train_batch_size * gradient_accumulation_steps = "
                                  f"{cfg.minibatch_size} completions cannot be split evenly over "
                                  f"{self.dist.world_size} processes")

    def critic_parameters(self):
        module = self.value_head if self.value_head is not None else self.value_model
        return [p for p in module.parameters() if p.requires_grad]

    def trainable_parameters(self):
        return super().trainable_parameters() + self.critic_parameters()

    def prompts_per_step(self) -> int:
        return self.config.rollout_size // self.config.num_generations

    def generations_per_prompt(self) -> int:
        return self.config.num_generations

    def updates_per_step(self) -> int:
        return self.config.ppo_epochs * self.config.num_mini_batches

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value if self.kl_ctl is not None else self.config.beta

    def extra_state(self) -> Dict[str, Any]:
        module = self.value_head if self.value_head is not None else self.value_model
        state = {"critic": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}}
        if self.kl_ctl is not None:
            state["kl_coef"] = self.kl_ctl.value
        return state

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        module = self.value_head if self.value_head is not None else self.value_model
        if "critic" not in state:
            raise ValueError("checkpoint has no value model state (was it written by PPOTrainer?)")
        module.load_state_dict(state["critic"])
        if self.kl_ctl is not None and "kl_coef" in state:
            self.kl_ctl.value = float(state["kl_coef"])

    def save_final(self) -> str:
        path = super().save_final()
        if not self.dist.is_main:
            return path
        if self.value_head is not None:
            self.value_head.save(os.path.join(path, "value_head.safetensors"))
        else:
            from .trainer.checkpoint import quiet_progress

            with quiet_progress():
                self.value_model.save_pretrained(os.path.join(path, "value_model"))
        return path

    # ------------------------------------------------------------------ forward passes
    def forward(self, batch: Rollout, rows):
        """-> logits (n, T, V), values (n, T) float32, with the current policy and critic."""
        if self.value_head is not None:
            logits, hidden = policy_forward(self.model, batch, rows, hidden=True)
            return logits, self.value_head(hidden)
        logits = self.forward_logits(self.model, batch, rows)
        return logits, critic_values(self.value_model, batch, rows)

    @torch.no_grad()
    def _rollout_stats(self, batch: Rollout):
        """old logps, values (policy and critic in eval mode) and ref logps (or None), each (N, T)."""
        from grpo_fast import selective_log_softmax

        cfg: PPOConfig = self.config
        modules = [self.model] + ([self.value_model] if self.value_model is not None else [])
        was = [m.training for m in modules]
        for m in modules:
            m.eval()
        mb = cfg.per_device_train_batch_size
        logps, values, ref = [], [], []
        try:
            for start in range(0, len(batch), mb):
                rows = slice(start, start + mb)
                ids = batch.completion_ids[rows]
                logits, v = self.forward(batch, rows)
                logps.append(selective_log_softmax(logits, ids, cfg.temperature))
                values.append(v.float())
                if cfg.beta > 0:
                    with self._ref_context():
                        ref_model = self.ref_model if self.ref_model is not None else self.model
                        ref_logits = self.forward_logits(ref_model, batch, rows)
                    ref.append(selective_log_softmax(ref_logits, ids, cfg.temperature))
        finally:
            for m, w in zip(modules, was):
                m.train(w)
        return torch.cat(logps), torch.cat(values), (torch.cat(ref) if ref else None)

    # ------------------------------------------------------------------ advantages
    def compute_advantages(self, batch: Rollout) -> None:
        from grpo_fast import gae

        cfg: PPOConfig = self.config
        mask = batch.completion_mask
        nan = torch.isnan(batch.rewards).to(mask.device)
        drop = nan if not cfg.mask_truncated_completions else nan | batch.truncated
        if drop.any():  # no reward (or masked truncation): leave the sample out of every loss
            mask = mask * (~drop).to(mask.dtype)[:, None]
            batch.completion_mask = mask
        m = mask.to(torch.float32)
        scores = torch.nan_to_num(batch.rewards, nan=0.0).to(self.device)
        batch.old_logps, values, batch.ref_logps = self._rollout_stats(batch)
        values = values * m
        metrics: Dict[str, float] = {"kl_coef": self.kl_coef, "kl": 0.0}
        kl_tok = None
        if batch.ref_logps is not None:
            kl_tok = (batch.old_logps - batch.ref_logps) * m                     # k1 per token
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
            advantages = self._whiten(advantages, mask)
        batch.advantages = advantages
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

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """masked_whiten over the global batch (all ranks' tokens) under torchrun."""
        if not self.dist.enabled:
            return masked_whiten(x, mask)
        m = mask.to(x.dtype)
        n, total = self.dist.sum_floats([float(m.sum()), float((x * m).sum())])
        mean = total / max(n, 1.0)
        sq = self.dist.sum_floats([float((((x - mean) ** 2) * m).sum())])[0]
        var = sq / max(n - 1.0, 1.0)
        return (x - mean) * (var + 1e-8) ** -0.5 * m

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
        from grpo_fast import policy_loss

        cfg: PPOConfig = self.config
        modules = [self.model] + ([self.value_model] if self.value_model is not None else [])
        for m in modules:
            m.train()
        N = len(batch)
        # under torchrun each rank holds its share of every minibatch (the gradients are averaged)
        mb, micro = cfg.minibatch_size // self.dist.world_size, cfg.per_device_train_batch_size
        mask = batch.completion_mask
        old_values, returns = batch.extras["values"], batch.extras["returns"]
        loss_in_kl = cfg.kl_penalty == "loss" and batch.ref_logps is not None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sums: Dict[str, float] = {}
        tokens_seen = 0.0
        grad_norms, losses, pg_losses, vf_losses = [], [], [], []

        def add(key, value, weight):
            sums[key] = sums.get(key, 0.0) + float(value) * weight

        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(N).to(mask.device)  # global RNG: checkpointed, so resume is exact
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
                    logits, values = self.forward(batch, rows)                # (n, T, V), (n, T)
                    out = policy_loss(
                        logits, batch.completion_ids[rows], batch.advantages[rows], mask[rows],
                        old_logps=batch.old_logps[rows],
                        ref_logps=batch.ref_logps[rows] if loss_in_kl else None,
                        loss_type=cfg.loss_type, beta=self.kl_coef if loss_in_kl else 0.0,
                        kl_estimator=cfg.kl_estimator, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                        clip_ratio_c=cfg.clip_ratio_c, entropy_coef=cfg.entropy_coef,
                        temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
                        num_items_in_batch=tokens)
                    # dapo is normalised by the minibatch's token count already; the others per micro-batch
                    pg = out.loss if cfg.loss_type == "dapo" else out.loss / n_micro
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
                self.optimizer.step()
                self.scheduler.step()
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
