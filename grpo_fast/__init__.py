"""grpo_fast: fast, exact GRPO / PPO / TRPO for Hugging Face causal language models.

Layers, lowest first (docs/design.md); imports only run down:
    grpo_fast._C, grpo_fast.kernels   C++ core, Triton kernels
    grpo_fast.ops                     the functional API below
    grpo_fast.rl                      tensor-only RL maths shared by trainers
    grpo_fast.config                  the configs (TRL's field names)
    grpo_fast.model                   the policy, its forwards and fused head, reference, critic
    grpo_fast.rollout                 engines, templates, producers, the rollout data model
    grpo_fast.rewards                 rule rewards, reward models, the reward runner
    grpo_fast.train                   the loop and its collaborators
    grpo_fast.algorithms              GRPO, PPO, TRPO: one file each
    grpo_fast.demo, grpo_fast.cli     the built-in task and the command line

Functional API:
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
    "selective_log_softmax_from_hidden": "grpo_fast.ops.fused_head",
    "policy_loss_from_hidden": "grpo_fast.ops.fused_head",
    "group_advantages": "grpo_fast.ops.advantages",
    "gae": "grpo_fast.ops.advantages",
    "GRPOConfig": "grpo_fast.config",
    "GRPOTrainer": "grpo_fast.algorithms",
    "PPOConfig": "grpo_fast.config",
    "PPOTrainer": "grpo_fast.algorithms",
    "TRPOConfig": "grpo_fast.config",
    "TRPOTrainer": "grpo_fast.algorithms",
    "ConfigError": "grpo_fast.config",
    "RewardFunctionError": "grpo_fast.rewards",
    "NonFiniteUpdateError": "grpo_fast.train",
    "CorruptCheckpointError": "grpo_fast.train",
    "CheckpointMismatchError": "grpo_fast.train",
    "OutputDirError": "grpo_fast.train",
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
