"""Value models for PPO / TRPO: a scalar head on a causal-LM trunk.

Two layouts:
  ValueModel   a separate critic: a transformer trunk (by default a copy of the policy's, weights
               included) with its own Linear(hidden, 1) head.
  ValueHead    only the head, put on the policy's own last hidden state (shared trunk): one
               forward of the policy gives both the logits and the values.

Token-level convention (the same as the logits of `RLTrainer.forward_logits`): the value of
completion token t is read at the position whose logits predict token t, i.e. V(prompt +
completion[:t]), the state in which token t is chosen. Values are float32 whatever the trunk's
dtype.

The head starts at zero (weight and bias), so a fresh critic predicts 0 everywhere and drawing
it consumes no random numbers (a run's sampling does not depend on whether a critic exists).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch
from torch import nn

__all__ = ["ValueHead", "ValueModel", "build_value_model", "hidden_size_of", "trunk_of"]

HEAD_FILE = "value_head.safetensors"
_META_FILE = "value_model.json"


def hidden_size_of(config) -> int:
    """The width of a transformers config's last hidden state."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for name in ("hidden_size", "n_embd", "d_model", "dim"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError(f"cannot find the hidden size in {type(config).__name__} "
                     "(looked for hidden_size, n_embd, d_model, dim)")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def trunk_of(model: nn.Module) -> nn.Module:
    """The transformer without its LM head: `base_model` of a *ForCausalLM, or the model itself."""
    if _is_peft(model):
        raise TypeError("trunk_of: got a peft model; merge it first (copy.deepcopy(model).merge_and_unload())")
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    return model


class ValueHead(nn.Module):
    """Linear(hidden, 1) in float32, zero-initialised: hidden (..., H) -> values (...)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path)

    def load(self, path: str) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(path))


class ValueModel(nn.Module):
    """A critic: trunk (a transformers base model) + ValueHead.

    forward(input_ids, attention_mask, position_ids, values_to_keep) -> (B, values_to_keep) values
    of the last positions (all positions when values_to_keep is 0).
    """

    def __init__(self, trunk: nn.Module, head: Optional[ValueHead] = None):
        super().__init__()
        self.trunk = trunk
        self.head = head if head is not None else ValueHead(hidden_size_of(trunk.config))
        self.head.to(device=next(trunk.parameters()).device)

    @property
    def config(self):
        return self.trunk.config

    @classmethod
    def from_causal_lm(cls, model: nn.Module, *, copy_weights: bool = True) -> "ValueModel":
        """A critic on the trunk of `model` (deep-copied unless copy_weights=False) with a fresh head.

        A peft policy gives a copy of its base model with the adapter merged (at the start of
        training the adapter is zero, so that is the base model's weights).
        """
        if _is_peft(model):
            trunk = trunk_of(copy.deepcopy(model).merge_and_unload())
        else:
            trunk = trunk_of(copy.deepcopy(model) if copy_weights else model)
        for p in trunk.parameters():
            p.requires_grad_(True)
        return cls(trunk)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "ValueModel":
        """Load a critic saved by save_pretrained, or a fresh head on any local model's trunk."""
        from transformers import AutoModel

        kwargs.setdefault("local_files_only", True)
        trunk = AutoModel.from_pretrained(path, **kwargs)
        trunk = trunk_of(trunk)
        model = cls(trunk)
        head_path = os.path.join(path, HEAD_FILE)
        if os.path.isfile(head_path):
            model.head.load(head_path)
        return model

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.trunk.save_pretrained(path, safe_serialization=True)
        self.head.save(os.path.join(path, HEAD_FILE))
        with open(os.path.join(path, _META_FILE), "w") as fh:
            json.dump({"head": HEAD_FILE, "hidden_size": self.head.summary.in_features}, fh)

    def forward(self, input_ids, attention_mask=None, position_ids=None, values_to_keep: int = 0):
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
        hidden = out.last_hidden_state                                          # (B, L, H)
        if values_to_keep:
            hidden = hidden[:, -values_to_keep:]                                # (B, K, H)
        return self.head(hidden)                                                # (B, K) float32


def build_value_model(spec, policy: nn.Module) -> ValueModel:
    """The critic for a policy: None -> a copy of the policy's trunk and weights with a fresh head;
    a path -> ValueModel.from_pretrained; a ValueModel -> itself; any other module -> its trunk
    (used as is, not copied) with a fresh head."""
    if spec is None:
        return ValueModel.from_causal_lm(policy)
    if isinstance(spec, (str, os.PathLike)):
        return ValueModel.from_pretrained(str(spec))
    if isinstance(spec, ValueModel):
        return spec
    if isinstance(spec, nn.Module):
        return ValueModel.from_causal_lm(spec, copy_weights=False)
    raise TypeError(f"value_model: expected None, a path, a ValueModel or a transformers model, "
                    f"got {type(spec).__name__}")
