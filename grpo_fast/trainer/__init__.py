"""The trainers, one file per algorithm, and the modules they share.

    base.py         RLTrainer: the loop, rewards, metrics, checkpoints; two-phase construction
    grpo.py         GRPOTrainer: group advantages + clipped policy loss
    ppo.py          PPOTrainer: value model + GAE + clipped policy and value losses
    trpo.py         TRPOTrainer: natural-gradient steps under a KL bound
    config.py       one config dataclass per algorithm (TRL's names), CriticConfig shared by PPO / TRPO
    rollout.py      Rollout (a step's samples, written once) and PromptSampler
    engine.py       rollout engines: the interface and HF generate (vllm_engine.py: vLLM)
    policy.py       loading the policy, PEFT, dropout, completion-only forwards
    critic.py       the value model PPO and TRPO share
    checkpoint.py   atomic checkpoints; tracking.py metrics.jsonl / TensorBoard / progress; plot.py plots
    distributed.py  torchrun: DDP / FSDP2 and the few collectives the trainers use

Sibling trainer files never import each other; what two share lives in a module both import.
"""
from .base import NonFiniteUpdateError, RLTrainer, RewardFunctionError
from .checkpoint import CorruptCheckpointError, OutputDirError
from .config import ConfigError, GRPOConfig, PPOConfig, RLConfig, TRPOConfig
from .grpo import GRPOTrainer
from .ppo import PPOTrainer
from .trpo import TRPOTrainer

__all__ = ["ConfigError", "CorruptCheckpointError", "GRPOConfig", "GRPOTrainer", "NonFiniteUpdateError",
           "OutputDirError", "PPOConfig", "PPOTrainer", "RLConfig", "RLTrainer", "RewardFunctionError", "TRPOConfig",
           "TRPOTrainer"]
