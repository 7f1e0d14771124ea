"""The fused LM head: per-token log-probabilities (and entropy) from the hidden states and
the head's weight (and bias), and their gradients, with the logits tile kept in registers.

With y = h·Wᵀ + b, z = softcap(y·logit_scale) / temperature (softcap(x) = c·tanh(x/c) when set):
Forward: one program per BLOCK_N tokens walks the vocabulary in BLOCK_V steps; each
    (BLOCK_N, BLOCK_V) tile is tl.dot over H in BLOCK_K steps (float32 accumulation),
    transformed, and folded into per-token running statistics (online logsumexp and
    entropy, _common.online_lse_update_rows). The tile is never written to memory.
    Outputs logp = z[id] − lse, lse, entropy, (N,) float32.
Backward: one program per (token block, vocabulary block) recomputes its tile, forms
    dL/dy (formula above the kernel) and adds its products into float32 gradients:
    grad_h[tokens] += dL/dy · W[vocab],  grad_W[vocab] += (dL/dy)ᵀ · h[tokens],
    grad_b[vocab] += Σ_tokens dL/dy, by atomic adds (the programs of one token block
    run over different vocabulary blocks, and vice versa). The float32 sums are cast
    to the inputs' dtype once, by the launcher: no per-tile rounding to bfloat16. The
    order of the atomic adds is not fixed, so the gradients are not bit-reproducible
    from run to run (as in Cut Cross-Entropy's backward).

Plain torch equivalent (what the tests compare against, in float64):
    z = softcap((h.double() @ W.double().T + b) * logit_scale) / temperature
    lse = z.logsumexp(-1); logp = z.gather(-1, ids[:, None])[:, 0] - lse
    entropy = lse - (z.softmax(-1) * z).sum(-1)

N, V, H and the strides are runtime arguments (do_not_specialize): one compiled kernel
per (dtype, HAS_* flags, block sizes) serves every batch. Row offsets are int64.
float32 inputs use IEEE float32 dot products (not TF32), matching torch's default matmul.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import head_transform, linear_launch_config, online_lse_finish, online_lse_update_rows

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ID_DTYPES = (torch.int32, torch.int64)
_SHAPE_ARGS = ["N", "V", "H", "stride_hn", "stride_hk", "stride_wv", "stride_wk"]


@triton.jit
def _operand(x, DOT_IN_FP32: tl.constexpr):
    """A tl.dot operand: as loaded (bf16/fp16 tensor-core dots with float32 accumulation), or
    widened to float32 (exactly) where half-precision dots are not available: Triton's
    interpreter computes bf16 tl.dot wrongly, so the CPU tests run the dots in float32 on the
    same bf16 values, which gives the same products."""
    if DOT_IN_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logits_tile(HIDDEN, WEIGHT, BIAS, offs_n, offs_v, N, V, H, stride_hn, stride_hk, stride_wv, stride_wk,
                 logit_scale, softcap, inv_temperature,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 DOT_IN_FP32: tl.constexpr):
    """The (BLOCK_N, BLOCK_V) float32 tile z of tokens offs_n x vocabulary offs_v, -inf past V,
    and t = tanh(y·logit_scale / c) for the soft-cap's derivative."""
    n_mask = offs_n < N
    v_mask = offs_v < V
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < H
        h = tl.load(HIDDEN + offs_n[:, None] * stride_hn + offs_k[None, :] * stride_hk,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        w = tl.load(WEIGHT + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                    mask=v_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_V, BLOCK_K)
        acc = tl.dot(_operand(h, DOT_IN_FP32), tl.trans(_operand(w, DOT_IN_FP32)), acc,
                     input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    z, t = head_transform(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    z = tl.where(v_mask[None, :], z, float("-inf"))
    return z, t


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _linear_logprobs_fwd_kernel(
    # pointers
    HIDDEN,  # (N, H) fp32/bf16/fp16, strides (stride_hn, stride_hk)
    WEIGHT,  # (V, H) same dtype, strides (stride_wv, stride_wk)
    BIAS,  # (V,) same dtype, contiguous; read if HAS_BIAS
    TOKEN_IDS,  # (N,) int32/int64, contiguous
    LOGP,  # (N,) float32, written
    LSE,  # (N,) float32, written
    ENTROPY,  # (N,) float32, written if HAS_ENTROPY
    # sizes
    N,
    V,
    H,
    # strides, in elements
    stride_hn: tl.int64,
    stride_hk: tl.int64,
    stride_wv: tl.int64,
    stride_wk: tl.int64,
    # scalars
    logit_scale,
    softcap,  # c of the soft-cap (ignored without HAS_SOFTCAP)
    inv_temperature,  # 1 / temperature
    # constexprs
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs
    DOT_IN_FP32: tl.constexpr,  # widen half-precision dot operands (the interpreter); see _operand
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    ids = tl.load(TOKEN_IDS + offs_n, mask=n_mask, other=0).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)
    z_tok = tl.zeros((BLOCK_N,), tl.float32)
    offs_v0 = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + offs_v0.to(tl.int64)
        z, _ = _logits_tile(HIDDEN, WEIGHT, BIAS, offs_n, offs_v, N, V, H, stride_hn, stride_hk, stride_wv,
                            stride_wk, logit_scale, softcap, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_K,
                            HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, DOT_IN_FP32)
        z_tok += tl.sum(tl.where(offs_v[None, :] == ids[:, None], z, 0.0), axis=1)
        m, s, sz = online_lse_update_rows(z, m, s, sz, HAS_ENTROPY)
    lse, entropy = online_lse_finish(m, s, sz, HAS_ENTROPY)
    tl.store(LOGP + offs_n, z_tok - lse, mask=n_mask)
    tl.store(LSE + offs_n, lse, mask=n_mask)
    if HAS_ENTROPY:
        tl.store(ENTROPY + offs_n, entropy, mask=n_mask)


# dL/dz_j = g_logp (onehot_j - p_j) - g_H p_j (log p_j + H),  p_j = exp(z_j - lse)
# dL/dy_j = dL/dz_j * logit_scale / temperature * (1 - tanh^2(y_j logit_scale / c) with a soft-cap)
@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _linear_logprobs_bwd_kernel(
    # pointers
    HIDDEN,  # (N, H) fp32/bf16/fp16, strides (stride_hn, stride_hk)
    WEIGHT,  # (V, H) same dtype, strides (stride_wv, stride_wk)
    BIAS,  # (V,) same dtype, contiguous; read if HAS_BIAS
    TOKEN_IDS,  # (N,) int32/int64, contiguous
    LSE,  # (N,) float32, contiguous (saved by the forward)
    ENTROPY,  # (N,) float32, contiguous; read if HAS_ENTROPY_GRAD
    GRAD_LOGP,  # (N,) float32, contiguous
    GRAD_ENTROPY,  # (N,) float32, contiguous; read if HAS_ENTROPY_GRAD
    GRAD_HIDDEN,  # (N, H) float32, contiguous, accumulated into if NEED_HIDDEN
    GRAD_WEIGHT,  # (V, H) float32, contiguous, accumulated into if NEED_WEIGHT
    GRAD_BIAS,  # (V,) float32, accumulated into if NEED_BIAS
    # sizes
    N,
    V,
    H,
    # strides of HIDDEN and WEIGHT, in elements
    stride_hn: tl.int64,
    stride_hk: tl.int64,
    stride_wv: tl.int64,
    stride_wk: tl.int64,
    # scalars
    logit_scale,
    softcap,
    inv_temperature,
    # constexprs
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    NEED_HIDDEN: tl.constexpr,
    NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = offs_n < N
    v_mask = offs_v < V
    z, t = _logits_tile(HIDDEN, WEIGHT, BIAS, offs_n, offs_v, N, V, H, stride_hn, stride_hk, stride_wv, stride_wk,
                        logit_scale, softcap, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP,
                        DOT_PRECISION, DOT_IN_FP32)
    ids = tl.load(TOKEN_IDS + offs_n, mask=n_mask, other=0).to(tl.int64)
    lse = tl.load(LSE + offs_n, mask=n_mask, other=0.0)
    g_logp = tl.load(GRAD_LOGP + offs_n, mask=n_mask, other=0.0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)  # 0 past V (z = -inf)
    coef = g_logp[:, None] + 0.0 * p
    if HAS_ENTROPY_GRAD:
        entropy = tl.load(ENTROPY + offs_n, mask=n_mask, other=0.0)
        g_ent = tl.load(GRAD_ENTROPY + offs_n, mask=n_mask, other=0.0)
        # p (log p + H) is 0 where p == 0, not 0 * -inf
        coef += g_ent[:, None] * tl.where(p > 0.0, log_p + entropy[:, None], 0.0)
    g = tl.where(offs_v[None, :] == ids[:, None], g_logp[:, None], 0.0) - p * coef
    g = g * (logit_scale * inv_temperature)
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)
    g = tl.where(n_mask[:, None] & v_mask[None, :], g, 0.0)  # (BLOCK_N, BLOCK_V) float32

    if NEED_BIAS:
        tl.atomic_add(GRAD_BIAS + offs_v, tl.sum(g, axis=0), mask=v_mask)
    # the GEMM operand in the inputs' dtype (as cuBLAS would take it), products summed in float32
    g_in = _operand(g.to(WEIGHT.dtype.element_ty), DOT_IN_FP32)
    offs_k0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < H
        if NEED_HIDDEN:
            w = tl.load(WEIGHT + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                        mask=v_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_V, BLOCK_K)
            gh = tl.dot(g_in, _operand(w, DOT_IN_FP32), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_K)
            tl.atomic_add(GRAD_HIDDEN + offs_n[:, None] * H + offs_k[None, :], gh,
                          mask=n_mask[:, None] & k_mask[None, :])
        if NEED_WEIGHT:
            h = tl.load(HIDDEN + offs_n[:, None] * stride_hn + offs_k[None, :] * stride_hk,
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
            gw = tl.dot(tl.trans(g_in), _operand(h, DOT_IN_FP32), input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_K)
            tl.atomic_add(GRAD_WEIGHT + offs_v[:, None] * H + offs_k[None, :], gw,
                          mask=v_mask[:, None] & k_mask[None, :])


# ---------------------------------------------------------------------------
# launchers


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], token_ids: torch.Tensor):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected (N, H) and (V, H)")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden {hidden.dtype}, weight {weight.dtype}: expected one dtype of {_DTYPES}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias {tuple(bias.shape)} {bias.dtype}: expected ({weight.shape[0]},) {weight.dtype}")
    if token_ids.shape != (hidden.shape[0],) or token_ids.dtype not in _ID_DTYPES:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} {token_ids.dtype}: expected ({hidden.shape[0]},) int")
    if weight.shape[0] == 0:
        raise ValueError("weight: V = 0, expected at least one vocabulary entry")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _common_args(hidden, weight, bias, temperature, logit_scale, softcap):
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature: {temperature}, expected > 0")
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = linear_launch_config(N, V, H, hidden.dtype)
    sizes = (N, V, H, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    scalars = (float(logit_scale), 1.0 if softcap is None else float(softcap), 1.0 / temperature)
    flags = dict(
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_K=cfg.BLOCK_K,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        DOT_IN_FP32=hidden.dtype != torch.float32 and _interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return cfg, sizes, scalars, flags


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    token_ids: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
    with_entropy: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) or None (one dtype of fp32/bf16/fp16, any
    strides), token_ids (N,) in [0, V) (not checked here) -> logp, lse, entropy (N,)
    float32 (entropy an empty (0,) tensor without with_entropy). No (N, V) tensor."""
    _check(hidden, weight, bias, token_ids)
    N = hidden.shape[0]
    logp = torch.empty((N,), dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty((0,))
    if N == 0:
        return logp, lse, entropy
    cfg, sizes, scalars, flags = _common_args(hidden, weight, bias, temperature, logit_scale, softcap)
    grid = (triton.cdiv(N, cfg.BLOCK_N),)
    _linear_logprobs_fwd_kernel[grid](
        hidden, weight, weight if bias is None else bias.contiguous(), token_ids.contiguous(),
        logp, lse, entropy if with_entropy else lse,
        *sizes, *scalars, HAS_ENTROPY=bool(with_entropy), **flags,
    )
    return logp, lse, entropy


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    token_ids: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of sum(grad_logp·logp + grad_entropy·entropy) w.r.t. hidden, weight and
    bias, each in its input's dtype (None where not needed or no bias). grad_entropy None
    skips the entropy term. Accumulates in float32 buffers of (N, H), (V, H) and (V,)."""
    _check(hidden, weight, bias, token_ids)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_bias = need_bias and bias is not None
    gh = torch.zeros((N, H), dtype=torch.float32, device=dev) if need_hidden else None
    gw = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_weight else None
    gb = torch.zeros((V,), dtype=torch.float32, device=dev) if need_bias else None
    if N > 0 and (need_hidden or need_weight or need_bias):
        cfg, sizes, scalars, flags = _common_args(hidden, weight, bias, temperature, logit_scale, softcap)
        f32 = lambda x: x.reshape(N).to(torch.float32).contiguous()  # noqa: E731
        lse, grad_logp = f32(lse), f32(grad_logp)
        has_h = grad_entropy is not None
        entropy, grad_entropy = (f32(entropy), f32(grad_entropy)) if has_h else (lse, lse)
        dummy = lse  # never-read stand-ins keep the pointer arguments typed
        grid = (triton.cdiv(N, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V))
        _linear_logprobs_bwd_kernel[grid](
            hidden, weight, weight if bias is None else bias.contiguous(), token_ids.contiguous(),
            lse, entropy, grad_logp, grad_entropy,
            dummy if gh is None else gh, dummy if gw is None else gw, dummy if gb is None else gb,
            *sizes, *scalars,
            HAS_ENTROPY_GRAD=has_h, NEED_HIDDEN=bool(need_hidden), NEED_WEIGHT=bool(need_weight),
            NEED_BIAS=bool(need_bias), **flags,
        )
    cast = lambda g, like: None if g is None else (g if g.dtype == like.dtype else g.to(like.dtype))  # noqa: E731
    return cast(gh, hidden), cast(gw, weight), cast(gb, bias) if bias is not None else None
