"""Scale-out on torch.distributed: the trainers under torchrun, with DDP or FSDP2.

    torchrun --nproc_per_node 2 -m grpo_fast train ...            # DDP (default)
    torchrun --nproc_per_node 8 -m grpo_fast train --distributed fsdp2

Layout (docs/design.md, "Trainers"): every rank owns whole prompt groups. The prompt sampler draws
the same global list of prompts on every rank and rank r keeps the r-th contiguous slice, so a
group's G completions are generated, scored and given advantages on one rank. Everything that
needs the global batch (batch-std reward scaling, the dapo token count, metrics) goes through
the few collectives below; gradients are averaged by DDP / reduce-scattered by FSDP2.

Nothing here touches torch.distributed unless WORLD_SIZE > 1 (or a process group already
exists), so a plain `python` run never initialises anything.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["DistContext", "average_gradients", "decoder_layers", "gradient_sync", "init_from_env",
           "pick_device", "wrap_model"]


@dataclass
class DistContext:
    """Where this process stands: rank, world size, and the parallelism wrapping the policy."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"          # none | ddp | fsdp2
    owns_group: bool = False    # True when init_from_env created the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    # The tensors go through the backend's device: gloo takes CPU tensors, nccl CUDA ones.
    def _comm_device(self) -> torch.device:

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor of the same shape from every rank along dim 0, in rank order."""
        if not self.enabled:
            return t

        x = t.detach().to(self._comm_device()).contiguous()
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(out, x)
        return torch.cat(out).to(t.device)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Element-wise sum / max / min over ranks (returns a new tensor on t's device)."""
        if not self.enabled:
            return t

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        x = t.detach().to(self._comm_device()).clone()
        dist.all_reduce(x, op=ops[op])
        return x.to(t.device)

    def sum_floats(self, values: Sequence[float]) -> List[float]:
        """Sums over ranks of a few Python floats, in float64 and one collective."""
        if not self.enabled:
            return [float(v) for v in values]
        return self.all_reduce(torch.tensor(list(values), dtype=torch.float64)).tolist()

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.enabled:
            return [obj]

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
    
            dist.barrier()

    def gather_ragged(self, t: torch.Tensor) -> torch.Tensor:
        """(n,) float of this rank -> every rank's, concatenated, each NaN-padded to the longest n
        (for statistics that ignore NaN, like the entropy quantile over masked tokens)."""
        if not self.enabled:
            return t
        width = int(self.all_reduce(torch.tensor([t.numel()], dtype=torch.float64), "max").item())
        if t.numel() < width:
            t = torch.cat([t, t.new_full((width - t.numel(),), float("nan"))])
        return self.all_gather(t)

    def broadcast_module(self, module, src: int = 0) -> None:
        """Every rank's parameters and buffers of `module` to rank src's."""
        if self.enabled:
            broadcast_module(module, src)

    def token_normaliser(self, mask: torch.Tensor) -> float:
        """The loss normaliser of a token-level mean over every rank's `mask` tokens: the global
        token count / world size (at least 1 / world size), so that averaging the ranks' gradients
        of (local sum / this) gives the gradient of the global mean. One host read (and one
        all-reduce under torchrun); the one definition the algorithms use."""
        total = self.sum_floats([float(mask.sum())])[0]
        return max(total, 1.0) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank (a callback asking to stop, say)."""
        if not self.enabled:
            return bool(flag)
        return bool(self.all_reduce(torch.tensor([1.0 if flag else 0.0]), "max").item())

    def mean_metrics(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """Plain mean over ranks of every numeric value (for metrics an algorithm did not reduce itself)."""
        if not self.enabled:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        if not keys:
            return metrics
        sums = self.sum_floats([float(metrics[k]) for k in keys])
        out = dict(metrics)
        for k, s in zip(keys, sums):
            out[k] = s / self.world_size
        return out


def init_from_env(mode: str = "ddp", timeout_s: int = 1800) -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    nccl when CUDA is available, else gloo; each rank's CUDA device is cuda:LOCAL_RANK. A world of
    one process (plain python, or torchrun --nproc_per_node 1) gets a context with mode "none".

    A group created here lives until the process ends (destroyed at exit): under torchrun a group
    destroyed and created again finds the launcher's store still holding the first group's
    addresses, so a second trainer in the same script must reuse the group, not re-create it.
    """

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        rank, owns = dist.get_rank(), False
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif world > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        kw: Dict[str, Any] = {}
        if cuda:
            kw["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s), **kw)
        atexit.register(_destroy_at_exit)
        owns = True
    else:
        return DistContext()
    if world == 1:
        return DistContext(owns_group=owns)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, mode=mode, owns_group=owns)


