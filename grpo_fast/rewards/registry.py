"""Reward functions by name, and the normalisation of what a user passes as reward_funcs.

A reward given as a string is, in this order: a registered name ("accuracy", "format",
"boxed_format", or one added with register_reward), "package.module:function" or
"path/to/file.py:function", else a reward model (a sequence-classification model): a directory or
a hub id "org/name" (loaded as transformers does: its cache, HF_HUB_OFFLINE).
The same strings work in the Python API (reward_funcs=["accuracy"]) and on the command line
(--reward_funcs accuracy my_rewards.py:length_penalty).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
from typing import Callable, Dict, List, Tuple

import torch
from transformers import AutoTokenizer

from ..model import hub
from .model import RewardModel
from .rules import accuracy_reward, boxed_format_reward, format_reward

__all__ = ["REWARDS", "prepare_reward_funcs", "register_reward", "resolve_reward", "reward_name"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # "org/name"

REWARDS: Dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "boxed_format": boxed_format_reward,
}


def register_reward(name: str, fn: Callable = None):
    """Register a reward function under `name` (usable as a decorator)."""
    def add(f):
        REWARDS[name] = f
        return f
    return add if fn is None else add(fn)


def resolve_reward(spec: str):
    """A reward function (or RewardModel) from its string form (module docstring)."""
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" in spec and not os.path.isdir(spec):
        module, attr = spec.rsplit(":", 1)
        if module.endswith(".py"):
            if not os.path.isfile(module):
                raise ValueError(f"reward {spec!r}: no file {module}")
            s = importlib.util.spec_from_file_location(os.path.basename(module)[:-3], module)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
        if not hasattr(mod, attr):
            raise ValueError(f"reward {spec!r}: {module} has no {attr}")
        return getattr(mod, attr)
    if os.path.isdir(spec) or _HUB_ID.match(spec):
        return RewardModel(spec)
    raise ValueError(f"reward {spec!r}: expected a registered name ({', '.join(REWARDS)}), module:function, "
                     "path/to/file.py:function, or a reward model (a directory or a hub id 'org/name')")


def reward_name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def _tokenizer_for(model):
    name = getattr(model.config, "_name_or_path", None)
    if not name:
        raise ValueError("a reward model given without its tokenizer: pass (model, tokenizer) "
                         "or grpo_fast.rewards.RewardModel(model, tokenizer)")
    return hub.from_pretrained(AutoTokenizer, name, what="reward model's tokenizer")


def prepare_reward_funcs(reward_funcs, *, device) -> Tuple[List[Callable], List[str]]:
    """(callables, unique names) from what a user passes: a callable, a string, a (model, tokenizer)
    pair, a model, a RewardModel, or a list of these. Reward models move to `device`."""
    if isinstance(reward_funcs, tuple) and len(reward_funcs) == 2 and isinstance(reward_funcs[0], torch.nn.Module):
        reward_funcs = [reward_funcs]                 # one (reward model, tokenizer) pair
    elif callable(reward_funcs) or isinstance(reward_funcs, str):
        reward_funcs = [reward_funcs]
    funcs, names = [], []
    for f in list(reward_funcs or []):
        if isinstance(f, tuple) and len(f) == 2 and isinstance(f[0], torch.nn.Module):  # (model, tokenizer)
            f = RewardModel(f[0], f[1])
        elif isinstance(f, str):
            f = resolve_reward(f)
        elif isinstance(f, torch.nn.Module) and not isinstance(f, RewardModel):
            f = RewardModel(f, _tokenizer_for(f))
        if isinstance(f, RewardModel):
            f.model.to(device)
        if not callable(f):
            raise TypeError(f"reward_funcs: {f!r} is not callable")
        funcs.append(f)
        name = reward_name(f)
        while name in names:
            name += "_"
        names.append(name)
    return funcs, names
