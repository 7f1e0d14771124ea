"""Trainers: one base (rollout, rewards, logging, checkpoints) and one update rule per algorithm.

    RLTrainer   (base.py)   -- the loop and everything around it; subclasses fill in the hooks
    GRPOTrainer (grpo.py)   -- group advantages + clipped policy loss
"""
from .config import ConfigError, GRPOConfig, RLConfig
from .base import RLTrainer, RewardFunctionError
from .grpo import GRPOTrainer

__all__ = ["ConfigError", "GRPOConfig", "GRPOTrainer", "RLConfig", "RLTrainer", "RewardFunctionError"]
