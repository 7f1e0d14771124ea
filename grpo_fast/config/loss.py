"""The one link between a trainer config and grpo_fast.ops.LossOptions.

- `loss_options(config, **runtime)` builds the LossOptions of a step from the config: every
  LossOptions field the config has, by name (the config's `epsilon` is LossOptions'
  `epsilon_low`), then what the trainer knows only at run time (token counts, log-probs of the
  sampling engine, ...). Algorithms call it instead of passing fields one by one, and the
  configs call it in `validate()`, so a loss option is checked in one place, LossOptions.
- `with_loss_options(cls)` gives a config class the LossOptions fields declared with
  `grpo_fast.ops.options.option(default, doc)` that it does not declare itself, with that default
  and doc line. A new loss option is therefore written once, in ops/options.py, and reaches
  GRPOConfig, the command line and the docs table without an edit here.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict

from ..ops.options import LossOptions
from .coerce import ConfigError

__all__ = ["RUNTIME_FIELDS", "check_loss_options", "loss_options", "with_loss_options"]

# config field -> LossOptions field, where the names differ (TRL's name on the left)
_RENAMED = {"epsilon": "epsilon_low"}
_CONFIG_NAME = {v: k for k, v in _RENAMED.items()}
# LossOptions fields the trainer fills at run time, never from a config
RUNTIME_FIELDS = ("num_items_in_batch", "sampling_logps", "importance_weights", "entropy_gather",
                  "gradient_accumulation_steps")
_OPTION_NAMES = {f.name for f in dataclasses.fields(LossOptions)}


def loss_options(config, **runtime: Any) -> LossOptions:
    """LossOptions from `config`'s fields of the same name, then `runtime` (which wins)."""
    values: Dict[str, Any] = {}
    for f in dataclasses.fields(config):
        name = _RENAMED.get(f.name, f.name)
        if name in _OPTION_NAMES and name not in RUNTIME_FIELDS:
            values[name] = getattr(config, f.name)
    values.update(runtime)
    return LossOptions(**values)


def check_loss_options(config, **runtime: Any) -> None:
    """ConfigError (naming the config's field) when LossOptions refuses what the config asks for."""
    try:
        loss_options(config, **runtime)
    except (TypeError, ValueError) as e:
        message = str(e)
        for option, field in _CONFIG_NAME.items():
            message = message.replace(option, field)
        raise ConfigError(message) from None


def with_loss_options(cls):
    """Class decorator, applied before @dataclass: adds the LossOptions fields that carry a doc
    line (ops.options.option) and that `cls` does not declare, as fields with that default."""
    hints = typing.get_type_hints(LossOptions)
    own = set(getattr(cls, "__annotations__", {}))
    inherited = {n for klass in cls.__mro__[1:] for n in getattr(klass, "__dataclass_fields__", {})}
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    for f in dataclasses.fields(LossOptions):
        doc = f.metadata.get("doc")
        name = _CONFIG_NAME.get(f.name, f.name)
        if not doc or name in own or name in inherited:
            continue
        annotations[name] = hints[f.name]
        setattr(cls, name, dataclasses.field(default=f.default, metadata={"doc": doc}))
    cls.__annotations__ = annotations
    return cls
