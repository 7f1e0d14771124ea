"""Step metrics: a small accumulator kept on the device and read once per step, the reward and
length statistics of a rollout, and the no-learning-signal warning."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..rl import informative_groups

__all__ = ["MetricAccumulator", "NoSignalWarning", "rollout_metrics", "tool_metrics"]

Number = Union[float, torch.Tensor]


class MetricAccumulator:
    """Weighted means of named metrics. `add` keeps (value, weight) pairs as they come (tensors stay
    on their device, no host sync); `means` reads everything back in one transfer and, under
    torchrun, sums over ranks in one collective, so each mean is over every rank's entries."""

    def __init__(self):
        self._items: Dict[str, List[Tuple[Number, Number]]] = {}

    def add(self, name: str, value: Optional[Number], weight: Number = 1.0) -> None:
        """Add one entry; None values are ignored (a metric a loss type does not have)."""
        if value is not None:
            self._items.setdefault(name, []).append((value, weight))

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def means(self, dist=None) -> Dict[str, float]:
        """name -> sum(value * weight) / sum(weight) over every entry (and rank)."""
        names = sorted(self._items)
        if not names:
            return {}
        dev = next((v.device for items in self._items.values() for v, _ in items if isinstance(v, torch.Tensor)),
                   torch.device("cpu"))
        f64 = lambda x: torch.as_tensor(x, dtype=torch.float64, device=dev).detach().reshape(())  # noqa: E731
        sums = []
        for name in names:
            v = torch.stack([f64(value) for value, _ in self._items[name]])
            w = torch.stack([f64(weight) for _, weight in self._items[name]])
            sums.append(torch.stack([(v * w).sum(), w.sum()]))
        totals = torch.stack(sums).reshape(-1).tolist()                          # one read
        if dist is not None and dist.enabled:
            totals = dist.sum_floats(totals)                                    # one collective
        return {name: totals[2 * i] / totals[2 * i + 1] if totals[2 * i + 1] else math.nan
                for i, name in enumerate(names)}


def rollout_metrics(batch, names: Sequence[str], dist=None) -> Dict[str, float]:
    """Reward / length statistics of the step's global batch (the same numbers on every rank)."""
    lengths = batch.sampled_mask.sum(1).float()    # (N,) the policy's tokens (TRL: tool tokens not counted)
    rewards, per_func, truncated = batch.rewards, batch.rewards_per_func, batch.truncated
    if dist is not None and dist.enabled:  # 2 + F floats per completion: gather them and compute once
        local = torch.cat([rewards.float()[:, None], per_func.float(), lengths.cpu()[:, None],
                           truncated.float().cpu()[:, None]], dim=1)             # (N, F + 3)
        full = dist.all_gather(local)                                            # (W * N, F + 3)
        rewards, per_func = full[:, 0], full[:, 1:-2]
        lengths, truncated = full[:, -2], full[:, -1] > 0.5
    out = reward_stats(rewards, per_func, lengths, truncated, batch.group_size, names)
    if batch.sample_stats is not None:
        out.update(tool_metrics(batch.sample_stats, dist))
    return out


def tool_metrics(stats: Dict[str, List[float]], dist=None, prefix: str = "") -> Dict[str, float]:
    """A multi-turn rollout's tool metrics over every rank's samples: TRL's tools/call_frequency
    (calls per sample) and tools/failure_frequency (failed calls / calls), and ours: tools/turns
    (assistant turns per sample) and tools/time (seconds spent in tool calls, summed over calls:
    concurrent calls overlap, so the wall time is less)."""
    keys = ("tool_calls", "tool_failures", "turns", "tool_seconds")
    totals = [float(sum(stats[k])) for k in keys] + [float(len(stats["turns"]))]
    if dist is not None and dist.enabled:
        totals = dist.sum_floats(totals)
    calls, failures, turns, seconds, n = totals
    return {f"{prefix}tools/call_frequency": calls / max(n, 1.0),
            f"{prefix}tools/failure_frequency": failures / calls if calls else 0.0,
            f"{prefix}tools/turns": turns / max(n, 1.0), f"{prefix}tools/time": seconds}


def reward_stats(rewards, rewards_per_func, lengths, truncated, G: int, names: Sequence[str]) -> Dict[str, float]:
    m: Dict[str, float] = {}
    r = rewards.double()
    valid = ~torch.isnan(r)
    m["reward"] = float(r[valid].mean()) if valid.any() else float("nan")
    # per-group std over the rewards that exist (Bessel-corrected; groups of < 2 count as 0);
    # with G = 1 (PPO's default) there are no groups: the std of the whole batch
    if G == 1:
        G = r.numel()
    g, ok = torch.where(valid, r, 0.0).view(-1, G), valid.view(-1, G).double()
    n = ok.sum(1)
    mean = g.sum(1) / n.clamp(min=1)
    var = (((g - mean[:, None]) * ok) ** 2).sum(1) / (n - 1).clamp(min=1)
    std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
    m["reward_std"] = float(std.mean())
    m["frac_reward_zero_std"] = float((~informative_groups(r, G)).double().mean())
    for j, name in enumerate(names):
        col = rewards_per_func[:, j]
        ok = col[~torch.isnan(col)]
        m[f"rewards/{name}/mean"] = float(ok.mean()) if ok.numel() else float("nan")
        m[f"rewards/{name}/std"] = float(ok.std()) if ok.numel() > 1 else 0.0
    m["completion_length"] = float(lengths.mean())
    m["completion_length_min"] = float(lengths.min())
    m["completion_length_max"] = float(lengths.max())
    m["clipped_ratio"] = float(truncated.float().mean())
    return m


class NoSignalWarning:
    """One warning (at most every `every` steps) when a step's rewards cannot teach anything: every
    reward missing (None/NaN), or every group without a learning signal (G > 1)."""

    def __init__(self, dist, every: int = 50):
        self.dist, self.every = dist, every
        self.last: Optional[int] = None

    def check(self, batch, step: int) -> None:
        r = batch.rewards.double()
        none = not bool((~torch.isnan(r)).any())
        flat = not none and batch.group_size > 1 and not bool(informative_groups(r, batch.group_size).any())
        if self.dist.any(not (none or flat)):   # some rank has a learning signal
            return
        if self.last is not None and step - self.last < self.every:
            return
        self.last = step
        if self.dist.is_main:
            why = ("every reward is None/NaN (no reward function scored any completion)" if none else
                   "every group's rewards are equal (zero std), so every advantage is 0")
            warnings.warn(f"step {step}: no learning signal: {why}; further such steps warn at most every "
                          f"{self.every} steps", RuntimeWarning, stacklevel=3)
