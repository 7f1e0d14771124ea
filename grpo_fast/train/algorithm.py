"""The interface between the loop and an algorithm (one file each in grpo_fast/algorithms/).

An algorithm gets an AlgorithmContext (built by the Trainer) and builds what it uses itself: the
reference model, the critic, the DDP / FSDP2 wrapper or a plain broadcast, the optimiser. Per
step the loop hands it a scored rollout whose loss_mask is set:

    prepare(batch, step) -> Rollout   what the update needs: advantages, old / reference log-probs
    update(batch, step) -> metrics    the optimisation; metrics already reduced over ranks

and, when it keeps more than its optimiser and scheduler: state_dict / load_state_dict (numbers and
tensors in trainer_state.pt), save_files (into a checkpoint folder), export (into final/).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..config import ConfigError
from ..model import Policy, is_peft
from ..rollout import Rollout
from .distributed import wrap_model
from .rng import TrainerRNG

__all__ = ["Algorithm", "AlgorithmContext", "micro_batches", "rows_of"]


def micro_batches(n: int, size: int):
    """Row slices of `size` samples covering n rows, in order."""
    return [slice(s, s + size) for s in range(0, n, size)]


def rows_of(t: Optional[torch.Tensor], rows) -> Optional[torch.Tensor]:
    """t[rows], or None for a field the rollout does not have."""
    return None if t is None else t[rows]


@dataclass
class AlgorithmContext:
    config: Any                      # the algorithm's config
    dist: Any                        # DistContext
    device: torch.device
    rng: TrainerRNG
    policy: Policy
    check_ids: torch.Tensor          # a short input the fused head of another model is checked on
    say: Any = print                 # where notices go (rank 0 prints)


class Algorithm:
    name = "base"

    def __init__(self, ctx: AlgorithmContext):
        self.ctx = ctx
        self.config, self.dist, self.device, self.policy = ctx.config, ctx.dist, ctx.device, ctx.policy
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None

    # ------------------------------------------------------------------ what an algorithm implements
    def prepare(self, batch: Rollout, step: int) -> Rollout:
        raise NotImplementedError

    def update(self, batch: Rollout, step: int) -> Dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any], path: str) -> None:
        """Restore what state_dict() and save_files() wrote into checkpoint `path`."""

    def save_files(self, directory: str) -> None:
        """Write extra files (the critic's weights) into a checkpoint folder being built."""

    def export(self, directory: str) -> None:
        """Write what a user needs beside the final policy (the value model) into final/ (rank 0)."""

    # ------------------------------------------------------------------ helpers
    def trainable_parameters(self):
        """The policy's parameters that train (all, or the adapter's under PEFT)."""
        return [p for p in self.policy.model.parameters() if p.requires_grad]

    def wrap_policy(self) -> None:
        """Gradient-carrying forwards through DDP / FSDP2 (policy.wrapped); policy.model stays the
        unwrapped module (sampling, adapters, saving). From here on each rank samples its own."""
        if self.dist.enabled and self.dist.mode == "fsdp2" and is_peft(self.policy.model):
            raise ConfigError("distributed=fsdp2 with a PEFT adapter is not supported; use distributed=ddp")
        self.policy.wrapped = wrap_model(self.policy.model, self.dist)
        self._per_rank_randomness()

    def replicate_policy(self) -> None:
        """For algorithms that average gradients themselves (a loss spanning modules outside a DDP
        wrapper): rank 0's policy weights to every rank, no wrapper."""
        if self.dist.enabled:
            if self.dist.mode != "ddp":
                    raise ConfigError(f"{type(self).__name__} under torchrun supports distributed=ddp, not "
                                  f"{self.dist.mode!r}")
            self.dist.broadcast_module(self.policy.model)
        self._per_rank_randomness()

    def _per_rank_randomness(self) -> None:
        if self.dist.enabled:  # the same seed on every rank until the policy is replicated
            self.ctx.rng.reseed(self.config.seed + self.dist.rank)
