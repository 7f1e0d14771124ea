"""The rollout-engine / trainer mismatch: importance weights that correct for sampling with an
engine (vLLM) whose log-probs differ from the trainer's, as TRL 1.16 defines them
(vllm_importance_sampling_correction / _mode / _clip_min / _clip_max).

With δ_t = (log π_trainer,old − log π_engine) · m_t per completion token (0 where the engine gave
no log-prob):
    token_*     ρ_t = exp(δ_t)                       (B, T)
    sequence_*  ρ   = exp(Σ_t δ_t)                   (B, 1), one ratio per completion
    *_truncate  ρ ← clamp(ρ, clip_min, clip_max)
    *_mask      ρ ← 0 where ρ < clip_min or ρ > clip_max
The policy-gradient term of each token is multiplied by its (detached) ρ; the KL term is not.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

__all__ = ["IS_MODES", "rollout_importance_weights", "rollout_logp_mismatch"]


def rollout_importance_weights(trainer_logps: torch.Tensor, engine_logps: torch.Tensor, mask: torch.Tensor,
                               mode: str = "sequence_mask", clip_min: Optional[float] = None,
                               clip_max: Optional[float] = 3.0) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(weights (B, T) or (B, 1) float32, metrics) for trainer / engine log-probs (B, T) and a mask.

    Metrics (over the completion tokens for token modes, over completions for sequence modes):
    is_ratio_min / _mean / _max of the final weights, and is_masked_frac (mask modes: the
    fraction set to 0; truncate modes: the fraction clipped).
    """
    if mode not in IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode={mode!r}: expected one of {', '.join(IS_MODES)}")
    m = mask.to(torch.float32)
    delta = torch.nan_to_num((trainer_logps.float() - engine_logps.float()) * m, nan=0.0)      # (B, T)
    sequence = mode.startswith("sequence")
    ratio = torch.exp(delta.sum(-1, keepdim=True) if sequence else delta)                      # (B, 1) or (B, T)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    outside = (ratio < lo) | (ratio > hi)
    if mode.endswith("truncate"):
        weights = ratio.clamp(min=clip_min, max=clip_max)
    else:
        weights = ratio.masked_fill(outside, 0.0)
    if sequence:
        valid = m.sum(-1, keepdim=True) > 0                                                     # (B, 1)
    else:
        valid = m > 0
    w = weights[valid]
    metrics = {
        "is_ratio_min": float(w.min()) if w.numel() else float("nan"),
        "is_ratio_mean": float(w.mean()) if w.numel() else float("nan"),
        "is_ratio_max": float(w.max()) if w.numel() else float("nan"),
        "is_masked_frac": float(outside[valid].float().mean()) if w.numel() else 0.0,
    }
    return weights, metrics


def rollout_logp_mismatch(trainer_logps: torch.Tensor, engine_logps: torch.Tensor,
                          mask: torch.Tensor) -> Dict[str, float]:
    """rollout_logp_diff_mean / _max: |trainer − engine| over the completion tokens the engine scored."""
    d = (trainer_logps.float() - engine_logps.float()).abs()
    keep = (mask != 0) & ~torch.isnan(d)
    d = d[keep]
    return {"rollout_logp_diff_mean": float(d.mean()) if d.numel() else 0.0,
            "rollout_logp_diff_max": float(d.max()) if d.numel() else 0.0}
