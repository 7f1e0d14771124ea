"""Loading the policy and what the trainers need to know about it: PEFT, wrappers, dropout, and
whether its forward takes `logits_to_keep` as positions.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import typing
from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import ConfigError

__all__ = ["accepts_index_logits_to_keep", "is_peft", "load_policy", "prepare_policy", "set_dropout_zero", "unwrap"]


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


def _missing_model_error(name: str) -> OSError:
    return OSError(f"no model at {name!r} (a local directory with config.json was expected; downloads from "
                   "a model hub are off: pass a local path)")


def load_policy(model, tokenizer, *, dtype: str = "float32", model_init_kwargs=None):
    """(model, tokenizer) from a model object or a local path; the tokenizer gets left padding and a pad token."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        if not os.path.isdir(name):
            raise _missing_model_error(name)
        kwargs = dict(model_init_kwargs or {})
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault("dtype", getattr(torch, dtype) if dtype != "auto" else "auto")
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    elif tokenizer is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        if not name:
            raise ValueError("tokenizer: the model was given as an object without a name_or_path; pass "
                             "processing_class= (or tokenizer=)")
        if not os.path.isdir(name):
            raise _missing_model_error(name)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers model or a local path, got {type(model).__name__}")
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
