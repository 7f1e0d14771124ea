"""Precision, with TRL's meaning (docs/precision.md):

- The parameters are float32 unless the user asks otherwise: a model loaded by name gets float32
  unless `dtype` or model_init_kwargs["dtype"] say another dtype; a module keeps its own dtype
  unless `dtype` asks for one (model/policy.py).
- `bf16=True` / `fp16=True` are autocast mixed precision: the trainer's forwards (the policy, the
  reference, the critic, TRPO's) run their matmuls in bfloat16 / float16 while the parameters,
  their gradients and the optimiser's state keep the parameters' dtype. `Precision.autocast()` is
  the one context that turns it on; the loop enters it around the algorithm's prepare and update,
  and the HF engine around generate (vLLM runs in its own dtype: `engine_dtype`).
- Parameters that are themselves bfloat16 / float16 train through float32 master weights in the
  optimiser, and float16 (autocast or parameters) adds a dynamic loss scale
  (train/mixed_precision.py).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch

from ..config import ConfigError

__all__ = ["LOW_PRECISION", "Precision", "autocast_dtype", "engine_dtype"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


def autocast_dtype(config) -> Optional[torch.dtype]:
    """torch.bfloat16 for bf16=True, torch.float16 for fp16=True, None for neither."""
    bf16, fp16 = bool(getattr(config, "bf16", False)), bool(getattr(config, "fp16", False))
    if bf16 and fp16:
        raise ConfigError("bf16=True and fp16=True: choose one mixed precision")
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None


class Precision:
    """The autocast of the trainer's forwards on one device type (none when `dtype` is None)."""

    def __init__(self, dtype: Optional[torch.dtype] = None, device_type: str = "cpu"):
        self.dtype, self.device_type = dtype, device_type

    @classmethod
    def from_config(cls, config, device) -> "Precision":
        return cls(autocast_dtype(config), torch.device(device).type)

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        """torch.autocast(device_type, dtype) when mixed precision is on, else a context that does nothing."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def active(self) -> bool:
        return self.dtype is not None and torch.is_autocast_enabled(self.device_type)

    def for_loss(self, hidden: torch.Tensor, head_args: Dict[str, Any]):
        """Inside autocast, the fused head's inputs in the autocast dtype (its matmul then runs in
        bf16 / fp16, as the model's own head would). -> (hidden, head_args)."""
        if not self.active():
            return hidden, head_args
        args = dict(head_args)
        for key in ("weight", "bias"):
            if args.get(key) is not None:
                args[key] = args[key].to(self.dtype)
        return hidden.to(self.dtype), args

    def outside(self):
        """Autocast off, for the loss ops: they compute in float32 from whatever dtype they get
        (bf16 logits, or hidden states and head from for_loss) and choose their own precision."""
        if not self.active():
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, enabled=False)


def engine_dtype(model: torch.nn.Module, config) -> torch.dtype:
    """The dtype a rollout engine with its own copy of the weights (vLLM) runs in: the precision the
    trainer computes in, i.e. the autocast dtype under bf16 / fp16, else the parameters' dtype (so
    its log-probs are the trainer's, exactly in float32)."""
    return autocast_dtype(config) or next(model.parameters()).dtype
