"""Masked statistics over (B, T) token tensors, token-level rewards and the adaptive KL
controller: the pieces of PPO-style advantage estimation that PPO and TRPO share.

`sum_floats`, where a function takes it, is a callable that sums a list of Python floats
over the data-parallel ranks (the trainer's DistContext.sum_floats); None means one process.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

SumFloats = Optional[Callable[[List[float]], List[float]]]


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


def masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_var(x, mask).sqrt()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, *,
                  sum_floats: SumFloats = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0.

    With `sum_floats` the mean and variance are those of every rank's masked entries (two
    collectives), so each rank whitens with the global statistics.
    """
    if sum_floats is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
        return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)
    m = mask.to(x.dtype)
    n, total = sum_floats([float(m.sum()), float((x * m).sum())])
    mean = total / max(n, 1.0)
    sq = sum_floats([float((((x - mean) ** 2) * m).sum())])[0]
    var = sq / max(n - 1.0, 1.0)
    return (x - mean) * (var + eps) ** -0.5 * m


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens (1: perfect, 0: no better than a constant)."""
    var_r = float(masked_var(returns, mask))
    if var_r == 0.0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask)) / var_r


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: Optional[torch.Tensor] = None,
                  beta: float = 0.0) -> torch.Tensor:
    """(B, T) rewards: -beta * kl on every masked token, plus the score on the last masked one.

    scores (B,); mask (B, T), any layout: the score sits at the last position where mask is
    nonzero (a sample's last trained token), whatever precedes it; kl (B, T) per-token KL estimate
    or None.
    """
    m = mask.to(torch.float32)
    rewards = torch.zeros_like(m) if kl is None else -beta * kl.to(torch.float32) * m
    col = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(mask != 0, col, -1).amax(1)                      # (B,) -1: no masked token
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += scores[rows].to(torch.float32)
    return rewards
