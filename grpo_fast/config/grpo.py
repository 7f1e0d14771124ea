"""GRPOConfig: the GRPO update's fields (TRL's GRPOConfig names and meanings)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..ops.options import LOSS_TYPES
from ..rl.advantages import ESTIMATORS, SCALES
from .base import ConfigError, RLConfig
from .loss import check_loss_options, with_loss_options

__all__ = ["GRPOConfig"]


@dataclass
@with_loss_options
class GRPOConfig(RLConfig):
    """Configuration of GRPOTrainer (TRL's GRPOConfig names and meanings)."""

    output_dir: str = "runs/grpo"
    """Where metrics.jsonl, TensorBoard logs, plots, checkpoint-N/ and final/ are written."""
    num_generations: int = 8
    """G: completions sampled per prompt (the group whose rewards are compared)."""
    num_iterations: int = 1
    """Optimiser updates per rollout (mu in the GRPO paper); > 1 keeps the rollout's log-probs as old_logps."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference model (0: no reference model is kept)."""
    kl_estimator: str = "k3"
    """KL estimator of the penalty: k1, k2 or k3 (Schulman's; TRL uses k3)."""
    epsilon: float = 0.2
    """Lower clip range of the importance ratio: rho >= 1 - epsilon."""
    epsilon_high: Optional[float] = None
    """Upper clip range, rho <= 1 + epsilon_high (DAPO's clip-higher); None = epsilon."""
    delta: Optional[float] = None
    """Two-sided clipping: cap the unclipped ratio at delta (> 1 + epsilon); None: off."""
    loss_type: str = "dapo"
    """Loss reduction: grpo (per sequence), bnpo (per batch token), dr_grpo (/ B*max_completion_length), dapo (per token over the accumulated batch)."""
    scale_rewards: str = "group"
    """Advantage scaling: group (std of the group), batch (std of the batch) or none (Dr. GRPO); true/false = group/none."""
    advantage_estimator: str = "grpo"
    """Baseline: grpo (group mean), rloo (mean of the other group members), or one added with grpo_fast.rl.register_estimator."""
    importance_sampling_level: str = "token"
    """Importance ratios per token (GRPO) or per sequence (GSPO)."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef * mean token entropy over the loss mask (TRL); with use_adaptive_entropy, the starting value."""
    sapo_temperature_pos: float = 1.0
    """loss_type=sapo: temperature of the soft gate for tokens with a positive advantage (> 0)."""
    sapo_temperature_neg: float = 1.05
    """loss_type=sapo: temperature of the soft gate for tokens with a zero or negative advantage (> 0)."""
    top_entropy_quantile: float = 1.0
    """Policy term on the tokens whose entropy is in the top q of the batch only (the 80/20 paper), q in [0, 1]; 1.0 = all."""
    use_bias_correction_kl: bool = True
    """Multiply the per-token KL term by the importance ratio (DeepSeek-V3.2; TRL's default)."""
    off_policy_mask_threshold: Optional[float] = None
    """Drop sequences with A < 0 whose mean log(pi_sampling / pi) exceeds this (DeepSeek-V3.2); None: off."""
    use_adaptive_entropy: bool = False
    """Adapt entropy_coef each step towards entropy_target (Skywork-OR1, TRL's rule; docs/losses.md)."""
    entropy_target: float = 0.2
    """use_adaptive_entropy: target mean token entropy, in nats."""
    entropy_coef_delta: float = 0.005
    """use_adaptive_entropy: step by which the coefficient moves each optimiser step."""
    entropy_coef_min: float = 0.0
    """use_adaptive_entropy: lower bound of the coefficient."""
    entropy_coef_max: float = 1.0
    """use_adaptive_entropy: upper bound of the coefficient."""

    _CHOICES = dict(RLConfig._CHOICES, **{
        "kl_estimator": ("k1", "k2", "k3"),
        "loss_type": LOSS_TYPES,
        "scale_rewards": SCALES,
        "importance_sampling_level": ("token", "sequence"),
    })

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):  # TRL's older boolean form
            self.scale_rewards = "group" if self.scale_rewards else "none"
        elif isinstance(self.scale_rewards, str) and self.scale_rewards.lower() in ("true", "false"):
            self.scale_rewards = "group" if self.scale_rewards.lower() == "true" else "none"
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.advantage_estimator not in ESTIMATORS:
            raise ConfigError(f"advantage_estimator={self.advantage_estimator!r}: expected one of "
                              f"{', '.join(map(repr, ESTIMATORS))}")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: must be >= 2 (a group needs two samples)")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations={self.num_iterations}: must be >= 1")
        if self.beta < 0:
            raise ConfigError(f"beta={self.beta}: must be >= 0")
        if self.delta is not None and self.delta <= 1 + self.epsilon:
            raise ConfigError(f"delta={self.delta}: must be > 1 + epsilon = {1 + self.epsilon}")
        for name in ("entropy_coef", "entropy_coef_delta", "entropy_coef_min"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.entropy_coef_max < self.entropy_coef_min:
            raise ConfigError(f"entropy_coef_max={self.entropy_coef_max!r}: must be >= entropy_coef_min="
                              f"{self.entropy_coef_min!r}")
        check_loss_options(self)  # every loss option (cispo's cap, sapo's temperatures, ...), checked once
