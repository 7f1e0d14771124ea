"""What the algorithms derive from a scored rollout, written once: group advantages over the
ranks' global batch, GAE with its whitening and metrics, and the rollout-engine correction."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..ops import gae
from ..rl import (explained_variance, group_advantages, masked_mean, masked_var, masked_whiten,
                  rollout_importance_weights, rollout_logp_mismatch, token_rewards)

__all__ = ["engine_correction", "gae_advantages", "global_group_advantages"]


def global_group_advantages(rewards: torch.Tensor, group_size: int, *, estimator: str, scale: str, dist,
                            device) -> torch.Tensor:
    """(N,) advantages of this rank's samples, computed on every rank's rewards (N floats per
    rank), so scale="batch" uses the global batch's std."""
    everyone = dist.all_gather(rewards) if dist.enabled else rewards            # (W * N,)
    adv = group_advantages(everyone, group_size, estimator=estimator, scale=scale)
    if dist.enabled:
        N = rewards.shape[0]
        adv = adv[dist.rank * N:(dist.rank + 1) * N]
    return adv.to(device)


def gae_advantages(scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float,
                   whiten: bool, dist, kl: Optional[torch.Tensor] = None, beta: float = 0.0):
    """GAE over the trained tokens: token rewards (the sequence score at the last trained token,
    -beta * kl on every one), then grpo_fast.gae, then optional whitening with the global
    statistics. -> (advantages, returns, token rewards, metrics), each tensor (N, T)."""
    rewards = token_rewards(scores, mask, kl, beta)                            # (N, T)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)     # (N, T) each
    metrics: Dict[str, float] = {
        "advantage_mean": float(masked_mean(advantages, mask)),
        "advantage_std": float(masked_var(advantages, mask).sqrt()),
        "return_mean": float(masked_mean(returns, mask)),
        "value_mean": float(masked_mean(values, mask)),
        "explained_variance": explained_variance(values, returns, mask),
    }
    if whiten:
        advantages = masked_whiten(advantages, mask, sum_floats=dist.sum_floats if dist.enabled else None)
    return advantages, returns, rewards, metrics


def engine_correction(batch, trainer_logps: torch.Tensor, config) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
    """With an engine that returns its log-probs (vLLM): the mismatch metrics every step, and with
    vllm_importance_sampling_correction the IS weights of the samples (TRL's definition,
    grpo_fast.rl.rollout_importance_weights), over the trained sampled tokens only. -> (weights or
    None, metrics)."""
    if batch.sampling_logps is None:
        return None, {}
    mask = batch.loss_mask
    metrics = rollout_logp_mismatch(trainer_logps, batch.sampling_logps, mask)
    if not config.vllm_importance_sampling_correction:
        return None, metrics
    weights, more = rollout_importance_weights(trainer_logps, batch.sampling_logps, mask,
                                               config.vllm_importance_sampling_mode,
                                               config.vllm_importance_sampling_clip_min,
                                               config.vllm_importance_sampling_clip_max)
    metrics.update(more)
    return weights, metrics
