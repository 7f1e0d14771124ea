"""The optimiser side of precision (model/precision.py has the autocast side):

- `MasterWeightAdamW`: AdamW over float32 master copies of the bfloat16 / float16 trainable
  parameters. Updates of the size of a typical RL learning rate (1e-6 of a weight) are far below
  half a bfloat16 ulp (2^-9 of the weight), so AdamW run on the low-precision parameters
  themselves rounds almost every update away; on the masters they accumulate, and the parameters
  get the masters rounded after each step. The masters and the moments are float32 (6 bytes per
  parameter on top of the 2 of the parameter). The masters are in the optimiser's state_dict, so
  a resumed run continues from the same float32 weights.
- `LossScaler`: the dynamic loss scale float16 needs (autocast fp16 or float16 parameters):
  the loss is multiplied by the scale before the backward pass and the gradients divided by it
  before the norm; an update whose gradients overflow is skipped and the scale halved (2000
  updates without an overflow double it), as torch.amp.GradScaler does. Its state is in the
  optimiser's state_dict too.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..model.precision import LOW_PRECISION

__all__ = ["LossScaler", "MasterWeightAdamW", "needs_master_weights"]


def needs_master_weights(params: Sequence[torch.Tensor]) -> bool:
    return any(p.dtype in LOW_PRECISION for p in params)


class LossScaler:
    """A dynamic loss scale (torch.amp.GradScaler's defaults: 2^16, x2 after 2000 clean updates, /2
    on an overflow)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.clean = 0            # updates since the last overflow or growth

    def unscale_(self, params: Sequence[torch.Tensor]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale *= self.backoff_factor
            self.clean = 0
            return
        self.clean += 1
        if self.clean >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean = 0

    def state_dict(self) -> Dict[str, float]:
        return {"scale": self.scale, "clean": self.clean}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.scale, self.clean = float(state["scale"]), int(state["clean"])


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW whose param_groups hold float32 masters of the low-precision parameters given (float32
    ones are stepped as they are). `model_params` are the parameters the backward pass fills;
    `load_grads()` moves their gradients onto the masters (as float32) before the norm and the
    step; `step()` writes the masters back into the parameters. `scaler` is the LossScaler when
    the optimiser was built with loss_scaling=True."""

    def __init__(self, params, *, loss_scaling: bool = False, **kwargs):
        self.model_params: List[torch.Tensor] = list(params)
        self.pairs = []                       # (parameter, its float32 master)
        opt_params = []
        for p in self.model_params:
            if p.dtype in LOW_PRECISION:
                master = p.detach().to(torch.float32).clone().requires_grad_(True)
                self.pairs.append((p, master))
                opt_params.append(master)
            else:
                opt_params.append(p)
        super().__init__(opt_params, **kwargs)
        self.scaler: Optional[LossScaler] = LossScaler() if loss_scaling else None

    def load_grads(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
            p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        self._write_back()
        return out

    @torch.no_grad()
    def _write_back(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Masters from the parameters (after the parameters were loaded from elsewhere)."""
        for p, m in self.pairs:
            m.copy_(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for p, _ in self.pairs:
            p.grad = None

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        if self.pairs:
            state["master_weights"] = [m.detach().clone() for _, m in self.pairs]
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        masters = state.pop("master_weights", None)
        scaler = state.pop("loss_scaler", None)
        super().load_state_dict(state)
        with torch.no_grad():
            if masters is not None and len(masters) == len(self.pairs):
                for (p, m), saved in zip(self.pairs, masters):
                    m.copy_(saved.to(m.device))
                self._write_back()
            else:  # a checkpoint without masters: from the weights it loaded
                self.refresh_masters()
        if scaler is not None and self.scaler is not None:
            self.scaler.load_state_dict(scaler)
