"""Group advantage estimators, in torch, by name; the C++ core is the fast path of the built-in ones.

An estimator is one function from a group's rewards to its centred rewards:

    @register_estimator("my_baseline")
    def my_baseline(r: Tensor, valid: Tensor) -> Tensor:
        # r (groups, G) float64 with 0 where valid is False; valid (groups, G) bool
        return r - baseline                      # (groups, G); only the valid entries are read

`group_advantages(rewards, G, estimator=..., scale=...)` then applies what every estimator shares:
NaN rewards (no reward) are left out of every statistic and get 0; the centred rewards are divided
by the std of the group, of the batch, or nothing (`scale`); groups without a learning signal
(fewer than two rewards, or all equal) get 0, never NaN. For "grpo" and "rloo" it calls
grpo_fast.ops.group_advantages (C++, CPU and CUDA, one pass), which computes the same numbers
(tests/test_advantages.py compares the two).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..ops.advantages import group_advantages as _fused_group_advantages

__all__ = ["ESTIMATORS", "SCALES", "group_advantages", "informative_groups", "register_estimator"]

SCALES = ("group", "batch", "none")


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    default_scale: str = "group"
    fused: bool = False           # the C++ core implements it (grpo_fast.ops.group_advantages)


ESTIMATORS: Dict[str, Estimator] = {}


def register_estimator(name: str, fn=None, *, default_scale: str = "group"):
    """Register `fn(r, valid) -> centred` under `name` (usable as a decorator). The name becomes a
    value of GRPOConfig.advantage_estimator (and TRPO's group estimator)."""
    if default_scale not in SCALES:
        raise ValueError(f"default_scale={default_scale!r}: expected one of {', '.join(SCALES)}")

    def add(f):
        if name in ESTIMATORS and ESTIMATORS[name].fused:
            raise ValueError(f"advantage estimator {name!r} is built in")
        ESTIMATORS[name] = Estimator(f, default_scale)
        return f

    return add if fn is None else add(fn)


def _group_mean(r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return r.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)


def _grpo(r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """DeepSeekMath: the baseline is the group mean."""
    return r - _group_mean(r, valid)


def _rloo(r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: the baseline is the mean of the other members."""
    n = valid.sum(1, keepdim=True)
    others = (r.sum(1, keepdim=True) - r) / (n - 1).clamp(min=1)
    return r - others


ESTIMATORS["grpo"] = Estimator(_grpo, "group", fused=True)
ESTIMATORS["rloo"] = Estimator(_rloo, "none", fused=True)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards, NaN = none -> (N // G,) bool: the groups with a learning signal, i.e. at least
    two rewards that are not all equal. The one definition the trainers use (dynamic sampling,
    the no-signal warning, frac_reward_zero_std)."""
    r = rewards.detach().double().view(-1, group_size)
    valid = ~torch.isnan(r)
    hi = torch.where(valid, r, -math.inf).amax(1)
    lo = torch.where(valid, r, math.inf).amin(1)
    return (valid.sum(1) >= 2) & (hi > lo)


def _std(x: torch.Tensor, valid: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """Bessel-corrected std over the valid entries (0 with fewer than two)."""
    kw = {} if dim is None else {"dim": dim, "keepdim": True}
    n = valid.sum(**kw).double()
    mean = torch.where(valid, x, 0.0).sum(**kw) / n.clamp(min=1)
    var = (torch.where(valid, x - mean, 0.0) ** 2).sum(**kw) / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.sqrt(), torch.zeros_like(var))


def group_advantages(rewards: torch.Tensor, group_size: int, *, estimator: str = "grpo",
                     scale: Optional[str] = None, eps: float = 1e-4, use_core: bool = True) -> torch.Tensor:
    """(N,) rewards (NaN = no reward) -> (N,) float32 advantages, groups of `group_size`
    consecutive samples. scale: "group" | "batch" | "none"; None: the estimator's default.
    use_core=False computes a built-in estimator in torch too (the tests' oracle for the C++ core)."""
    spec = ESTIMATORS.get(estimator)
    if spec is None:
        raise ValueError(f"advantage estimator {estimator!r}: expected one of {', '.join(ESTIMATORS)} "
                         "(grpo_fast.rl.register_estimator adds one)")
    scale = spec.default_scale if scale is None else scale
    if spec.fused and use_core:
        return _fused_group_advantages(rewards, group_size, estimator=estimator, scale=scale, eps=eps)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(map(repr, SCALES))}, got {scale!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size={group_size}, got "
                         f"shape {tuple(rewards.shape)}")
    r = rewards.detach().double()
    if bool(torch.isinf(r).any()):
        i = int(torch.isinf(r).nonzero()[0, 0])
        raise ValueError(f"rewards[{i}] = {float(r[i])}: rewards must be finite (NaN marks a missing reward)")
    valid = ~torch.isnan(r)
    x, v = torch.where(valid, r, 0.0).view(-1, group_size), valid.view(-1, group_size)
    centred = spec.fn(x, v).to(torch.float64)                                     # (groups, G)
    if scale == "group":
        centred = centred / (_std(x, v, dim=1) + eps)
    elif scale == "batch":
        centred = centred / (_std(r, valid, dim=None) + eps)
    keep = v & informative_groups(rewards, group_size)[:, None]
    return torch.where(keep, centred, 0.0).reshape(-1).to(torch.float32)
