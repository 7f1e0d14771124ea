"""torch custom ops of the fused LM head, with fake (meta) implementations and autograd.

    grpo_fast::linear_token_logprobs(hidden, weight, bias, token_ids, temperature,
                                     logit_scale, softcap, with_entropy)
        -> (logp, lse, entropy)                 (B, T) each, float32; no (B, T, V) tensor
    grpo_fast::linear_token_logprobs_backward(...)
        -> (grad_hidden, grad_weight, grad_bias) each recomputed tile by tile

Each op runs the Triton kernels (grpo_fast.kernels.linear_logprobs) or the PyTorch tile
path (_torch_fused); _backend.use_triton decides, and float64 always takes the PyTorch
path. torch.compile sees one opaque op per pass whichever path runs underneath.
Gradients that are not needed come back from the backward op as empty (0,) tensors
(custom ops cannot return None), and autograd turns them into None.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _torch_fused
from ._backend import use_triton


def _impl_for(hidden: Tensor):
    """The module implementing the passes for these inputs (float64 always takes the torch path)."""
    if hidden.dtype != torch.float64 and use_triton(hidden):
        from .. import kernels

        return kernels
    return _torch_fused


def _flat(hidden: Tensor) -> Tensor:
    # (B, T, H) -> (B*T, H): a view for evenly spaced rows, else a copy of the (small) hidden states
    return hidden.reshape(-1, hidden.shape[-1])


@torch.library.custom_op("grpo_fast::linear_token_logprobs", mutates_args=())
def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    token_ids: Tensor,
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
    with_entropy: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    B, T, _ = hidden.shape
    logp, lse, ent = _impl_for(hidden).linear_logprobs_forward(
        _flat(hidden), weight, bias, token_ids.reshape(-1), float(temperature), float(logit_scale),
        None if softcap is None else float(softcap), bool(with_entropy),
    )
    return logp.view(B, T), lse.view(B, T), (ent.view(B, T) if with_entropy else ent)


@linear_token_logprobs.register_fake
def _(hidden, weight, bias, token_ids, temperature, logit_scale, softcap, with_entropy):
    B, T, _ = hidden.shape
    dtype = _torch_fused.compute_dtype(hidden)
    logp = hidden.new_empty((B, T), dtype=dtype)
    lse = hidden.new_empty((B, T), dtype=dtype)
    ent = hidden.new_empty((B, T) if with_entropy else (0,), dtype=dtype)
    return logp, lse, ent


@torch.library.custom_op("grpo_fast::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    token_ids: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor,
    grad_entropy: Optional[Tensor],
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    B, T, H = hidden.shape
    N = B * T
    gh, gw, gb = _impl_for(hidden).linear_logprobs_backward(
        _flat(hidden), weight, bias, token_ids.reshape(N), lse.reshape(N),
        entropy.reshape(N) if grad_entropy is not None else entropy,
        grad_logp.reshape(N), None if grad_entropy is None else grad_entropy.reshape(N),
        float(temperature), float(logit_scale), None if softcap is None else float(softcap),
        bool(need_hidden), bool(need_weight), bool(need_bias),
    )
    empty = hidden.new_empty((0,))
    return (
        empty if gh is None else gh.view(B, T, H),
        weight.new_empty((0,)) if gw is None else gw,
        empty.clone() if gb is None else gb,
    )


@linear_token_logprobs_backward.register_fake
def _(hidden, weight, bias, token_ids, lse, entropy, grad_logp, grad_entropy, temperature, logit_scale,
      softcap, need_hidden, need_weight, need_bias):
    gh = torch.empty(hidden.shape if need_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    gw = torch.empty(weight.shape if need_weight else (0,), dtype=weight.dtype, device=weight.device)
    with_bias = need_bias and bias is not None
    gb = (torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if with_bias
          else hidden.new_empty((0,)))
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, token_ids, temperature, logit_scale, softcap, with_entropy = inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, bias, token_ids, lse, entropy)
    ctx.scalars = (temperature, logit_scale, softcap)
    # unused outputs (the entropy when it carries no gradient, lse always) arrive as None,
    # so the backward skips the entropy term instead of multiplying by zeros
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    hidden, weight, bias, token_ids, lse, entropy = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_h or need_w or need_b):
        return (None,) * 8
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if grad_entropy is not None and (entropy.numel() == 0 or grad_entropy.numel() == 0):
        grad_entropy = None  # no entropy was computed (AOT tracing materialises an empty grad)
    gh, gw, gb = torch.ops.grpo_fast.linear_token_logprobs_backward(
        hidden, weight, bias, token_ids, lse, entropy, grad_logp, grad_entropy, *ctx.scalars,
        bool(need_h), bool(need_w), bool(need_b and bias is not None),
    )
    return (gh if need_h else None, gw if need_w else None, gb if (need_b and bias is not None) else None,
            None, None, None, None, None)


linear_token_logprobs.register_autograd(_backward, setup_context=_setup_context)
