"""Trainer configuration: one dataclass per algorithm, one docstring line per field.

    base.py     RLConfig: what every algorithm shares; validation, YAML and dict I/O
    grpo.py     GRPOConfig          ppo.py   PPOConfig          trpo.py   TRPOConfig
    critic.py   CriticConfig, the value-model fields PPO and TRPO share
    loss.py     the one link to grpo_fast.ops.LossOptions (built from a config; its options as fields)
    trl.py      TRL's field names: mapped or refused by name
    coerce.py   YAML / command-line values to field types, ConfigError

Names follow TRL's GRPOConfig / TrainingArguments wherever TRL has the field, with the same meaning.
"""
from .base import RLConfig
from .coerce import ConfigError, load_yaml
from .critic import CriticConfig
from .grpo import GRPOConfig
from .loss import loss_options
from .ppo import PPOConfig
from .trl import TRL_ALIASES, TRL_REFUSED, translate_trl_names
from .trpo import TRPOConfig

__all__ = ["ConfigError", "CriticConfig", "GRPOConfig", "PPOConfig", "RLConfig", "TRL_ALIASES", "TRL_REFUSED",
           "TRPOConfig", "load_yaml", "loss_options", "translate_trl_names"]
