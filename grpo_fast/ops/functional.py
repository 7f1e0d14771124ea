"""The public functional API over logits: `selective_log_softmax` and `policy_loss`.

Every call is two phases (DESIGN.md, "The maths"):
  1. the logits passes (custom op grpo_fast::token_logprobs): per token logp, lse and
     entropy, by the Triton kernels on CUDA or the chunked PyTorch path elsewhere;
  2. the loss from those (B, T) numbers, written once below in plain torch. Autograd
     through phase 2 gives dloss/dlogp and dloss/dH per token, and the backward of
     phase 1 turns them into the logits gradient in one read and one write.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers the custom ops)
from .options import LossOptions

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class PolicyLossOutput(NamedTuple):
    """The loss and its detached diagnostics (scalars are means over the mask)."""

    loss: Tensor  # scalar, differentiable w.r.t. the logits
    logps: Tensor  # (B, T) float32 log-probabilities of the tokens, detached
    kl: Optional[Tensor]  # mean KL(pi || ref) by the chosen estimator; None without ref_logps
    entropy: Tensor  # mean entropy of the (temperature-scaled) distributions
    clip_ratio_low: Tensor  # fraction of tokens with rho < 1 - eps_low and A < 0
    clip_ratio_high: Tensor  # fraction of tokens with rho > 1 + eps_high and A > 0
    clip_ratio_region: Tensor  # low or high


# ---------------------------------------------------------------- validation

def _shape(t) -> str:
    return str(tuple(t.shape))


def _check_logits(logits) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, bfloat16 or float16 (float64 for checks), got {logits.dtype}"
        )
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {_shape(logits)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits has an empty vocabulary dimension: {_shape(logits)}")


def _check_token_ids(token_ids, logits) -> None:
    if not isinstance(token_ids, Tensor):
        raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if tuple(token_ids.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"token_ids has shape {_shape(token_ids)}, expected (B, T) = {tuple(logits.shape[:2])} "
            f"to match logits {_shape(logits)}"
        )
    if token_ids.device != logits.device:
        raise ValueError(f"token_ids is on {token_ids.device}, logits on {logits.device}")
    # a value check needs the data: skipped while torch.compile traces (the op is opaque there)
    if token_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(token_ids)
        V = logits.shape[-1]
        if token_ids.is_cuda:
            # reading the values back would stall the host on every call: assert on the device
            # (a bad id then fails the next synchronising call with a device-side assert)
            torch._assert_async((lo >= 0) & (hi < V), f"token_ids must lie in [0, V) = [0, {V})")
            return
        if int(lo) < 0 or int(hi) >= V:
            raise ValueError(f"token_ids must lie in [0, V) = [0, {V}), got values in [{int(lo)}, {int(hi)}]")


def _check_bt(name: str, t, logits, *, allow_b: bool = False, integer_ok: bool = False) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    B, T = logits.shape[:2]
    ok = tuple(t.shape) == (B, T) or (allow_b and tuple(t.shape) == (B,))
    if not ok:
        want = f"(B,) = ({B},) or (B, T) = ({B}, {T})" if allow_b else f"(B, T) = ({B}, {T})"
        raise ValueError(f"{name} has shape {_shape(t)}, expected {want} to match logits {_shape(logits)}")
    if t.device != logits.device:
        raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    if not integer_ok and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature={temperature!r}: expected a finite number > 0")


def _time_window(logits: Tensor):
    """(tensor, t_start, t_len) for the op: the whole tensor when `logits` is a slice along
    time of a 3-D tensor (e.g. ``out.logits[:, :-1]``), so the backward can produce the
    gradient of that tensor directly, with no second logits-sized buffer from autograd's
    SliceBackward. Eager mode only; under torch.compile the view goes in as it is."""
    base = logits._base
    if base is None or torch.compiler.is_compiling() or base.dim() != 3:
        return logits, 0, -1
    B, T, V = logits.shape
    if (base.shape[0] != B or base.shape[2] != V or base.stride() != logits.stride()
            or base.requires_grad != logits.requires_grad or base.dtype != logits.dtype):
        return logits, 0, -1
    offset = logits.storage_offset() - base.storage_offset()
    st = base.stride(1)
    if st <= 0 or offset < 0 or offset % st or offset // st + T > base.shape[1]:
        return logits, 0, -1
    if logits.requires_grad and not _only_views_between(logits, base):
        return logits, 0, -1  # e.g. a custom Function returning a view: its backward must run
    return base, offset // st, T


# autograd nodes of pure view ops, whose backward only places the gradient in the base
_VIEW_NODES = frozenset({"SliceBackward0", "ViewBackward0", "AliasBackward0", "AsStridedBackward0",
                         "UnsafeViewBackward0"})


def _only_views_between(view: Tensor, base: Tensor) -> bool:
    """True when the autograd path from `view` back to `base` is made of pure view ops only,
    so differentiating w.r.t. `base` directly gives the same gradient."""
    fn = view.grad_fn
    for _ in range(16):
        if fn is None:
            return False
        if base.grad_fn is not None and fn is base.grad_fn:
            return True
        if base.grad_fn is None and type(fn).__name__ == "AccumulateGrad":
            return fn.variable is base
        if type(fn).__name__ not in _VIEW_NODES:
            return False
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return False


# ---------------------------------------------------------------- selective_log_softmax

def selective_log_softmax(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, return_entropy: bool = False
):
    """Log-probabilities of the chosen tokens, without materialising log_softmax.

    Args:
        logits: (B, T, V) float32 / bfloat16 / float16; may be a strided view such as
            ``logits[:, :-1]`` (read in place, no copy).
        token_ids: (B, T) integers in [0, V).
        temperature: the logits are divided by it (> 0).
        return_entropy: also return the entropy of each distribution.

    Returns:
        logps (B, T) float32 [, entropy (B, T) float32]. Differentiable w.r.t. logits.

    Equivalent plain torch (which makes two float32 (B, T, V) copies)::

        z = logits.float() / temperature
        logps = z.log_softmax(-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    """
    _check_logits(logits)
    _check_token_ids(token_ids, logits)
    _check_temperature(temperature)
    whole, t_start, t_len = _time_window(logits)
    logp, _, entropy = torch.ops.grpo_fast.token_logprobs(
        whole, token_ids, float(temperature), bool(return_entropy), False, t_start, t_len
    )
    return (logp, entropy) if return_entropy else logp


# ---------------------------------------------------------------- policy_loss

def _masked_mean(x: Tensor, m: Tensor, count: Tensor) -> Tensor:
    return torch.where(m, x, 0.0).sum() / count


def _policy_loss_from_logps(
    logp: Tensor,
    entropy: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    old_logps: Optional[Tensor],
    ref_logps: Optional[Tensor],
    opt: LossOptions,
) -> PolicyLossOutput:
    """Phase 2: the loss from per-token log-probs and entropies, all (B, T). The maths, once."""
    B, T = logp.shape
    f32 = logp.dtype
    if mask is None:
        m = torch.ones((B, T), dtype=torch.bool, device=logp.device)
        mw = m.to(f32)
    else:
        m = mask != 0
        mw = mask.to(f32)
    A = advantages.to(f32)
    A = A.unsqueeze(1) if A.dim() == 1 else A  # (B, 1) or (B, T)
    # masked positions may hold anything (pads, -inf old logps): zero them before any exp,
    # so neither the loss nor its gradient can pick up inf * 0 = NaN from them
    old = logp.detach() if old_logps is None else old_logps.to(f32)
    log_ratio = torch.where(m, logp - old, 0.0)  # (B, T)
    if opt.importance_sampling_level == "sequence":
        # GSPO: one ratio per sequence, the exp of the mean log-ratio over its tokens
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mw.sum(-1, keepdim=True).clamp(min=1.0))  # (B, 1)
    ratio = torch.exp(log_ratio)
    ratio_clip = torch.clamp(ratio, 1.0 - opt.epsilon_low, 1.0 + opt.eps_high)
    ratio_main = ratio if opt.delta is None else torch.clamp(ratio, max=opt.delta)
    A_m = torch.where(m, A, 0.0) if A.shape[1] == T else A
    pg = -torch.minimum(ratio_main * A_m, ratio_clip * A_m)  # (B, T) or (B, 1) broadcast below
    if opt.clip_ratio_c is not None:
        pg = torch.where(A_m < 0, torch.minimum(pg, -opt.clip_ratio_c * A_m), pg)
    per_token = pg.expand(B, T)
    kl = None
    if ref_logps is not None:
        r = torch.where(m, ref_logps.to(f32) - logp, 0.0)  # log(ref / pi)
        if opt.kl_estimator == "k1":
            kl = -r
        elif opt.kl_estimator == "k2":
            kl = 0.5 * r * r
        else:
            kl = torch.exp(r) - r - 1.0
        if opt.beta != 0.0:
            per_token = per_token + opt.beta * kl
    if opt.entropy_coef != 0.0:
        per_token = per_token - opt.entropy_coef * torch.where(m, entropy, 0.0)

    # every loss_type is a per-token weight w; loss = sum(w * l)
    if opt.loss_type == "grpo":
        w = mw / (mw.sum(-1, keepdim=True).clamp(min=1.0) * B)
    elif opt.loss_type == "bnpo":
        w = mw / mw.sum().clamp(min=1.0)
    elif opt.loss_type == "dr_grpo":
        w = mw / (B * opt.max_completion_length)
    else:  # dapo
        n = opt.num_items_in_batch
        if n is None:
            w = mw / mw.sum().clamp(min=1.0)
        else:
            w = mw / (n.to(f32) if isinstance(n, Tensor) else float(n))
    loss = torch.where(m, w * per_token, 0.0).sum()

    with torch.no_grad():
        count = mw.sum().clamp(min=1.0)
        ratio_d = ratio.detach().expand(B, T)
        low = (ratio_d < 1.0 - opt.epsilon_low) & (A < 0)
        high = (ratio_d > 1.0 + opt.eps_high) & (A > 0)
        mean_kl = None if kl is None else _masked_mean(kl.detach(), m, count)
        out = PolicyLossOutput(
            loss=loss,
            logps=logp.detach(),
            kl=mean_kl,
            entropy=_masked_mean(entropy.detach(), m, count),
            clip_ratio_low=_masked_mean(low.to(f32), m, count),
            clip_ratio_high=_masked_mean(high.to(f32), m, count),
            clip_ratio_region=_masked_mean((low | high).to(f32), m, count),
        )
    return out


def policy_loss(
    logits: Tensor,
    token_ids: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    *,
    loss_type: str = "grpo",
    beta: float = 0.0,
    kl_estimator: str = "k3",
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    clip_ratio_c: Optional[float] = None,
    importance_sampling_level: str = "token",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    inplace_grad: bool = False,
) -> PolicyLossOutput:
    """The GRPO / PPO clipped-surrogate loss straight from the logits.

    Args:
        logits: (B, T, V) float32 / bfloat16 / float16 for the completion tokens (a strided
            view such as ``logits[:, :-1]`` is read without a copy).
        token_ids: (B, T) the sampled tokens, integers in [0, V).
        advantages: (B,) per sequence (GRPO) or (B, T) per token (PPO).
        mask: (B, T) completion mask (bool or 0/1); None means every token counts.
        old_logps: (B, T) log-probs under the sampling policy; None means on-policy
            (ratio 1, the gradient of rho * A).
        ref_logps: (B, T) log-probs under the reference model; needed when beta != 0.
        loss_type: grpo | bnpo | dr_grpo | dapo (weights as in TRL; see DESIGN.md).
        beta, kl_estimator: KL penalty coefficient and estimator k1 | k2 | k3.
        epsilon_low, epsilon_high, delta, clip_ratio_c: ratio clipping (epsilon_high
            defaults to epsilon_low; delta caps the unclipped ratio; clip_ratio_c is the
            dual clip for negative advantages).
        importance_sampling_level: token | sequence (GSPO).
        entropy_coef: subtracts entropy_coef * H per token.
        temperature: the sampling temperature; logits are divided by it.
        max_completion_length: the constant normaliser of dr_grpo.
        num_items_in_batch: dapo's normaliser (number or scalar tensor); the mask sum if None.
        inplace_grad: write the logits gradient into the logits tensor during backward
            (saves a logits-sized buffer; the logits must not be needed afterwards).

    Returns:
        PolicyLossOutput(loss, logps, kl, entropy, clip_ratio_low, clip_ratio_high,
        clip_ratio_region): ``loss`` is differentiable w.r.t. the logits, the rest detached.

    Equivalent plain torch for the default options (TRL's formulation)::

        logps = selective_log_softmax(logits, token_ids)
        ratio = torch.exp(logps - old_logps)            # old_logps = logps.detach() if None
        A = advantages.unsqueeze(1)
        per_token = -torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    """
    _check_logits(logits)
    _check_token_ids(token_ids, logits)
    _check_temperature(temperature)
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    _check_bt("advantages", advantages, logits, allow_b=True)
    _check_bt("mask", mask, logits, integer_ok=True)
    _check_bt("old_logps", old_logps, logits)
    _check_bt("ref_logps", ref_logps, logits)
    opt = LossOptions(
        loss_type=loss_type,
        beta=beta,
        kl_estimator=kl_estimator,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        clip_ratio_c=clip_ratio_c,
        importance_sampling_level=importance_sampling_level,
        entropy_coef=entropy_coef,
        temperature=float(temperature),
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    if opt.beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={opt.beta} needs ref_logps (the reference model's log-probs), got None")
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad must be a bool, got {type(inplace_grad).__name__}")

    whole, t_start, t_len = _time_window(logits)
    logp, _, entropy = torch.ops.grpo_fast.token_logprobs(
        whole, token_ids, float(temperature), True, inplace_grad, t_start, t_len
    )
    if opt.entropy_coef == 0.0:
        entropy = entropy.detach()  # no entropy term in the gradient: the backward skips it
    return _policy_loss_from_logps(logp, entropy, advantages, mask, old_logps, ref_logps, opt)
