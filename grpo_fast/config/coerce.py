"""Value coercion for the configs: YAML and command-line strings to field types, and ConfigError.

Kept apart from the config classes so that the TRL tables (config/trl.py) and every config can
use it without importing each other.
"""
from __future__ import annotations

import json
import typing
from typing import Any, Dict, List, Union

import yaml

__all__ = ["ConfigError", "coerce", "load_yaml", "truthy"]


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


def truthy(value) -> bool:
    """A flag's value as YAML or the command line gives it ("false" is False)."""
    if isinstance(value, str):
        if value.lower() not in _TRUE | _FALSE:
            raise ConfigError(f"{value!r}: expected true or false")
        return value.lower() in _TRUE
    return bool(value)


def load_yaml(path: str) -> Dict[str, Any]:
    """A YAML file of field: value pairs; a syntax error is a ConfigError naming the file and line."""
    with open(path) as fh:
        try:
            values = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(values).__name__}")
    return values


def coerce(hint, value, name: str):
    """Convert YAML / command-line values (often strings) to the field's type, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
            raise ConfigError(f"{name}: may not be None")
        return coerce(inner[0], value, name)
    if hint is Any:
        return value
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin in (list, List):
            (item,) = args or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce(item, v.strip() if isinstance(v, str) else v, name) for v in value]
        if origin in (dict, Dict):
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except ConfigError:
        raise
    except (ValueError, TypeError):
        tname = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{name}={value!r}: expected {tname}") from None
    return value
