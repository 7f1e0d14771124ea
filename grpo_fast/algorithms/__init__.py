"""The algorithms, one file each; every file reads top to bottom and imports no sibling.

    grpo.py   GRPO (DeepSeekMath, with TRL's options) and GRPOTrainer
    ppo.py    PPO with a value model (GAE) and PPOTrainer
    trpo.py   TRPO's natural-gradient step and TRPOTrainer

Each pairs an Algorithm (grpo_fast.train.algorithm: prepare a scored rollout, update) with a
Trainer subclass that names its config and algorithm; the loop itself is grpo_fast.train.Trainer.
"""
from .grpo import GRPO, GRPOTrainer
from .ppo import PPO, PPOTrainer
from .trpo import TRPO, TRPOTrainer

__all__ = ["GRPO", "GRPOTrainer", "PPO", "PPOTrainer", "TRPO", "TRPOTrainer"]