def _destroy_at_exit() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def pick_device(spec: Optional[str], ctx: DistContext) -> torch.device:
    """The device to train on: config.device, or cuda (one GPU per rank, cuda:LOCAL_RANK) when
    available, else cpu."""
    if ctx.enabled and torch.cuda.is_available() and spec in (None, "cuda"):
        return torch.device("cuda", ctx.local_rank)
    return torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))


def decoder_layers(model) -> List[torch.nn.Module]:
    """The repeated transformer blocks of a causal LM (the FSDP2 sharding unit)."""
    # the first (outermost) homogeneous ModuleList with parameters: model.layers, transformer.h, ...
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 \
                and len({type(m) for m in module}) == 1 and any(True for _ in module[0].parameters()):
            return list(module)
    return []


def broadcast_module(model, src: int = 0) -> None:
    """Make every rank's parameters and buffers rank src's (FSDP2, unlike DDP, does not)."""

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if dist.get_backend() == "nccl" or t.device.type == "cpu":
                dist.broadcast(t.data, src=src)
            else:
                tmp = t.data.cpu()
                dist.broadcast(tmp, src=src)
                t.data.copy_(tmp)


def wrap_model(model, ctx: DistContext):
    """-> the module to run gradient-carrying forwards through.

    ddp:   a DistributedDataParallel wrapper (the model itself stays unwrapped for generate,
           saving and adapters; DDP broadcasts rank 0's weights at construction).
    fsdp2: fully_shard on every decoder layer, then on the root; the model is sharded in place
           (parameters become DTensors), so the optimiser must be built afterwards.
    """
    if not ctx.enabled:
        return model
    if ctx.mode == "ddp":

        dev = next(model.parameters()).device
        kw = {"device_ids": [dev.index]} if dev.type == "cuda" else {}
        # buffers (rotary frequencies) are the same everywhere: synced once at construction, not
        # before every forward (the keyword was broadcast_buffers before torch 2.13)

        sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters \
            else "broadcast_buffers"
        return DDP(model, **{sync_kw: False}, **kw)
    if ctx.mode == "fsdp2":

        broadcast_module(model)
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"distributed={ctx.mode!r}: expected ddp or fsdp2")


@contextlib.contextmanager
def gradient_sync(wrapped, ctx: DistContext, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an optimiser step."""
    if not ctx.enabled or sync:
        if ctx.mode == "fsdp2" and ctx.enabled:
            wrapped.set_requires_gradient_sync(True)
        yield
        return
    if ctx.mode == "ddp":
        with wrapped.no_sync():
            yield
    else:  # fsdp2: accumulate unsharded gradients, reduce-scatter on the last micro-batch
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def full_tensor(x):
    """A DTensor (FSDP2 grad norm, say) as a plain tensor; anything else unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def average_gradients(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Average the .grad of plain (non-DTensor) parameters over ranks, in one flat all-reduce per dtype.

    For trainers whose forwards do not go through the DDP wrapper (PPO: policy and critic in one
    loss). A missing gradient counts as zeros, so every rank sends buffers of the same size.
    """
    if not ctx.enabled:
        return

    plain = [p for p in params if not hasattr(p, "full_tensor")]
    for p in plain:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: Dict[Any, List[torch.Tensor]] = {}
    for p in plain:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    dev = ctx._comm_device()
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads).to(dev)
        dist.all_reduce(flat)
        flat /= ctx.world_size
        for g, synced in zip(grads, _unflatten_dense_tensors(flat.to(grads[0].device), grads)):
            g.copy_(synced)
