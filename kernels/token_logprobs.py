"""Per-token log-probabilities (and entropy) of the chosen tokens, and their
gradient with respect to the logits, in one pass over the (B, T, V) logits each.

Forward (one read of the logits), with z = logits / temperature:
    lse = logsumexp(z), logp = z[id] - lse, entropy = lse - sum(softmax(z) * z)
Backward (one read, one write, in place when out is logits):
    grad_logits = (grad_logp * (onehot(id) - p) - grad_entropy * p * (log p + H)) / temperature

Plain torch equivalent (what the tests compare against, in float64):
    z = logits.double() / temperature
    lse = z.logsumexp(-1); logp = z.gather(-1, ids[..., None])[..., 0] - lse
    entropy = lse - (z.softmax(-1) * z).sum(-1)

Launch: a 1-D grid with one program per (b, t) row; the row's int64 offset is
computed from b = row // T, t = row % T and the strides, so views such as
logits[:, :-1] need no copy and B*T*V may exceed 2^31. T, V and the strides are
runtime arguments and not specialised (do_not_specialize): one compiled kernel
per (dtype, HAS_* flags) serves every completion length.

The kernels take a unit vocab stride (every Hugging Face logits tensor, and any
view of one that keeps the last dimension): the addresses of a block are then a
base plus constants, which keeps registers low. A tensor with stride(-1) != 1 is
copied by the launchers (and the gradient copied back into `out`): correct, at
the price of that copy, for layouts nobody produces in practice.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import (
    block_ptrs,
    gather_token,
    launch_config,
    load_block,
    online_lse_finish,
    online_lse_update,
    row_offset,
    rows_aligned,
)

_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ID_DTYPES = (torch.int32, torch.int64)
# Shape-dependent integers that must not create compiled variants (Triton would
# otherwise specialise them on == 1 and on divisibility by 16).
_FWD_SHAPE_ARGS = ["T", "V", "stride_lb", "stride_lt"]
_BWD_SHAPE_ARGS = _FWD_SHAPE_ARGS + ["stride_ob", "stride_ot"]


@triton.jit(do_not_specialize=_FWD_SHAPE_ARGS)
def _token_logprobs_fwd_kernel(
    # pointers
    LOGITS,  # (B, T, V) fp32/bf16/fp16, strides (stride_lb, stride_lt, 1)
    TOKEN_IDS,  # (B, T) int32/int64, contiguous
    LOGP,  # (B, T) float32, contiguous, written
    LSE,  # (B, T) float32, contiguous, written
    ENTROPY,  # (B, T) float32, contiguous, written if HAS_ENTROPY
    # sizes
    T,
    V,
    # strides of LOGITS, in elements (int64: B*T*V may exceed 2^31)
    stride_lb: tl.int64,
    stride_lt: tl.int64,
    # scalars
    inv_temperature,  # 1 / temperature
    # constexprs
    BLOCK_V: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_ALIGNED_ROWS: tl.constexpr,  # see _common.rows_aligned
):
    row = tl.program_id(0).to(tl.int64)
    row_off = row_offset(row, T, stride_lb, stride_lt)
    cols0 = tl.arange(0, BLOCK_V)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sz = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        z = load_block(LOGITS, row_off, start + cols0, V, inv_temperature, HAS_ALIGNED_ROWS)
        m, s, sz = online_lse_update(z, m, s, sz, HAS_ENTROPY)
    lse, entropy = online_lse_finish(m, s, sz, HAS_ENTROPY)

    token = tl.load(TOKEN_IDS + row)
    z_token = gather_token(LOGITS, row_off, token, inv_temperature)
    tl.store(LOGP + row, z_token - lse)
    tl.store(LSE + row, lse)
    if HAS_ENTROPY:
        tl.store(ENTROPY + row, entropy)


# d logp / dz_j = onehot_j - p_j ;  d H / dz_j = -p_j (log p_j + H), with log p_j = z_j - lse
# grad_logits_j = (grad_logp * (onehot_j - p_j) - grad_entropy * p_j * (log p_j + H)) / temperature
@triton.jit(do_not_specialize=_BWD_SHAPE_ARGS)
def _token_logprobs_bwd_kernel(
    # pointers
    LOGITS,  # (B, T, V) fp32/bf16/fp16, strides (stride_lb, stride_lt, 1)
    TOKEN_IDS,  # (B, T) int32/int64, contiguous
    LSE,  # (B, T) float32, contiguous (saved by the forward)
    ENTROPY,  # (B, T) float32, contiguous (saved by the forward), read if HAS_ENTROPY_GRAD
    GRAD_LOGP,  # (B, T) float32, contiguous
    GRAD_ENTROPY,  # (B, T) float32, contiguous, read if HAS_ENTROPY_GRAD
    OUT,  # (B, T, V) logits dtype, strides (stride_ob, stride_ot, 1), written; may be LOGITS itself
    # sizes
    T,
    V,
    # strides of LOGITS and OUT, in elements
    stride_lb: tl.int64,
    stride_lt: tl.int64,
    stride_ob: tl.int64,
    stride_ot: tl.int64,
    # scalars
    inv_temperature,  # 1 / temperature
    # constexprs
    BLOCK_V: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    HAS_ALIGNED_ROWS: tl.constexpr,  # see _common.rows_aligned (both LOGITS and OUT)
):
    row = tl.program_id(0).to(tl.int64)
    l_off = row_offset(row, T, stride_lb, stride_lt)
    o_off = row_offset(row, T, stride_ob, stride_ot)
    cols0 = tl.arange(0, BLOCK_V)

    token = tl.load(TOKEN_IDS + row).to(tl.int64)
    lse = tl.load(LSE + row)
    g_logp = tl.load(GRAD_LOGP + row)
    if HAS_ENTROPY_GRAD:
        entropy = tl.load(ENTROPY + row)
        g_ent = tl.load(GRAD_ENTROPY + row)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        # Each block is read, then written: safe in place (OUT == LOGITS).
        z = load_block(LOGITS, l_off, cols, V, inv_temperature, HAS_ALIGNED_ROWS)
        log_p = z - lse
        p = tl.exp(log_p)
        if HAS_ENTROPY_GRAD:
            # p * (log p + H) is 0 where p == 0 (-inf logits), not 0 * -inf
            coef = g_logp + g_ent * tl.where(p > 0.0, log_p + entropy, 0.0)
        else:
            coef = g_logp
        grad = tl.where(cols == token, g_logp, 0.0) - p * coef
        out_ptrs, mask = block_ptrs(OUT, o_off, cols, V, HAS_ALIGNED_ROWS)
        tl.store(out_ptrs, (grad * inv_temperature).to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# launchers


def _check_logits(name: str, logits: torch.Tensor, token_ids: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"{name}: expected a (B, T, V) tensor, got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"{name}: dtype {logits.dtype}, expected one of {_LOGITS_DTYPES}")
    if token_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"token_ids: shape {tuple(token_ids.shape)}, expected (B, T) = {tuple(logits.shape[:2])}"
        )
    if token_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"token_ids: dtype {token_ids.dtype}, expected int32 or int64")
    if token_ids.device != logits.device:
        raise ValueError(f"token_ids on {token_ids.device}, logits on {logits.device}")


def _inv_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature: {temperature}, expected > 0")
    return 1.0 / temperature


def _row_tensor(name: str, x: torch.Tensor, shape: torch.Size, device) -> torch.Tensor:
    """A (B, T) float32 input made contiguous (it is small; the kernels index it by row)."""
    if x.shape != shape or x.dtype != torch.float32 or x.device != device:
        raise ValueError(
            f"{name}: {tuple(x.shape)} {x.dtype} on {x.device}, expected {tuple(shape)} float32 on {device}"
        )
    return x.contiguous()


class Launch(NamedTuple):
    """One kernel launch, built without running it (tests compute the JIT's
    specialization key from it, and can compile it for a GPU target offline)."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def _forward_launch(logits, token_ids, temperature, with_entropy):
    """Validate, allocate the outputs and build the forward launch (None when B*T == 0)."""
    _check_logits("logits", logits, token_ids)
    inv_t = _inv_temperature(temperature)
    B, T, V = logits.shape
    logp = torch.empty((B, T), dtype=torch.float32, device=logits.device)  # (B, T)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty((0,))
    if B * T == 0:
        return (logp, lse, entropy), None
    if V == 0:
        raise ValueError("logits: V = 0, expected at least one vocabulary entry")
    if logits.stride(2) != 1:
        logits = logits.contiguous()  # see the module docstring: exotic layouts pay a copy
    cfg = launch_config(V, logits.dtype)
    args = (
        logits, token_ids.contiguous(), logp, lse, entropy if with_entropy else lse,
        T, V,
        logits.stride(0), logits.stride(1),
        inv_t,
    )  # fmt: skip
    kwargs = dict(
        BLOCK_V=cfg.BLOCK_V,
        HAS_ENTROPY=bool(with_entropy),
        HAS_ALIGNED_ROWS=rows_aligned(logits),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return (logp, lse, entropy), Launch(_token_logprobs_fwd_kernel, (B * T,), args, kwargs)


def _backward_launch(logits, token_ids, lse, entropy, grad_logp, grad_entropy, temperature, out):
    """Validate and build the backward launch (None when there is nothing to write).

    Returns (launch, finish): run launch(), then finish() (copies the gradient
    into `out` when out has a non-unit vocab stride and a unit-stride stand-in
    was written instead)."""
    _check_logits("logits", logits, token_ids)
    if out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(
            f"out: {tuple(out.shape)} {out.dtype} on {out.device}, "
            f"expected {tuple(logits.shape)} {logits.dtype} on {logits.device}"
        )
    if torch._debug_has_internal_overlap(out) == 1:
        raise ValueError("out: has overlapping elements (e.g. an expanded tensor); cannot write a gradient into it")
    inv_t = _inv_temperature(temperature)
    B, T, V = logits.shape
    if B * T == 0 or V == 0:
        return None, None
    shape = logits.shape[:2]
    lse = _row_tensor("lse", lse, shape, logits.device)
    grad_logp = _row_tensor("grad_logp", grad_logp, shape, logits.device)
    has_entropy_grad = grad_entropy is not None
    if has_entropy_grad:
        entropy = _row_tensor("entropy", entropy, shape, logits.device)
        grad_entropy = _row_tensor("grad_entropy", grad_entropy, shape, logits.device)
    else:
        # never read: stand-ins that keep the pointer types of the signature
        entropy = grad_entropy = lse
    # Non-unit vocab strides (see the module docstring): copy the logits (before
    # anything is written: out may alias them) and write into a unit-stride
    # stand-in (our copy of the logits when there is one), copied into out after.
    target, finish, own_copy = out, None, False
    if logits.stride(2) != 1:
        logits, own_copy = logits.contiguous(), True
    if out.stride(2) != 1:
        target = logits if own_copy else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        finish = lambda: out.copy_(target)  # noqa: E731
    cfg = launch_config(V, logits.dtype)
    args = (
        logits, token_ids.contiguous(), lse, entropy, grad_logp, grad_entropy, target,
        T, V,
        logits.stride(0), logits.stride(1),
        target.stride(0), target.stride(1),
        inv_t,
    )  # fmt: skip
    kwargs = dict(
        BLOCK_V=cfg.BLOCK_V,
        HAS_ENTROPY_GRAD=has_entropy_grad,
        HAS_ALIGNED_ROWS=rows_aligned(logits, target),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return Launch(_token_logprobs_bwd_kernel, (B * T,), args, kwargs), finish


def token_logprobs_forward(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, with_entropy: bool):
    """(B, T, V) logits, (B, T) ids -> (logp, lse, entropy), float32 contiguous (B, T).

    logits: float32/bfloat16/float16, any strides (e.g. logits[:, :-1]); token_ids:
    int32/int64 in [0, V) (not checked here). entropy is an empty float32 tensor of
    shape (0,) when with_entropy is False. Reads the logits once; no (B, T, V)
    temporaries.
    """
    outputs, launch = _forward_launch(logits, token_ids, temperature, with_entropy)
    if launch is not None:
        launch()
    return outputs


def token_logprobs_backward(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write d loss / d logits into `out` and return it.

    out: (B, T, V) of the logits' dtype, any non-overlapping strides; it may be
    `logits` itself (in-place gradient: every block is read before it is written).
    With out.stride(-1) != 1 the gradient goes through a contiguous stand-in.
    lse, entropy: from token_logprobs_forward; grad_logp, grad_entropy: (B, T)
    float32 upstream gradients (any strides). grad_entropy None skips the entropy
    term at compile time (entropy may then be the empty tensor). One read of the
    logits, one write of out.
    """
    launch, finish = _backward_launch(logits, token_ids, lse, entropy, grad_logp, grad_entropy, temperature, out)
    if launch is not None:
        launch()
    if finish is not None:
        finish()
    return out
