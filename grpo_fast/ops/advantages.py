"""Group advantages (GRPO / RLOO) and GAE, computed by the C++ core ``grpo_fast._C``.

Three steps per op:
  1. ``_launch_*``: hands contiguous, validated tensors to the C++ core as raw
     pointers (CPU code, or CUDA code on torch's current stream, no host sync).
  2. ``grpo_fast::group_advantages`` / ``grpo_fast::gae``: torch custom ops around
     the launchers, with fake implementations, so ``torch.compile`` and
     ``torch.library.opcheck`` see ordinary ops.
  3. ``group_advantages`` / ``gae``: the public functions. They validate once, then
     call the launcher directly in plain eager mode (the dispatcher round trip of a
     custom op costs more than the computation at rollout sizes) and the custom op
     whenever torch.compile is tracing, a dispatch mode or functorch transform is
     active, or a tensor subclass comes in.

Outputs never require grad: advantages are targets, not functions of the policy.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _C

__all__ = ["group_advantages", "gae"]

# codes shared with csrc/common.h
_ESTIMATORS = {"grpo": 0, "rloo": 1}
_SCALES = {"group": 0, "batch": 1, "none": 2}
_FLOAT_CODES = {torch.float32: 0, torch.float64: 1}
_MASK_CODES = {torch.bool: 0, torch.uint8: 0, torch.int32: 1, torch.int64: 2,
               torch.float32: 3, torch.float64: 4}

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def _direct(*tensors) -> bool:
    """True when the launcher may be called directly instead of through the custom op."""
    for t in tensors:
        if t is not None and type(t) is not _Tensor:
            return False
    return not (_is_compiling() or _dispatch_stack_len() or _functorch_active())


def _check_cuda(t: torch.Tensor, what: str) -> None:
    if not t.is_cuda:
        raise ValueError(f"{what} runs on CPU and CUDA tensors, got a tensor on {t.device}")
    if not _C.has_cuda():
        # No silent fallback to a torch implementation: a build without CUDA is a
        # packaging mistake worth hearing about, and the fix is a rebuild.
        raise RuntimeError(
            f"{what} got CUDA tensors, but grpo_fast._C was built without CUDA (no CUDA "
            "toolkit was found when it was built). Reinstall with nvcc on PATH (pip install "
            "--no-build-isolation -e . ; -C cmake.define.GRPO_FAST_CUDA=ON makes a missing "
            "toolkit an error), or move the tensors to the CPU.")


# --------------------------------------------------------------------------- launchers

def _launch_group_advantages(rewards: torch.Tensor, group_size: Optional[int],
                             group_offsets: Optional[torch.Tensor], estimator: str, scale: str,
                             eps: float) -> torch.Tensor:
    # rewards: contiguous (N,) float32/float64; group_offsets: contiguous int64 on the
    # same device, or None (then group_size divides N).
    n = rewards.shape[0]
    out = torch.empty_like(rewards, dtype=torch.float32)
    if group_offsets is None:
        gs = group_size
        groups = n // gs
        off_ptr = 0
    else:
        gs = 0
        groups = group_offsets.shape[0] - 1
        off_ptr = group_offsets.data_ptr()
    est = _ESTIMATORS[estimator]
    sc = _SCALES[scale]
    code = _FLOAT_CODES[rewards.dtype]
    if rewards.is_cpu:
        # the C++ pass that reads every reward also finds the first infinite one (no extra pass)
        bad = _C.group_advantages_cpu(code, rewards.data_ptr(), n, off_ptr, gs, groups, est, sc,
                                      eps, out.data_ptr())
        if bad >= 0:  # an inf would zero its whole group (or, with scale="batch", the batch)
            raise ValueError(f"rewards[{bad}] = {float(rewards[bad])}: rewards must be finite "
                             "(NaN marks a missing reward)")
        return out
    _check_cuda(rewards, "group_advantages")
    workspace = 0
    if sc == _SCALES["batch"] and groups > 0:
        # per-group moments and the batch std, from torch's caching allocator
        ws = torch.empty(3 * groups + 1, dtype=torch.float64, device=rewards.device)
        workspace = ws.data_ptr()
    device = rewards.device.index
    stream = torch.cuda.current_stream(device).cuda_stream
    _C.group_advantages_cuda(code, rewards.data_ptr(), n, off_ptr, gs, groups, est, sc,
                             eps, out.data_ptr(), workspace, device, stream)
    # `ws` stays alive until the kernels that read it are queued; the caching allocator
    # is stream-ordered, so freeing it after the launch is safe.
    return out


def _launch_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    # all (B, T) contiguous on one device; rewards/values float32 or float64 alike;
    # mask bool/uint8/int32/int64/float32/float64.
    batch, length = rewards.shape
    advantages = torch.empty_like(rewards)
    returns = torch.empty_like(rewards)
    code = _FLOAT_CODES[rewards.dtype]
    mask_code = _MASK_CODES[mask.dtype]
    if rewards.is_cpu:
        _C.gae_cpu(code, rewards.data_ptr(), values.data_ptr(), mask_code, mask.data_ptr(),
                   batch, length, gamma, lam, advantages.data_ptr(), returns.data_ptr())
        return advantages, returns
    _check_cuda(rewards, "gae")
    device = rewards.device.index
    stream = torch.cuda.current_stream(device).cuda_stream
    _C.gae_cuda(code, rewards.data_ptr(), values.data_ptr(), mask_code, mask.data_ptr(), batch,
                length, gamma, lam, advantages.data_ptr(), returns.data_ptr(),
                device, stream)
    return advantages, returns


# --------------------------------------------------------------------------- custom ops

_group_advantages_op = torch.library.custom_op(
    "grpo_fast::group_advantages", _launch_group_advantages, mutates_args=(),
    schema="(Tensor rewards, int? group_size, Tensor? group_offsets, str estimator, "
           "str scale, float eps) -> Tensor")


@_group_advantages_op.register_fake
def _(rewards, group_size, group_offsets, estimator, scale, eps):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


_gae_op = torch.library.custom_op(
    "grpo_fast::gae", _launch_gae, mutates_args=(),
    schema="(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) "
           "-> (Tensor, Tensor)")


@_gae_op.register_fake
def _(rewards, values, mask, gamma, lam):
    return torch.empty_like(rewards), torch.empty_like(rewards)


# --------------------------------------------------------------------------- validation

def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _as_real(name: str, t, *, allow_convert: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype in _FLOAT_CODES:
        return t
    if allow_convert and not t.is_complex():
        return t.to(torch.float32)
    raise TypeError(f"{name} must be float32 or float64"
                    + (" (or a real dtype, converted to float32)" if allow_convert else "")
                    + f", got {t.dtype}")


def _check_offsets(group_offsets, rewards: torch.Tensor) -> torch.Tensor:
    if not isinstance(group_offsets, torch.Tensor):
        raise TypeError(f"group_offsets must be a torch.Tensor of int64, "
                        f"got {type(group_offsets).__name__}")
    n = rewards.shape[0]
    if group_offsets.dim() != 1 or group_offsets.shape[0] < 1:
        raise ValueError(f"group_offsets must be 1-D with at least one entry (groups + 1), "
                         f"got {_describe(group_offsets)}")
    if group_offsets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"group_offsets must be int64 (or int32), got {group_offsets.dtype}")
    if group_offsets.device != rewards.device:
        raise ValueError(f"group_offsets is on {group_offsets.device} but rewards is on "
                         f"{rewards.device}")
    group_offsets = group_offsets.to(torch.int64).contiguous()
    if group_offsets.device.type == "cpu":
        # Values are checked only on the CPU: on a GPU the check would synchronise the
        # host with the device. The CUDA kernels clamp offsets into [0, N] instead.
        first, last = int(group_offsets[0]), int(group_offsets[-1])
        if first != 0 or last != n:
            raise ValueError(f"group_offsets must run from 0 to N = {n} (len(rewards)), "
                             f"got offsets[0] = {first}, offsets[-1] = {last}")
        if group_offsets.shape[0] > 1 and bool((group_offsets[1:] < group_offsets[:-1]).any()):
            i = int((group_offsets[1:] < group_offsets[:-1]).nonzero()[0])
            raise ValueError(f"group_offsets must be non-decreasing, got offsets[{i}] = "
                             f"{int(group_offsets[i])} > offsets[{i + 1}] = "
                             f"{int(group_offsets[i + 1])}")
    return group_offsets


def _check_unit(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(x).__name__}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return float(x)


# --------------------------------------------------------------------------- public API

def group_advantages(rewards: torch.Tensor, group_size: Optional[int] = None, *,
                     group_offsets: Optional[torch.Tensor] = None, estimator: str = "grpo",
                     scale: Optional[str] = None, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of GRPO / RLOO, one C++ (or CUDA) pass.

    Args:
        rewards: (N,) float32 or float64. Other real dtypes (int, bool, float16,
            bfloat16) are converted to float32 first. NaN marks a missing reward: it
            is left out of every statistic and gets advantage 0. +-inf: on CPU a
            ValueError naming the first such index (found by the C++ pass that reads
            every reward, no extra pass); on CUDA, where raising would need a host
            sync, the advantages of its group (with scale="batch": of every group
            with a learning signal) come out NaN / inf, never a plausible number,
            so the loss and the trainers' non-finite guard see it.
        group_size: every group has this many consecutive rewards (N % group_size == 0).
        group_offsets: instead of group_size, variable groups as CSR offsets: int64
            (int32 is converted), shape (groups + 1,), non-decreasing from 0 to N; group
            g is rewards[offsets[g]:offsets[g + 1]] and may be empty. Checked on the
            CPU only: CUDA offsets are not read by the host (no sync); bad ones are
            clamped into [0, N] by the kernel, so they give wrong numbers, not crashes.
        estimator: "grpo": baseline = group mean; "rloo": baseline = mean of the
            *other* members of the group.
        scale: the divisor of the centred reward: "group" = std of the group,
            "batch" = std of all non-NaN rewards of the batch (the mean stays the
            group's, as TRL's scale_rewards="batch"), "none" = no division (Dr. GRPO).
            None (default) means "group" for grpo and "none" for rloo, so each
            estimator's default is its textbook form (docs/design.md); an explicit scale
            applies to either estimator.
        eps: added to the std (>= 0).

    Returns:
        (N,) float32 (whatever the input's float dtype; computed in float64), on the
        rewards' device. Groups of one and groups whose rewards are all equal get 0,
        never NaN, even with eps = 0.

    Equivalent plain torch for fixed groups without NaNs (std is Bessel-corrected):

        r = rewards.double().view(-1, group_size)
        mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)
        adv = r - mean                                       # grpo
        adv = (r - (r.sum(1, keepdim=True) - r) / (group_size - 1))   # rloo
        adv = adv / (std + eps)                              # scale="group"
        adv = adv / (rewards.double().std() + eps)           # scale="batch"
        adv = adv.view(-1).float()
    """
    if type(rewards) is not _Tensor or rewards.dtype not in _FLOAT_CODES:
        rewards = _as_real("rewards", rewards, allow_convert=True)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got {_describe(rewards)}")
    n = rewards.shape[0]
    if group_offsets is None:
        if group_size is None:
            raise ValueError("pass exactly one of group_size and group_offsets, got neither")
        if type(group_size) is not int:
            if isinstance(group_size, bool) or not isinstance(group_size, int):
                raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
            group_size = int(group_size)
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if n % group_size:
            raise ValueError(f"rewards has N = {n} elements, not divisible by "
                             f"group_size = {group_size}")
    else:
        if group_size is not None:
            raise ValueError(f"pass exactly one of group_size and group_offsets, got both "
                             f"(group_size = {group_size})")
        group_offsets = _check_offsets(group_offsets, rewards)
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, _ESTIMATORS))}, "
                         f"got {estimator!r}")
    if scale is None:
        scale = "none" if estimator == "rloo" else "group"
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {', '.join(map(repr, _SCALES))}, got {scale!r}")
    if type(eps) is not float:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"eps must be a float, got {type(eps).__name__}")
        eps = float(eps)
    if not eps >= 0.0:  # also rejects NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.requires_grad:
        rewards = rewards.detach()
    if not rewards.is_contiguous():
        rewards = rewards.contiguous()
    if _direct(rewards, group_offsets):
        return _launch_group_advantages(rewards, group_size, group_offsets, estimator, scale,
                                        eps)
    return _group_advantages_op(rewards, group_size, group_offsets, estimator, scale, eps)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over masked token sequences (PPO), in C++ / CUDA.

    Args:
        rewards: (B, T) float32 or float64 per-token rewards.
        values: (B, T), same dtype as rewards: the value model's estimates.
        mask: (B, T) bool, uint8, int32, int64 (e.g. an attention mask), float32 or
            float64; nonzero = token in the sequence. Left padding, right padding and
            holes all work: masked-out tokens are skipped by the scan. Other dtypes
            are compared with 0 first.
        gamma, lam: discount and GAE lambda, in [0, 1].

    Returns:
        (advantages, returns), each (B, T) in the dtype of rewards (accumulated in
        float64); masked-out tokens get 0 in both.

    Equivalent plain torch/Python, per sequence b (next = the next masked-in token):

        adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
        next_v = next_a = 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                delta = rewards[b, t] + gamma * next_v - values[b, t]
                next_a = delta + gamma * lam * next_a
                adv[b, t], ret[b, t] = next_a, next_a + values[b, t]
                next_v = values[b, t]
    """
    rewards = _as_real("rewards", rewards, allow_convert=False)
    values = _as_real("values", values, allow_convert=False)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D (B, T), got {_describe(rewards)}")
    if values.shape != rewards.shape:
        raise ValueError(f"values must have the shape of rewards {tuple(rewards.shape)}, "
                         f"got {_describe(values)}")
    if mask.shape != rewards.shape:
        raise ValueError(f"mask must have the shape of rewards {tuple(rewards.shape)}, "
                         f"got {_describe(mask)}")
    if values.dtype != rewards.dtype:
        raise TypeError(f"values must have the dtype of rewards ({rewards.dtype}), "
                        f"got {values.dtype}")
    if values.device != rewards.device or mask.device != rewards.device:
        raise ValueError(f"rewards, values and mask must be on one device, got "
                         f"{rewards.device}, {values.device}, {mask.device}")
    gamma = _check_unit("gamma", gamma)
    lam = _check_unit("lam", lam)
    if mask.dtype not in _MASK_CODES:
        if mask.is_complex():
            raise TypeError(f"mask must be bool, integer or real, got {mask.dtype}")
        mask = mask != 0
    rewards, values, mask = (t.detach().contiguous() for t in (rewards, values, mask))
    if _direct(rewards, values, mask):
        return _launch_gae(rewards, values, mask, gamma, lam)
    return _gae_op(rewards, values, mask, gamma, lam)
