"""The fused LM head: from the backbone's last hidden states and the head's weight (and
bias) straight to per-token log-probs and the policy loss, with no (B, T, V) logits.

    selective_log_softmax_from_hidden(hidden, weight, token_ids, temperature=1.0,
                                      return_entropy=False, *, bias=None, logit_scale=1.0,
                                      final_logit_softcapping=None)
    policy_loss_from_hidden(hidden, weight, token_ids, advantages, mask=None, old_logps=None,
                            ref_logps=None, *, bias=None, logit_scale=1.0,
                            final_logit_softcapping=None, options=None, **option_overrides)

Phase 1 is the custom op grpo_fast::linear_token_logprobs (_fused_ops.py): tiles of
tokens × vocabulary with an online logsumexp, the backward recomputing each tile.
Phase 2 is functional._policy_loss_from_logps, the same (B, T) code that policy_loss
runs: every option of policy_loss (LossOptions) means the same here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _fused_ops  # noqa: F401  (registers the custom ops)
from .functional import (PolicyLossOutput, _check_advantages_and_logps, _check_temperature,
                         _policy_loss_from_logps, _resolve_options, _shape)
from .functional import _check_token_ids as _functional_check_token_ids
from .options import LossOptions

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------- validation

def _check_hidden(hidden) -> None:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"hidden must be float32, bfloat16 or float16 (float64 for checks), got {hidden.dtype}"
        )
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, T, H), got {_shape(hidden)}")


def _check_head(weight, bias, hidden: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor (the lm_head weight), got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {_shape(weight)}")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(
            f"weight has shape {_shape(weight)}, expected (V, H) with H = {H} to match hidden {_shape(hidden)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight has an empty vocabulary dimension: {_shape(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight is {weight.dtype} but hidden is {hidden.dtype}: the head and the hidden states must "
            f"share a dtype (cast one of them, e.g. hidden.to(weight.dtype))"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, hidden on {hidden.device}")
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    V = weight.shape[0]
    if tuple(bias.shape) != (V,):
        raise ValueError(f"bias has shape {_shape(bias)}, expected (V,) = ({V},) to match weight {_shape(weight)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias is {bias.dtype} but weight is {weight.dtype}: expected the same dtype")
    if bias.device != weight.device:
        raise ValueError(f"bias is on {bias.device}, weight on {weight.device}")


def _check_token_ids(token_ids, hidden: Tensor, V: int) -> None:
    # the same rules as policy_loss (int32 / int64 only, values in [0, V)), V from the head
    _functional_check_token_ids(token_ids, hidden, V, ref_name="hidden")


def _check_head_scalars(logit_scale, final_logit_softcapping) -> None:
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale must be a Python number, got {type(logit_scale).__name__}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale={logit_scale!r}: expected a finite number > 0")
    c = final_logit_softcapping
    if c is None:
        return
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(f"final_logit_softcapping must be a Python number or None, got {type(c).__name__}")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"final_logit_softcapping={c!r}: expected a finite number > 0, or None for no soft-cap")


def _check_inputs(hidden, weight, bias, token_ids, logit_scale, final_logit_softcapping) -> None:
    _check_hidden(hidden)
    _check_head(weight, bias, hidden)
    _check_token_ids(token_ids, hidden, weight.shape[0])
    _check_head_scalars(logit_scale, final_logit_softcapping)


def _phase1(hidden, weight, bias, token_ids, temperature, logit_scale, softcap, with_entropy):
    return torch.ops.grpo_fast.linear_token_logprobs(
        hidden, weight, bias, token_ids, float(temperature), float(logit_scale),
        None if softcap is None else float(softcap), bool(with_entropy),
    )


# ---------------------------------------------------------------- public functions

def selective_log_softmax_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    bias: Optional[Tensor] = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: Optional[float] = None,
):
    """Log-probabilities of the chosen tokens from the hidden states and the LM head,
    without ever forming the (B, T, V) logits.

    Args:
        hidden: (B, T, H) float32 / bfloat16 / float16 (float64 for checks), the last hidden
            states at the positions that predict `token_ids`; may be a strided view such as
            ``last_hidden_state[:, :-1]``.
        weight: (V, H) the head (``lm_head.weight``), same dtype and device as hidden.
        token_ids: (B, T) integers in [0, V).
        temperature: the logits are divided by it (> 0), after the scale and the soft-cap.
        return_entropy: also return the entropy of each distribution.
        bias: (V,) the head's bias, or None.
        logit_scale: multiplies h·Wᵀ + b (Cohere's logit_scale; Granite's 1 / logits_scaling).
        final_logit_softcapping: c for z = c·tanh(x / c) (Gemma 2), or None.

    Returns:
        logps (B, T) float32 [, entropy (B, T) float32], differentiable w.r.t. hidden,
        weight and bias (float64 for float64 inputs).

    Equivalent plain torch (which makes float32 (B, T, V) logits and more)::

        x = (hidden.float() @ weight.float().T + bias) * logit_scale
        if final_logit_softcapping is not None:
            x = final_logit_softcapping * torch.tanh(x / final_logit_softcapping)
        z = x / temperature
        logps = z.log_softmax(-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    """
    _check_inputs(hidden, weight, bias, token_ids, logit_scale, final_logit_softcapping)
    _check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    logp, _, entropy = _phase1(hidden, weight, bias, token_ids, temperature, logit_scale,
                               final_logit_softcapping, return_entropy)
    return (logp, entropy) if return_entropy else logp


def policy_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: Optional[float] = None,
    options: Optional[LossOptions] = None,
    **option_overrides,
) -> PolicyLossOutput:
    """`policy_loss` from the hidden states and the LM head: the same loss and metrics,
    without the (B, T, V) logits.

    Args:
        hidden, weight, bias, logit_scale, final_logit_softcapping: the head, as in
            `selective_log_softmax_from_hidden` (hidden (B, T, H), weight (V, H), bias (V,)).
        token_ids, advantages, mask, old_logps, ref_logps: as in `policy_loss`
            ((B, T); advantages (B,) or (B, T)).
        options, **option_overrides: the loss options, as in `policy_loss` (a LossOptions, and
            any of its fields by name replacing its value), temperature included; not
            ``inplace_grad``, which has no logits to act on here.

    Returns:
        PolicyLossOutput: ``loss`` differentiable w.r.t. hidden, weight and bias; the
        metrics detached.

    Equivalent plain torch::

        logits = (hidden @ weight.T + bias) * logit_scale   # then the soft-cap, if any
        out = policy_loss(logits, token_ids, advantages, mask, old_logps, ref_logps, options=options,
                          **option_overrides)
    """
    _check_inputs(hidden, weight, bias, token_ids, logit_scale, final_logit_softcapping)
    _check_advantages_and_logps(advantages, mask, old_logps, ref_logps, hidden, "hidden")  # policy_loss's rules
    if "inplace_grad" in option_overrides:
        raise TypeError("inplace_grad is an option of the logits path only: the fused head has no logits to "
                        "write a gradient into")
    opt = _resolve_options("policy_loss_from_hidden", options, option_overrides, ref_logps, hidden, "hidden")

    logp, _, entropy = _phase1(hidden, weight, bias, token_ids, opt.temperature, logit_scale,
                               final_logit_softcapping, True)
    if opt.entropy_coef == 0.0:
        entropy = entropy.detach()  # no entropy term in the gradient: the backward skips it
    return _policy_loss_from_logps(logp, entropy, advantages, mask, old_logps, ref_logps, opt)
