"""What a run's rollouts are made of, from the trainer's arguments (TRL's names), and the producer
that makes them:

    nothing                     SingleTurnProducer: prompt -> one sampled completion
    tools= / environment_factory=
                                MultiTurnProducer: tool calls turn by turn (multi_turn.py)
    rollout_func=               RolloutFuncProducer: the user's own rollout (custom_rollout.py)

`TurnSpec` checks what it is given when the trainer is built (tool schemas, environments'
reset and tools, the chat template), supplies the training data when an environment owns it (no
train_dataset: TRL's stand-in rows of an empty user message; rows without a prompt get one), and
adds the environments' get_reward to the reward functions (weight 1, named after the class;
reward_weights covers the reward functions only, as in TRL).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .chat_turns import TurnTemplate
from .custom_rollout import RolloutFuncProducer
from .environments import Environments
from .multi_turn import STAND_IN_PROMPT, MultiTurnProducer
from .producer import Producer, SingleTurnProducer
from .template import PromptTemplate
from .tool_calls import tool_schemas
from .tool_runner import ToolRunner

__all__ = ["TurnSpec"]


class TurnSpec:
    """The trainer's tools / environment_factory / rollout_func arguments, checked."""

    def __init__(self, tools: Optional[Sequence[Callable]] = None, environment_factory=None,
                 rollout_func: Optional[Callable] = None, *, tool_call_timeout: Optional[float] = 60.0):
        self.tools: List[Callable] = list(tools or [])
        if rollout_func is not None:
            if not callable(rollout_func):
                raise TypeError(f"rollout_func: {rollout_func!r} is not callable")
            if self.tools or environment_factory is not None:
                raise ValueError("rollout_func runs the whole rollout: it cannot be combined with tools or "
                                 "environment_factory here (call your tools inside rollout_func)")
        self.rollout_func = rollout_func
        tool_schemas(self.tools)
        self.environments = None if environment_factory is None else Environments(environment_factory, self.tools)
        self.runner = ToolRunner(tool_call_timeout) if self.multi_turn else None   # its threads start on first use
        self.omit_prompt = False

    @property
    def multi_turn(self) -> bool:
        return bool(self.tools) or self.environments is not None

    # ------------------------------------------------------------------ data
    def train_dataset(self, dataset, prompts_per_step: int):
        """The dataset to train on: `dataset`, or the stand-in rows an environment fills in."""
        envs = self.environments
        if dataset is None:
            if envs is None:
                raise ValueError("train_dataset is required unless an environment_factory is provided")
            if envs.multi:
                raise ValueError("a dict environment_factory (several environments) needs a train_dataset with an "
                                 "`environment` column to route each row to its environment; provide one, or pass a "
                                 "single environment factory")
            return [{"prompt": list(STAND_IN_PROMPT)} for _ in range(max(1, prompts_per_step))]
        if envs is not None and len(dataset) and "prompt" not in dataset[0]:
            # the environment owns the prompt (reset() writes it); reset() is not given the stand-in
            self.omit_prompt = True
            return [{"prompt": list(STAND_IN_PROMPT), **dataset[i]} for i in range(len(dataset))]
        return dataset

    # ------------------------------------------------------------------ rewards
    def reward_funcs(self, reward_funcs, reward_weights: Optional[Sequence[float]]) -> Tuple[Any, Optional[list]]:
        """(reward functions with the environments' reward sources appended, their weights)."""
        sources = [] if self.environments is None else self.environments.reward_sources(self.runner)
        if not sources:
            if self.environments is not None and not reward_funcs:
                raise ValueError("No reward source provided. Pass `reward_funcs`, or an `environment_factory` whose "
                                 "environment defines a `get_reward` method.")
            return reward_funcs, None if reward_weights is None else list(reward_weights)
        pair = isinstance(reward_funcs, tuple) and len(reward_funcs) == 2 and isinstance(reward_funcs[0], torch.nn.Module)
        given = [] if reward_funcs is None else (list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) and not pair
                                                 else [reward_funcs])
        if reward_weights is None:
            return given + sources, None
        if len(reward_weights) != len(given):
            raise ValueError(f"reward_weights has {len(reward_weights)} entries for {len(given)} reward functions "
                             "(the environments' get_reward sources have weight 1 and take no entry)")
        return given + sources, list(reward_weights) + [1.0] * len(sources)

    # ------------------------------------------------------------------ the producer
    def producer(self, engine, template: PromptTemplate, config, *, device, trainer, dist) -> Producer:
        if self.rollout_func is not None:
            return RolloutFuncProducer(self.rollout_func, trainer, template, device=device)
        if not self.multi_turn:
            return SingleTurnProducer(engine, template, device=device)
        turns = TurnTemplate(template.tokenizer, config.max_prompt_length)
        # a generate that is a collective (FSDP2's synced_gpus) needs every rank to make as many calls
        lockstep = dist.any if dist.enabled and getattr(engine, "synced_gpus", False) else None
        return MultiTurnProducer(engine, turns, tools=self.tools, environments=self.environments, runner=self.runner,
                                 max_tool_calling_iterations=config.max_tool_calling_iterations, device=device,
                                 omit_prompt=self.omit_prompt, lockstep_any=lockstep)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
