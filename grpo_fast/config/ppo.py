"""PPOConfig: PPO with a value model (names from the PPO / RLHF papers and TRL's PPOConfig)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import ConfigError, RLConfig
from .critic import CriticConfig
from .loss import check_loss_options

__all__ = ["PPOConfig"]


@dataclass
class PPOConfig(CriticConfig, RLConfig):
    """Configuration of PPOTrainer (names from the PPO / RLHF papers and TRL's PPOConfig)."""

    output_dir: str = "runs/ppo"
    """Where metrics.jsonl, TensorBoard logs, plots, checkpoint-N/ and final/ are written."""
    num_generations: int = 1
    """Completions sampled per prompt (PPO needs no groups; > 1 samples each prompt several times)."""
    num_mini_batches: int = 1
    """Minibatches per rollout; one rollout is num_mini_batches * per_device_train_batch_size * gradient_accumulation_steps completions."""
    ppo_epochs: int = 4
    """Passes over the rollout per step (each pass: num_mini_batches optimiser steps in a fresh random order)."""
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
    share_policy_trunk: bool = False
    """Put the value head on the policy's last hidden state instead of a separate critic (one forward for logits and values)."""

    _COMPLETIONS = "num_mini_batches * per_device_train_batch_size * gradient_accumulation_steps"
    _CHOICES = dict(RLConfig._CHOICES, **{
        "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
        "kl_penalty": ("reward", "loss"),
        "kl_estimator": ("k1", "k2", "k3"),
    })

    def validate(self) -> None:
        super().validate()
        self.validate_critic()
        for name in ("num_generations", "num_mini_batches", "ppo_epochs", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
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
        # the clip ranges, dual clip, loss type and KL estimator: checked by LossOptions, once
        check_loss_options(self, use_bias_correction_kl=False)

    @property
    def minibatch_size(self) -> int:
        """Completions per optimiser step on each process (times the world size in all)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def completions_per_step(self) -> int:
        """Completions sampled per training step on each process: num_mini_batches minibatches."""
        return self.minibatch_size * self.num_mini_batches
