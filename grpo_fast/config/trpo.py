"""TRPOConfig: TRPO's natural-gradient step (names from Schulman et al. 2015)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..rl.advantages import SCALES
from .base import ConfigError, RLConfig
from .critic import CriticConfig

__all__ = ["TRPOConfig"]


@dataclass
class TRPOConfig(CriticConfig, RLConfig):
    """Configuration of TRPOTrainer (names from Schulman et al. 2015)."""

    output_dir: str = "runs/trpo"
    """Where metrics.jsonl, TensorBoard logs, plots, checkpoint-N/ and final/ are written."""
    learning_rate: Optional[float] = None
    """Not used by TRPO, refused when set: the policy moves by the natural-gradient step (max_kl); the critic's AdamW uses vf_learning_rate."""
    lr_scheduler_type: Optional[str] = None
    """Not used by TRPO, refused when set: there is no learning-rate schedule (the step size is max_kl's; vf_learning_rate is constant)."""
    num_generations: int = 8
    """Completions sampled per prompt (the group of the group baseline; may be 1 with advantage_estimator=gae)."""
    advantage_estimator: str = "group"
    """Advantages: group (group_advantages over each prompt's completions, as GRPO) or gae (a value model and GAE, as PPO)."""
    scale_rewards: str = "group"
    """With advantage_estimator=group: divide by the std of the group, of the batch, or none."""
    max_kl: float = 0.01
    """delta: the bound on the mean per-token KL(pi_old || pi_theta) of each step."""
    cg_iters: int = 10
    """Conjugate-gradient iterations for the natural-gradient direction."""
    cg_damping: float = 0.1
    """Damping added to the Fisher matrix (F + damping I) in the conjugate gradient."""
    backtrack_iters: int = 10
    """Line-search steps before the update is rejected."""
    backtrack_ratio: float = 0.5
    """Step shrink factor of each line-search step."""
    accept_ratio: float = 0.0
    """Accept a line-search step only if its surrogate gain exceeds accept_ratio times the first-order prediction."""
    vf_learning_rate: float = 1e-3
    """AdamW learning rate of the critic (its own optimiser; the policy moves only by the TRPO step)."""
    vf_iters: int = 4
    """Passes of critic regression over each rollout (minibatches of per_device_train_batch_size)."""

    # RLConfig fields TRPO does not use (refused when set; the CLI's demo leaves them out)
    UNUSED_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio")

    _CHOICES = dict(RLConfig._CHOICES, **{
        "lr_scheduler_type": (None,) + RLConfig._CHOICES["lr_scheduler_type"],
        "advantage_estimator": ("group", "gae"),
        "scale_rewards": SCALES,
    })

    def validate(self) -> None:
        super().validate()
        self.validate_critic()
        if self.max_staleness > 0:
            raise ConfigError(f"max_staleness={self.max_staleness}: TRPO's surrogate and KL constraint take the "
                              "rollout as sampled by the current policy (no correction for older ones); use 0")
        # the learning-rate fields have no meaning here: refused by name rather than ignored
        why = {"learning_rate": "the policy moves by the natural-gradient step bounded by max_kl; the critic's AdamW "
                                "uses vf_learning_rate",
               "lr_scheduler_type": "TRPO has no learning-rate schedule (max_kl bounds each step; vf_learning_rate "
                                    "is constant)",
               "warmup_steps": "TRPO has no learning-rate schedule", "warmup_ratio": "TRPO has no learning-rate schedule"}
        for name, reason in why.items():
            if getattr(self, name) not in (None, 0, 0.0):
                raise ConfigError(f"{name}={getattr(self, name)!r}: not used by TRPO ({reason})")
        if self.num_generations < 1:
            raise ConfigError(f"num_generations={self.num_generations}: must be >= 1")
        if self.advantage_estimator == "group" and self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: advantage_estimator=group needs >= 2 "
                              "(a group of one has no baseline); use advantage_estimator=gae")
        if not self.max_kl > 0:
            raise ConfigError(f"max_kl={self.max_kl}: must be > 0")
        for name in ("cg_iters", "backtrack_iters", "vf_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.cg_damping < 0:
            raise ConfigError(f"cg_damping={self.cg_damping}: must be >= 0")
        if not 0 < self.backtrack_ratio < 1:
            raise ConfigError(f"backtrack_ratio={self.backtrack_ratio}: must be in (0, 1)")
        if self.accept_ratio < 0:
            raise ConfigError(f"accept_ratio={self.accept_ratio}: must be >= 0")
        if not self.vf_learning_rate > 0:
            raise ConfigError(f"vf_learning_rate={self.vf_learning_rate}: must be > 0")
