"""torch custom ops for the logits passes, with fake (meta) implementations and autograd.

    grpo_fast::token_logprobs(logits, token_ids, temperature, with_entropy, inplace_grad)
        -> (logp, lse, entropy)                         one read of the logits
    grpo_fast::token_logprobs_backward(...) -> grad     one read + one write
    grpo_fast::token_logprobs_backward_(logits!, ...)   the same, written into the logits

Each op runs the Triton kernels or the pure-PyTorch path (grpo_fast._backend decides),
so torch.compile sees one opaque op per pass whichever path runs underneath.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _torch_path
from ._backend import use_triton


def _kernels_for(logits: Tensor):
    """The module implementing the passes for these logits (float64 always takes the torch path)."""
    if logits.dtype != torch.float64 and use_triton(logits):
        from .. import kernels

        return kernels
    return _torch_path


def _window(logits: Tensor, t_start: int, t_len: int) -> Tensor:
    """The (B, t_len, V) positions the op works on; t_len < 0 means all of them."""
    if t_start == 0 and (t_len < 0 or t_len == logits.shape[1]):
        return logits
    return logits[:, t_start:t_start + t_len]


@torch.library.custom_op("grpo_fast::token_logprobs", mutates_args=())
def token_logprobs(
    logits: Tensor, token_ids: Tensor, temperature: float, with_entropy: bool, inplace_grad: bool,
    t_start: int = 0, t_len: int = -1,
) -> Tuple[Tensor, Tensor, Tensor]:
    # Works on logits[:, t_start:t_start + t_len]. Taking the whole tensor plus a window
    # (instead of a sliced view) lets the backward return a gradient of the whole tensor:
    # autograd's SliceBackward would otherwise allocate a second logits-sized buffer.
    # inplace_grad only matters to the backward; it is an argument so autograd can see it.
    impl = _kernels_for(logits)
    return impl.token_logprobs_forward(
        _window(logits, t_start, t_len), token_ids, float(temperature), bool(with_entropy)
    )


@token_logprobs.register_fake
def _(logits, token_ids, temperature, with_entropy, inplace_grad, t_start=0, t_len=-1):
    B, T = token_ids.shape
    dtype = _torch_path.compute_dtype(logits)
    logp = logits.new_empty((B, T), dtype=dtype)
    lse = logits.new_empty((B, T), dtype=dtype)
    ent = logits.new_empty((B, T) if with_entropy else (0,), dtype=dtype)
    return logp, lse, ent


@torch.library.custom_op("grpo_fast::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(
    logits: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor,
    grad_entropy: Optional[Tensor],
    temperature: float,
    t_start: int = 0,
    t_len: int = -1,
) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _write_grad(logits, token_ids, lse, entropy, grad_logp, grad_entropy, temperature, t_start, t_len, out)
    return out


@token_logprobs_backward.register_fake
def _(logits, token_ids, lse, entropy, grad_logp, grad_entropy, temperature, t_start=0, t_len=-1):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _write_grad(logits, token_ids, lse, entropy, grad_logp, grad_entropy, temperature, t_start, t_len,
                out: Tensor) -> None:
    """dL/dlogits into `out` (a new buffer, or `logits` itself): the window's gradient from one
    read and one write, and zeros outside the window (a (B, few, V) fill, not a logits-sized one)."""
    window = _window(logits, t_start, t_len)
    _kernels_for(logits).token_logprobs_backward(
        window, token_ids, lse, entropy, grad_logp, grad_entropy, float(temperature),
        _window(out, t_start, t_len),
    )
    t_len = window.shape[1]
    if t_start > 0:
        out[:, :t_start].zero_()
    if t_start + t_len < out.shape[1]:
        out[:, t_start + t_len:].zero_()


@torch.library.custom_op("grpo_fast::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_(
    logits: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor,
    grad_entropy: Optional[Tensor],
    temperature: float,
    t_start: int = 0,
    t_len: int = -1,
) -> None:
    _write_grad(logits, token_ids, lse, entropy, grad_logp, grad_entropy, temperature, t_start, t_len, logits)


@token_logprobs_backward_.register_fake
def _(logits, token_ids, lse, entropy, grad_logp, grad_entropy, temperature, t_start=0, t_len=-1):
    return None


def _setup_context(ctx, inputs, output):
    logits, token_ids, temperature, with_entropy, inplace_grad, t_start, t_len = inputs
    _, lse, entropy = output
    ctx.save_for_backward(logits, token_ids, lse, entropy)
    ctx.temperature = temperature
    ctx.inplace_grad = inplace_grad
    ctx.window = (t_start, t_len)
    # unused outputs (the entropy when entropy_coef == 0, lse always) arrive as None,
    # so the backward can skip the entropy term instead of multiplying by zeros
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    logits, token_ids, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if grad_entropy is not None and (entropy.numel() == 0 or grad_entropy.numel() == 0):
        grad_entropy = None  # no entropy was computed (AOT tracing materialises an empty grad)
    if ctx.inplace_grad:
        torch.ops.grpo_fast.token_logprobs_backward_(
            logits, token_ids, lse, entropy, grad_logp, grad_entropy, ctx.temperature, *ctx.window
        )
        grad = logits
    else:
        grad = torch.ops.grpo_fast.token_logprobs_backward(
            logits, token_ids, lse, entropy, grad_logp, grad_entropy, ctx.temperature, *ctx.window
        )
    return grad, None, None, None, None, None, None


token_logprobs.register_autograd(_backward, setup_context=_setup_context)
