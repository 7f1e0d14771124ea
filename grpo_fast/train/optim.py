"""The optimiser, its schedule, and one optimiser step, written once for every algorithm:
gradient norm (and clipping), the finite guard, the step and the schedule."""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Optional

import torch

from .distributed import full_tensor

__all__ = ["NonFiniteUpdateError", "OptimizerStep", "build_optimizer", "build_scheduler"]


class NonFiniteUpdateError(RuntimeError):
    """config.max_consecutive_nonfinite updates in a row had a non-finite loss or gradient norm."""


def build_optimizer(params: Iterable[torch.nn.Parameter], config, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """AdamW with the config's betas, eps and weight decay; fused unless a parameter rules it out."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=config.learning_rate if lr is None else lr,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                             weight_decay=config.weight_decay, **({"fused": True} if fused else {}))


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_updates: int):
    """Linear warm-up, then constant, linear or cosine decay over `total_updates` optimiser steps."""
    warm = config.warmup_steps or int(math.ceil(config.warmup_ratio * total_updates))
    kind = config.lr_scheduler_type

    def factor(i: int) -> float:
        if warm and i < warm:
            return (i + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (i - warm) / max(1, total_updates - warm))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class OptimizerStep:
    """One optimiser step after the gradients of its micro-batches are in: the global gradient norm
    (clipped to max_grad_norm when > 0; a collective under FSDP2), then the step and the schedule,
    unless the loss or the norm is NaN/inf on some rank. Such an update is skipped with a warning and
    counted; max_consecutive_nonfinite skips in a row raise NonFiniteUpdateError. One host read of
    the finite flag per optimiser step."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler=None, *, max_grad_norm: float, dist,
                 max_consecutive_nonfinite: int):
        self.optimizer, self.scheduler, self.dist = optimizer, scheduler, dist
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.max_grad_norm = max_grad_norm
        self.limit = max_consecutive_nonfinite
        self.in_a_row = 0          # consecutive skipped updates
        self.skipped = 0           # skipped updates since the last metrics()
        self.last_lr: Optional[float] = None  # the learning rate of the last update taken

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm (float64 scalar), clipping the gradients when asked."""
        sharded = self.dist.enabled and self.dist.mode == "fsdp2"
        if self.max_grad_norm and self.max_grad_norm > 0:
            gn = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        elif sharded:  # sharded gradients: the norm is a collective
            gn = torch.nn.utils.clip_grad_norm_(self.params, float("inf"), foreach=True)
        else:
            gn = torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        return full_tensor(gn).detach().to(torch.float64)

    def __call__(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Step the optimiser on the accumulated gradients (loss: their summed loss, for the finite
        check; step: the training step, for messages); returns the gradient norm."""
        gn = self.grad_norm()
        if self._finite(loss, gn, step):
            self.last_lr = float(self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return gn

    def _finite(self, loss: torch.Tensor, gn: torch.Tensor, step: int) -> bool:
        bad = not bool(torch.isfinite(loss.detach()).all() and torch.isfinite(gn).all())
        if not self.dist.any(bad):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        n, limit = self.in_a_row, self.limit
        if n >= limit:
            raise NonFiniteUpdateError(
                f"step {step}: {n} optimiser updates in a row had a non-finite loss or gradient norm "
                f"(max_consecutive_nonfinite={limit}); training stopped, the weights are those of the last "
                f"finite update and checkpoints hold finite weights only (lower learning_rate, check the rewards)")
        if self.dist.is_main:
            warnings.warn(f"step {step}: non-finite loss ({float(loss):.4g}) or gradient norm ({float(gn):.4g}): "
                          f"optimiser step skipped ({n} in a row; {limit} stop training)", RuntimeWarning, stacklevel=3)
        return False

    def metrics(self, *, learning_rate: bool = True) -> Dict[str, float]:
        """skipped_updates since the last call, and the learning rate the last update used."""
        out: Dict[str, float] = {"skipped_updates": self.skipped}
        self.skipped = 0
        if learning_rate and self.scheduler is not None:
            lr = self.last_lr if self.last_lr is not None else float(self.optimizer.param_groups[0]["lr"])
            out["learning_rate"] = lr
        return out

    def state_dict(self) -> Dict[str, float]:
        return {"in_a_row": self.in_a_row}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.in_a_row = int(state.get("in_a_row", 0))
