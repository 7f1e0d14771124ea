"""The policy model as the trainers see it: loading, PEFT detection, dropout, and the forward
passes that give the completion tokens' logits (or last hidden states) only.

Position convention (used by every trainer, the critic and the reference): entry t of a
completion's logits / hidden states / values belongs to the state before completion token t,
i.e. the position that predicts token t.
"""
from __future__ import annotations

import inspect
import os
import typing
from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import ConfigError

__all__ = ["accepts_index_logits_to_keep", "forward_hidden", "forward_logits", "is_peft", "load_policy",
           "set_dropout_zero", "unwrap"]


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


def forward_logits(model, batch, rows=slice(None), *, index_logits_to_keep: Optional[bool] = True) -> torch.Tensor:
    """Logits of the completion tokens only: (n, T, V); the prompt's logits are never made.

    index_logits_to_keep: accepts_index_logits_to_keep(model), decided once at set-up.
    """
    input_ids, attention_mask, position_ids = batch.model_inputs(rows)        # (n, P + T) each
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if index_logits_to_keep:
        # the positions P-1 .. P+T-2, the ones that predict the completion: the same numbers as
        # TRL's "T + 1, drop the last", but no wasted row, and the logits come out contiguous
        keep = torch.arange(P - 1, P + T - 1, device=input_ids.device)
        return model(**kw, logits_to_keep=keep).logits                        # (n, T, V)
    if index_logits_to_keep is False:
        return model(**kw, logits_to_keep=T + 1).logits[:, :-1]                # (n, T, V)
    return model(**kw).logits[:, P - 1:P + T - 1]                              # (n, T, V)


def forward_hidden(model, batch, rows=slice(None), *, logits: bool = True):
    """(logits (n, T, V) or None, last hidden states (n, T, H)) of the completion positions, one forward."""
    input_ids, attention_mask, position_ids = batch.model_inputs(rows)
    T = batch.completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=T + 1, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -(T + 1):-1]                             # (n, T, H)
    return (out.logits[:, :-1] if logits else None), hidden
