"""The critic PPO and TRPO share: value models (a scalar head on a causal-LM trunk), how one is
built for a policy, its forward at the completion positions, and its checkpoint files.

Two layouts:
  ValueModel   a separate critic: a transformer trunk (by default a copy of the policy's, weights
               included) with its own Linear(hidden, 1) head.
  ValueHead    only the head, put on the policy's own last hidden state (shared trunk): one
               forward of the policy gives both the logits and the values.

Token-level convention (the same as the logits of `policy.forward_logits`): the value of
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
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import AutoModel

from . import hub
from .policy import is_peft, set_dropout_zero

__all__ = ["Critic", "ValueHead", "ValueModel", "build_value_model", "critic_values", "hidden_size_of", "trunk_of"]

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


def trunk_of(model: nn.Module) -> nn.Module:
    """The transformer without its LM head: `base_model` of a *ForCausalLM, or the model itself."""
    if is_peft(model):
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
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path)

    def load(self, path: str) -> None:
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
        if is_peft(model):
            trunk = trunk_of(copy.deepcopy(model).merge_and_unload())
        else:
            trunk = trunk_of(copy.deepcopy(model) if copy_weights else model)
        for p in trunk.parameters():
            p.requires_grad_(True)
        return cls(trunk)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "ValueModel":
        """Load a critic saved by save_pretrained, or a fresh head on any model's trunk (a local
        directory or a hub id, model/hub.py)."""
        trunk = hub.from_pretrained(AutoModel, path, what="value model", **kwargs)
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


def critic_values(critic: ValueModel, batch, rows) -> torch.Tensor:
    """Values (n, T) float32 of a separate critic at the completion positions."""
    input_ids, attention_mask, position_ids = batch.model_inputs(rows)
    T = batch.completion_ids.shape[1]
    return critic(input_ids, attention_mask, position_ids, values_to_keep=T + 1)[:, :-1]   # (n, T)


CRITIC_FILE = "critic.safetensors"


class Critic:
    """The value function of a PPO / TRPO run: a separate ValueModel, or a ValueHead on the
    policy's own last hidden state (shared trunk). Owns its checkpoint file and final export.
    """

    def __init__(self, policy: nn.Module, spec=None, *, shared_trunk: bool = False, device=None,
                 disable_dropout: bool = False, dist=None):
        self.head: Optional[ValueHead] = None
        self.model: Optional[ValueModel] = None
        if shared_trunk:
            self.head = ValueHead(hidden_size_of(policy.config)).to(device)
        else:
            self.model = build_value_model(spec, policy).to(device)
            if dist is not None and dist.enabled:
                # the same critic on every rank (its trunk may come from a policy DDP has not broadcast yet)
                dist.broadcast_module(self.model)
            if disable_dropout:
                set_dropout_zero(self.model)
            self.model.train()

    @property
    def module(self) -> nn.Module:
        return self.head if self.head is not None else self.model

    def parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def values(self, batch, rows, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(n, T) float32 values; a shared-trunk critic needs the policy's hidden states (n, T, H)."""
        if self.head is not None:
            if hidden is None:
                raise ValueError("a shared-trunk critic needs the policy's hidden states")
            return self.head(hidden)
        return critic_values(self.model, batch, rows)

    # ------------------------------------------------------------------ files
    def save(self, directory: str) -> None:
        """Into a checkpoint directory: critic.safetensors (tied tensors handled by save_model)."""
        save_model(self.module, os.path.join(directory, CRITIC_FILE))

    def load(self, directory: str, legacy_state: Optional[dict] = None) -> None:
        """From a checkpoint directory; `legacy_state` is the state dict older checkpoints kept inside
        trainer_state.pt (used when critic.safetensors is absent)."""
        path = os.path.join(directory, CRITIC_FILE)
        if os.path.isfile(path):
            load_model(self.module, path, strict=True, device="cpu")
            return
        if legacy_state is None:
            raise ValueError(f"checkpoint {directory} has no {CRITIC_FILE} (was it written by a trainer "
                             "with a critic?)")
        self.module.load_state_dict(legacy_state)

    def save_final(self, directory: str) -> None:
        """OUTPUT_DIR/final/value_model (a ValueModel.save_pretrained directory) or value_head.safetensors."""
        if self.head is not None:
            self.head.save(os.path.join(directory, HEAD_FILE))
        else:
            self.model.save_pretrained(os.path.join(directory, "value_model"))
