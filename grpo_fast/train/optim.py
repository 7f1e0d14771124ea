"""The optimiser, its schedule, and one optimiser step, written once for every algorithm:
gradient norm (and clipping), the finite guard, the step and the schedule; with low-precision
parameters or float16 the master weights and the loss scale (train/mixed_precision.py)."""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Optional

import torch

from ..config import ConfigError
from .distributed import full_tensor
from .mixed_precision import MasterWeightAdamW, needs_master_weights

__all__ = ["NonFiniteGuard", "NonFiniteUpdateError", "OptimizerStep", "build_optimizer", "build_scheduler"]


class NonFiniteUpdateError(RuntimeError):
    """config.max_consecutive_nonfinite updates in a row had a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """The rule for updates with a non-finite loss or gradient, in every algorithm: the update is
    skipped with a warning and counted (skipped_updates); `limit` skips in a row raise
    NonFiniteUpdateError. `record(bad, ...)` takes a flag already agreed over ranks."""

    def __init__(self, limit: int, dist):
        self.limit, self.dist = limit, dist
        self.in_a_row = 0          # consecutive skipped updates
        self.skipped = 0           # skipped updates since the last take_skipped()

    def record(self, bad: bool, step: int, what: str) -> bool:
        """True when the update may go ahead; `what` describes the non-finite value for the warning."""
        if not bad:
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
            warnings.warn(f"step {step}: {what}: optimiser step skipped ({n} in a row; {limit} stop training)",
                          RuntimeWarning, stacklevel=4)
        return False

    def take_skipped(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


def build_optimizer(params: Iterable[torch.nn.Parameter], config, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """AdamW with the config's betas, eps and weight decay; fused unless a parameter rules it out.
    bfloat16 / float16 parameters: over float32 master weights; float16 (config.fp16 or float16
    parameters): with a loss scale (MasterWeightAdamW)."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    kwargs = dict(lr=config.learning_rate if lr is None else lr, betas=(config.adam_beta1, config.adam_beta2),
                  eps=config.adam_epsilon, weight_decay=config.weight_decay, **({"fused": True} if fused else {}))
    scaling = bool(getattr(config, "fp16", False)) or any(p.dtype == torch.float16 for p in params)
    if scaling or needs_master_weights(params):
        return MasterWeightAdamW(params, loss_scaling=scaling, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_updates: int):
    """transformers' schedules (TRL's): linear warm-up from 0 over warmup_steps (or warmup_ratio of
    `total_updates`, rounded up), then constant, linear or cosine decay to 0 at `total_updates`.
    Update i (from 0) uses learning_rate * factor(i), as transformers' LambdaLR schedules give it."""
    warm = config.warmup_steps or int(math.ceil(config.warmup_ratio * total_updates))
    kind = config.lr_scheduler_type

    def factor(i: int) -> float:
        if i < warm:
            return i / max(1, warm)
        if kind == "constant":
            return 1.0
        progress = (i - warm) / max(1, total_updates - warm)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class OptimizerStep:
    """One optimiser step after the gradients of its micro-batches are in: the global gradient norm
    (clipped to max_grad_norm when > 0; a collective under FSDP2), then the step and the schedule,
    unless the loss or the norm is NaN/inf on some rank. Such an update is skipped with a warning and
    counted; max_consecutive_nonfinite skips in a row raise NonFiniteUpdateError. One host read of
    the finite flags per optimiser step. The gradients are freed after the step (set to None), so
    no gradient-sized buffer is held between steps.

    With a MasterWeightAdamW (low-precision parameters, float16): the gradients move onto the float32
    masters first, and with its loss scale `backward(loss)` scales the loss and the step unscales
    the gradients; an update whose gradients overflow while the loss is finite is the loss scale's
    to handle (skipped, the scale halved, counted in loss_scale_skips), not a non-finite update."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler=None, *, max_grad_norm: float, dist,
                 max_consecutive_nonfinite: int):
        self.optimizer, self.scheduler, self.dist = optimizer, scheduler, dist
        # the parameters the backward pass fills (the algorithms average their gradients over ranks)
        self.params = list(getattr(optimizer, "model_params", None)
                           or [p for g in optimizer.param_groups for p in g["params"]])
        self._stepped = [p for g in optimizer.param_groups for p in g["params"]]   # what the optimiser updates
        self.scaler = getattr(optimizer, "scaler", None)
        if getattr(optimizer, "pairs", None) and dist.enabled and dist.mode == "fsdp2":
            raise ConfigError("distributed=fsdp2 with bfloat16 / float16 parameters is not supported (FSDP2 shards "
                              "float32 parameters): load the model in float32 (dtype=float32) and set bf16=True")
        self.max_grad_norm = max_grad_norm
        self.guard = NonFiniteGuard(max_consecutive_nonfinite, dist)
        self.scale_skips = 0       # updates the loss scale skipped (float16 overflow) since the last metrics()
        self.last_lr: Optional[float] = None  # the learning rate of the last update taken

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), through the loss scale when there is one."""
        (loss * self.scaler.scale if self.scaler is not None else loss).backward()

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm (float64 scalar), clipping the gradients when asked."""
        sharded = self.dist.enabled and self.dist.mode == "fsdp2"
        params = self._stepped
        if self.max_grad_norm and self.max_grad_norm > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        elif sharded:  # sharded gradients: the norm is a collective
            gn = torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True)
        else:
            norms = [p.grad.norm() for p in params if p.grad is not None]
            gn = torch.norm(torch.stack(norms)) if norms else torch.zeros(())
        return full_tensor(gn).detach().to(torch.float64)

    def __call__(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Step the optimiser on the accumulated gradients (loss: their summed loss, unscaled, for
        the finite check; step: the training step, for messages); returns the gradient norm."""
        load_grads = getattr(self.optimizer, "load_grads", None)
        if load_grads is not None:
            load_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self._stepped)
        gn = self.grad_norm()
        if self._finite(loss, gn, step):
            self.last_lr = float(self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gn

    def _finite(self, loss: torch.Tensor, gn: torch.Tensor, step: int) -> bool:
        flags = torch.stack([~torch.isfinite(loss.detach().to(gn.device)).all(), ~torch.isfinite(gn).all()])
        bad_loss, bad_norm = (bool(v) for v in flags.tolist())                    # one read
        if self.dist.enabled:
            bad_loss, bad_norm = (v > 0 for v in self.dist.all_reduce(
                torch.tensor([float(bad_loss), float(bad_norm)]), "max").tolist())
        if self.scaler is not None and not bad_loss:
            # float16 gradients that overflow under a finite loss: the scale was too high (kept >= 1, below
            # that an overflow is no longer the scale's doing and counts as a non-finite update)
            overflow = bad_norm and self.scaler.scale > 1.0
            self.scaler.update(overflow)
            if overflow:
                self.scale_skips += 1
                return False
        if not (bad_loss or bad_norm):
            return self.guard.record(False, step, "")
        return self.guard.record(True, step, f"non-finite loss ({float(loss):.4g}) or gradient norm ({float(gn):.4g})")

    def metrics(self, *, learning_rate: bool = True) -> Dict[str, float]:
        """skipped_updates since the last call, and the learning rate the last update used (with a
        loss scale: the scale and the updates it skipped)."""
        out: Dict[str, float] = {"skipped_updates": self.guard.take_skipped()}
        if self.scaler is not None:
            out.update(loss_scale=self.scaler.scale, loss_scale_skips=self.scale_skips)
            self.scale_skips = 0
        if learning_rate and self.scheduler is not None:
            lr = self.last_lr if self.last_lr is not None else float(self.optimizer.param_groups[0]["lr"])
            out["learning_rate"] = lr
        return out

    @property
    def in_a_row(self) -> int:
        return self.guard.in_a_row

    def state_dict(self) -> Dict[str, float]:
        return {"in_a_row": self.guard.in_a_row}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.guard.in_a_row = int(state.get("in_a_row", 0))
