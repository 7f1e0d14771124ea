"""Loading the policy and what the trainers need to know about it: its dtype (TRL's rule), PEFT,
wrappers, dropout, and whether its forward takes `logits_to_keep` as positions.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import typing
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import ConfigError
from . import hub

__all__ = ["accepts_index_logits_to_keep", "apply_to_module", "is_peft", "load_dtype", "load_policy", "load_tokenizer",
           "prepare_policy", "set_dropout_zero", "unwrap"]


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def unwrap(model):
    """The transformers model under a DDP wrapper and / or a PEFT adapter."""
    model = getattr(model, "module", model)          # DDP
    if is_peft(model) and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def set_dropout_zero(model) -> None:
    """Every dropout probability of `model` (modules and config) to 0."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)


def accepts_index_logits_to_keep(model) -> Optional[bool]:
    """From the forward's signature: True when `logits_to_keep` may be a tensor of positions,
    False when it takes only an int, None when the model has no `logits_to_keep` at all."""
    param = inspect.signature(unwrap(model).forward).parameters.get("logits_to_keep")
    if param is None:
        return None
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        return False
    if isinstance(ann, str):
        return "Tensor" in ann
    return ann is torch.Tensor or any(a is torch.Tensor for a in typing.get_args(ann))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_of(value, name: str):
    """A dtype setting (a string or a torch.dtype) -> torch.dtype, "auto", or None."""
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ConfigError(f"{name}={value!r}: expected one of {', '.join(_DTYPES)}, 'auto' or a torch.dtype")


def load_dtype(dtype, model_init_kwargs) -> Any:
    """The dtype a model loaded by name gets: model_init_kwargs["dtype"] (TRL's place for it; its
    old name torch_dtype too) or `dtype`, which must agree; float32 when neither says (TRL's default)."""
    kwargs = model_init_kwargs or {}
    given = [(k, _dtype_of(kwargs[k], f"model_init_kwargs[{k!r}]")) for k in ("dtype", "torch_dtype") if k in kwargs]
    ours = _dtype_of(dtype, "dtype")
    if ours is not None:
        given.append(("dtype", ours))
    values = {v for _, v in given}
    if len(values) > 1:
        raise ConfigError("the model's dtype is given twice with different values: "
                          + ", ".join(f"{k}={v}" for k, v in given))
    return values.pop() if values else torch.float32


# model_init_kwargs that can be applied to a model given as a module (the rest only mean something to from_pretrained)
_APPLICABLE = ("dtype", "torch_dtype", "attn_implementation")


def apply_to_module(model: nn.Module, *, dtype=None, model_init_kwargs=None) -> nn.Module:
    """What of `dtype` and model_init_kwargs a model given as a module can take: a cast to the dtype,
    the attention implementation. Keys that only from_pretrained understands are refused by name
    (TRL ignores all of them with a warning)."""
    kwargs = dict(model_init_kwargs or {})
    refused = sorted(k for k in kwargs if k not in _APPLICABLE)
    if refused:
        raise ConfigError(f"model_init_kwargs {refused}: apply only when the model is loaded by name (from_pretrained); "
                          "the model was given as a module: load it with them yourself, or pass its name or path")
    has_dtype = dtype is not None or "dtype" in kwargs or "torch_dtype" in kwargs
    target = load_dtype(dtype, kwargs) if has_dtype else None
    if isinstance(target, torch.dtype):
        model = model.to(target)                  # "auto" with a module: the module's own dtype
    if "attn_implementation" in kwargs:
        if not hasattr(model, "set_attn_implementation"):
            raise ConfigError(f"model_init_kwargs['attn_implementation']: {type(model).__name__} cannot change its "
                              "attention implementation (no set_attn_implementation)")
        model.set_attn_implementation(kwargs["attn_implementation"])
    return model


def load_tokenizer(name: str, model_init_kwargs=None):
    return hub.from_pretrained(AutoTokenizer, name, what="tokenizer", **hub.tokenizer_kwargs(model_init_kwargs))


def load_policy(model, tokenizer, *, dtype=None, model_init_kwargs=None):
    """(model, tokenizer) from a model object, a local path or a hub id (transformers' cache and
    HF_HUB_OFFLINE apply: model/hub.py); the tokenizer gets left padding and a pad token.

    By name: loaded in float32 unless `dtype` or model_init_kwargs["dtype"] say otherwise (TRL's
    rule); model_init_kwargs go to from_pretrained, and those that locate files (cache_dir,
    revision, ...) to the tokenizer too. A module: `apply_to_module` (cast to `dtype`, the
    attention implementation; other model_init_kwargs refused by name)."""
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        kwargs = dict(model_init_kwargs or {})
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = load_dtype(dtype, model_init_kwargs)
        model = hub.from_pretrained(AutoModelForCausalLM, name, **kwargs)
        if tokenizer is None:
            tokenizer = load_tokenizer(name, model_init_kwargs)
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a transformers model, a local path or a hub id, got "
                            f"{type(model).__name__}")
        model = apply_to_module(model, dtype=dtype, model_init_kwargs=model_init_kwargs)
        if tokenizer is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            if not name:
                raise ValueError("tokenizer: the model was given as an object without a name_or_path; pass "
                                 "processing_class= (or tokenizer=)")
            tokenizer = load_tokenizer(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos_token: completions could never end")
    tokenizer.padding_side = "left"
    return model, tokenizer


def prepare_policy(model, tokenizer, config, *, device, peft_config=None, init_scope=None):
    """(model, tokenizer) ready to train on `device`: loaded (load_policy), the PEFT adapter added
    (its initialisation drawn inside `init_scope()`, the trainer's random state), dropout off when
    config.disable_dropout, gradient checkpointing when asked."""
    model, tokenizer = load_policy(model, tokenizer, dtype=config.dtype, model_init_kwargs=config.model_init_kwargs)
    if peft_config is not None:
        try:
            from peft import get_peft_model
        except ImportError as e:
            raise ImportError("peft_config was given but peft is not installed: pip install peft") from e
        with (init_scope() if init_scope is not None else contextlib.nullcontext()):
            model = get_peft_model(model, peft_config)
    if config.disable_dropout:
        set_dropout_zero(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "config"):
            model.config.use_cache = False
    return model.to(device), tokenizer
