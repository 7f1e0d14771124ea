"""Environments (TRL's `environment_factory`): one instance per rollout, whose public methods are
its tools.

    environment_factory=Cls            every row uses Cls
    environment_factory={name: Cls}    each row names its environment in an `environment` column;
                                       only that environment's tools reach its prompt

An environment class defines `reset(**row)` (required; returns None, or text appended to the last
user message of the prompt), optionally `get_reward()` (sync or async: the environment scores the
episode it ran), and public methods: the tools (type hints and a Google-style docstring, as any
tool). `reset` and `get_reward` are not tools; neither is a name starting with "_".

Instances are pooled per environment and reset for every rollout ("construct once, reset often",
as TRL): a step with N rollouts of an environment uses N instances, created the first time they
are needed. Each class with a `get_reward` becomes a reward source named after the class, with
weight 1: it reads the step's instances from the `environments` column, which every reward
function receives (TRL's keyword), and scores the rollouts of exactly that class (None for the
others). An async `get_reward` runs on the tools' event loop, beside the environment's async tools.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence

from .tool_calls import tool_schemas
from .tool_runner import ToolRunner

__all__ = ["Environments"]

_RESERVED = ("reset", "get_reward")


def _tool_methods(instance) -> List[Callable]:
    """The public methods of an instance's class, bound (listed on the class: getmembers on the
    instance would evaluate properties)."""
    return [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if name not in _RESERVED and not name.startswith("_")]


class Environments:
    """The environment factories of a run, their instance pools and reward sources."""

    def __init__(self, factory, tools: Sequence[Callable] = ()):
        self.multi = isinstance(factory, dict)
        self.factories: Dict[Optional[str], Callable] = dict(factory) if self.multi else {None: factory}
        if not self.factories:
            raise ValueError("environment_factory: an empty dict (give at least one environment)")
        self.pool: Dict[Optional[str], List[Any]] = {}
        self.reward_classes: List[type] = []
        for name, make in self.factories.items():
            if not callable(make):
                raise TypeError(f"environment_factory{'' if name is None else f'[{name!r}]'}: {make!r} is not callable")
            instance = make()   # one probe per environment: its tools' schemas are checked now; it seeds the pool
            label = type(instance).__name__
            if not callable(getattr(instance, "reset", None)):
                raise ValueError(f"environment {label}: every environment returned by environment_factory must "
                                 "define a callable reset(**row)")
            tool_schemas(list(tools) + _tool_methods(instance))   # names unique, every schema buildable
            self.pool[name] = [instance]
            if callable(getattr(instance, "get_reward", None)) and type(instance) not in self.reward_classes:
                self.reward_classes.append(type(instance))

    # ------------------------------------------------------------------ per step
    def draw(self, rows: Sequence[Dict[str, Any]], group_size: int) -> List[Any]:
        """One instance per sample (rows repeated group_size times), from the pools."""
        names = [row.get("environment") if self.multi else None for row in rows]
        for name in set(names):
            if name not in self.factories:
                raise ValueError(f"a row has environment={name!r}, which is not among the environments given to "
                                 f"environment_factory: {sorted(map(str, self.factories))} (with a dict of "
                                 "environments, every row needs an `environment` column naming one)")
        used: Dict[Optional[str], int] = {}
        out = []
        for name in names:
            for _ in range(group_size):
                pool, k = self.pool[name], used.get(name, 0)
                if k == len(pool):
                    pool.append(self.factories[name]())
                used[name] = k + 1
                out.append(pool[k])
        return out

    def reset(self, instance, row: Dict[str, Any], prompt: List[Dict[str, Any]], *, omit_prompt: bool
              ) -> List[Dict[str, Any]]:
        """reset(**row) (the routing `environment` column and a stand-in prompt left out); its text
        is appended to the last message of a copy of `prompt`."""
        kwargs = {k: v for k, v in row.items() if not (self.multi and k == "environment")
                  and not (omit_prompt and k == "prompt")}
        observation = instance.reset(**kwargs)
        if observation is None:
            return prompt
        if not isinstance(observation, str):
            raise TypeError(f"{type(instance).__name__}.reset() returned {type(observation).__name__}: it must "
                            "return None or text (appended to the last user message; text models only)")
        last = prompt[-1]
        content = last.get("content") or ""
        if not isinstance(content, str):
            raise TypeError("the prompt's last message has non-text content; reset() can only append text")
        return list(prompt[:-1]) + [{**last, "content": content + observation}]

    @staticmethod
    def tools(instance) -> List[Callable]:
        return _tool_methods(instance)

    # ------------------------------------------------------------------ rewards
    def reward_sources(self, runner: ToolRunner) -> List[Callable]:
        """One reward function per class with a get_reward, named after the class."""
        return [_reward_source(cls, runner) for cls in self.reward_classes]


def _reward_source(cls: type, runner: ToolRunner) -> Callable:
    is_async = inspect.iscoroutinefunction(getattr(cls, "get_reward"))

    def reward(environments=None, **kwargs):
        if environments is None:
            raise ValueError(f"{cls.__name__}.get_reward: the rollout has no `environments` column")
        mine = [i for i, e in enumerate(environments) if type(e) is cls]
        out: List[Optional[float]] = [None] * len(environments)
        if is_async:
            results = runner.await_all([environments[i].get_reward() for i in mine])
            for i, r in zip(mine, results):
                if isinstance(r, BaseException):
                    raise r
                out[i] = r
        else:
            for i in mine:
                out[i] = environments[i].get_reward()
        return out

    reward.__name__ = reward.__qualname__ = cls.__name__
    return reward
