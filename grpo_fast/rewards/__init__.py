"""Rewards: rule rewards, reward models, the runner that calls them, and rewards by name.

    rules.py      accuracy_reward, format_reward, boxed_format_reward, soft_overlong_punishment, ...
    model.py      RewardModel: a sequence-classification model as a reward function
    runner.py     RewardRunner: TRL's calling convention (sync and async), checks, failure location
    registry.py   rewards by name ("accuracy", "module:function", a reward-model directory)

Every reward has TRL's signature: f(prompts, completions, completion_ids, **columns) ->
list[float | None]; None means no reward for that sample.
"""
from .model import RewardModel
from .registry import REWARDS, prepare_reward_funcs, register_reward, resolve_reward
from .rules import (accuracy_reward, answers_match, boxed_format_reward, extract_answer, extract_boxed,
                    extract_final_number, format_reward, make_format_reward, parse_number, soft_overlong_punishment)
from .runner import RewardFunctionError, RewardRunner

__all__ = ["REWARDS", "RewardFunctionError", "RewardModel", "RewardRunner", "accuracy_reward", "answers_match",
           "boxed_format_reward", "extract_answer", "extract_boxed", "extract_final_number", "format_reward",
           "make_format_reward", "parse_number", "prepare_reward_funcs", "register_reward", "resolve_reward",
           "soft_overlong_punishment"]
