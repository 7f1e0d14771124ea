"""The options of `policy_loss`, validated once, travelling together as one dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_LEVELS = ("token", "sequence")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _check_number(name: str, value, *, low=None, low_open=False, allow_none=False) -> None:
    if value is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a number, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}={value!r}: expected {'>' if low_open else '>='} {low}")


@dataclass(frozen=True)
class LossOptions:
    """Everything about the loss that is not a tensor. Field meanings follow TRL."""

    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo: how per-token losses are weighted
    beta: float = 0.0  # KL coefficient (needs ref_logps when != 0)
    kl_estimator: str = "k3"  # k1 | k2 | k3 estimator of KL(pi || ref)
    epsilon_low: float = 0.2  # lower clip: rho >= 1 - epsilon_low
    epsilon_high: Optional[float] = None  # upper clip: rho <= 1 + epsilon_high (defaults to epsilon_low)
    delta: Optional[float] = None  # two-sided clipping: rho <= delta in the unclipped branch
    clip_ratio_c: Optional[float] = None  # dual clip for A < 0 (PPO): loss <= -c * A
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * H
    temperature: float = 1.0  # logits are divided by this before the softmax
    max_completion_length: Optional[int] = None  # dr_grpo's constant normaliser
    num_items_in_batch: Optional[float] = None  # dapo's normaliser (sum of the mask when None)

    def __post_init__(self):
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        _check_number("beta", self.beta)
        _check_number("epsilon_low", self.epsilon_low, low=0.0)
        if self.epsilon_low >= 1.0:
            raise ValueError(f"epsilon_low={self.epsilon_low!r}: expected a value in [0, 1)")
        _check_number("epsilon_high", self.epsilon_high, low=0.0, allow_none=True)
        _check_number("delta", self.delta, low=1.0, low_open=True, allow_none=True)
        _check_number("clip_ratio_c", self.clip_ratio_c, low=1.0, low_open=True, allow_none=True)
        _check_number("entropy_coef", self.entropy_coef)
        _check_number("temperature", self.temperature, low=0.0, low_open=True)
        if self.loss_type == "dr_grpo":
            if self.max_completion_length is None:
                raise ValueError("loss_type='dr_grpo' needs max_completion_length (the constant normaliser)")
        if self.max_completion_length is not None:
            if isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int):
                raise TypeError(
                    f"max_completion_length must be an int, got {type(self.max_completion_length).__name__}"
                )
            if self.max_completion_length <= 0:
                raise ValueError(f"max_completion_length={self.max_completion_length}: expected > 0")
        n = self.num_items_in_batch
        if n is not None:
            if hasattr(n, "numel"):  # a tensor (e.g. an all-reduced token count): checked without a sync
                if n.numel() != 1:
                    raise ValueError(f"num_items_in_batch: expected a scalar tensor, got shape {tuple(n.shape)}")
            else:
                _check_number("num_items_in_batch", n, low=0.0, low_open=True)

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high
