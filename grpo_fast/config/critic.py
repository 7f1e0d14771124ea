"""CriticConfig: the value-model and GAE fields PPO and TRPO share (mixed into both configs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .coerce import ConfigError

__all__ = ["CriticConfig"]


@dataclass
class CriticConfig:
    """The value-model and GAE fields PPO and TRPO share (one definition, mixed into both configs)."""

    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise the GAE advantages to mean 0, std 1 over the rollout's completion tokens."""
    value_model: Optional[str] = None
    """Critic: a local path or hub id (a ValueModel.save_pretrained directory or any model's trunk); None: a copy of the policy with a fresh head."""

    def validate_critic(self) -> None:
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be in [0, 1]")
