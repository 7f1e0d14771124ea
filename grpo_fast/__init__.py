"""grpo_fast: fast, exact GRPO / PPO / TRPO for Hugging Face causal language models.

Functional API (see DESIGN.md):
    selective_log_softmax, policy_loss, PolicyLossOutput  -- logits -> log-probs / losses
    group_advantages, gae                                 -- C++ core (CPU and CUDA)
Trainers:
    GRPOConfig, GRPOTrainer (and PPO / TRPO)

Importing the package does no heavy work: no device queries, no compilation; the
trainers (and transformers) are imported on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily on first attribute access
_LAZY = {
    "selective_log_softmax": "grpo_fast.ops.functional",
    "policy_loss": "grpo_fast.ops.functional",
    "PolicyLossOutput": "grpo_fast.ops.functional",
    "group_advantages": "grpo_fast.ops.advantages",
    "gae": "grpo_fast.ops.advantages",
    "GRPOConfig": "grpo_fast.trainer",
    "GRPOTrainer": "grpo_fast.trainer",
    "PPOConfig": "grpo_fast.ppo",
    "PPOTrainer": "grpo_fast.ppo",
    "TRPOConfig": "grpo_fast.trpo",
    "TRPOTrainer": "grpo_fast.trpo",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'grpo_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
