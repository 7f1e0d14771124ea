"""Shared pieces of the logits kernels: the @triton.jit inner loops every kernel
calls (row addressing, block load, online logsumexp + entropy, finalisation)
and the one function that picks launch settings.

Numerics (all float32, whatever the logits dtype). Per row, z = logits * inv_temperature
is read once, in blocks of BLOCK_V. The running state is three scalars:
    m   the largest z seen so far (the reference point; -inf before any finite z)
    s   sum exp(z - m)
    sz  sum exp(z - m) * (z - m)            (only with HAS_ENTROPY)
At the end lse = m + log(s) and H = log(s) - sz / s. Keeping sz relative to m
(rather than sum p*z) avoids the cancellation lse - sum(p*z) that loses ~1e-3
absolute accuracy when |z| ~ 1e4. One exp per element: the rescale to a new
maximum is one scalar exp per block, not per element.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Row starts that are multiples of this many elements (with a unit vocab stride,
# V a multiple of it and a 16-byte aligned base) let the compiler emit 16-byte
# vector loads; see `rows_aligned`. 16 elements covers fp32 (4 per vector) and
# bf16/fp16 (8 per vector).
ALIGN_ELEMENTS = 16


@triton.jit
def row_offset(row, T, stride_b, stride_t):
    """int64 element offset of row `row` = b*T + t of a (B, T, ...) tensor."""
    row = row.to(tl.int64)
    b = row // T
    t = row - b * T
    return b * stride_b + t * stride_t


@triton.jit
def block_ptrs(BASE, row_off, cols, V, HAS_ALIGNED_ROWS: tl.constexpr):
    """Pointers to elements `cols` of the row starting at BASE + row_off (unit
    vocab stride: the launchers guarantee it), and the in-row mask."""
    if HAS_ALIGNED_ROWS:
        # The launcher checked (rows_aligned) that the row start and V are
        # multiples of 16 elements. Rounding both down to a multiple of 16
        # changes nothing at run time but lets the compiler prove it
        # (tl.multiple_of on scalars is not kept), so the mask is constant over
        # each 16-element group and accesses become 16-byte vectors.
        row_off = (row_off // 16) * 16
        V = (V // 16) * 16
    return BASE + row_off + cols, cols < V


@triton.jit
def load_block(LOGITS, row_off, cols, V, inv_temperature, HAS_ALIGNED_ROWS: tl.constexpr):
    """z = logits[row, cols] * inv_temperature in float32; -inf past the end of the row."""
    ptrs, mask = block_ptrs(LOGITS, row_off, cols, V, HAS_ALIGNED_ROWS)
    x = tl.load(ptrs, mask=mask, other=float("-inf"))
    return x.to(tl.float32) * inv_temperature


@triton.jit
def online_lse_update(z, m, s, sz, HAS_ENTROPY: tl.constexpr):
    """Fold one block z (BLOCK_V,) into the running state (m, s, sz); see module docstring."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    # Rows (so far) of only -inf: use 0 as the reference so that z - ref is -inf,
    # not NaN (-inf - -inf), and exp gives 0.
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - ref)  # rescale of the old sums; 0 when m is -inf
    d = z - ref
    e = tl.exp(d)
    if HAS_ENTROPY:
        # Move sz from reference m to ref: sum e_old*(z - ref) = sz + (m - ref)*s.
        # Guarded for s == 0 (m == -inf), where (m - ref)*s would be -inf*0.
        shift = (tl.where(s > 0.0, m, ref) - ref) * s
        # -inf logits (and masked lanes) contribute 0, not 0 * -inf
        sz = alpha * (sz + shift) + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=0)
    s = alpha * s + tl.sum(e, axis=0)
    return m_new, s, sz


@triton.jit
def online_lse_finish(m, s, sz, HAS_ENTROPY: tl.constexpr):
    """(lse, entropy) from the running state; entropy is 0 when HAS_ENTROPY is off."""
    log_s = tl.log(s)
    lse = m + log_s
    if HAS_ENTROPY:
        entropy = log_s - sz / s
    else:
        entropy = 0.0 * lse
    return lse, entropy


@triton.jit
def gather_token(LOGITS, row_off, token, inv_temperature):
    """z[token] of one row: a single scalar load."""
    x = tl.load(LOGITS + row_off + token.to(tl.int64))
    return x.to(tl.float32) * inv_temperature


# ---------------------------------------------------------------------------
# launch settings


@dataclass(frozen=True)
class LaunchConfig:
    BLOCK_V: int
    num_warps: int
    num_stages: int


_ENV_OVERRIDE = "GRPO_FAST_KERNEL_CONFIG"


def launch_config(V: int, dtype: torch.dtype) -> LaunchConfig:
    """Launch settings of the logits kernels for vocabulary size V and logits dtype.

    Defaults aimed at H100 (not measured in this repository yet; bench/ is where
    they get tuned). One program streams one row of V elements:
    - BLOCK_V: 16 KiB of logits per loop step (8192 bf16/fp16, 4096 fp32), so with
      8 warps each thread issues 2-4 16-byte loads per step (enough bytes in
      flight per SM to approach HBM bandwidth with a few rows resident per SM)
      while the fp32 working set (z, e and the entropy term) stays in registers.
      Vocabularies of 32k-256k then take 4-40 steps; small V gets one block of
      next_power_of_2(V).
    - num_warps: 8 for large blocks, fewer for small ones (keep >= 4-8 elements
      per thread so the per-block reductions are amortised).
    - num_stages: 1. There is no dot product to overlap with; latency hiding
      comes from several resident programs per SM, and software pipelining would
      only stage the stream through shared memory.
    Override for tuning with GRPO_FAST_KERNEL_CONFIG="BLOCK_V,num_warps,num_stages"
    (read on every call; no autotuning unless asked for).
    """
    override = os.environ.get(_ENV_OVERRIDE, "").strip()
    if override:
        try:
            block_v, num_warps, num_stages = (int(x) for x in override.split(","))
        except ValueError:
            raise ValueError(
                f"{_ENV_OVERRIDE}={override!r}: expected 'BLOCK_V,num_warps,num_stages', e.g. '8192,8,1'"
            ) from None
        if block_v <= 0 or block_v & (block_v - 1):
            raise ValueError(f"{_ENV_OVERRIDE}: BLOCK_V={block_v} must be a power of two")
        return LaunchConfig(block_v, num_warps, num_stages)

    max_block = 4096 if dtype == torch.float32 else 8192
    block_v = min(max_block, max(16, triton.next_power_of_2(V)))
    if block_v >= 4096:
        num_warps = 8
    elif block_v >= 1024:
        num_warps = 4
    else:
        num_warps = 2 if block_v >= 256 else 1
    return LaunchConfig(block_v, num_warps, 1)


def rows_aligned(*tensors: torch.Tensor) -> bool:
    """True when every (B, T, V) tensor (unit vocab stride assumed) has a 16-byte aligned base,
    and V and both row strides multiples of ALIGN_ELEMENTS: then every row start
    is aligned and the HAS_ALIGNED_ROWS kernels may use vector loads/stores.
    Depends on V and the memory layout, not on T: for logits[:, :-1] of a
    contiguous (B, T+1, V) tensor it is just V % 16 == 0."""
    for x in tensors:
        if x.size(-1) % ALIGN_ELEMENTS != 0 or x.data_ptr() % 16 != 0:
            return False
        # the stride of a dimension of size 1 is never multiplied by anything but 0
        if any(x.size(d) > 1 and x.stride(d) % ALIGN_ELEMENTS != 0 for d in (0, 1)):
            return False
    return True


# ---------------------------------------------------------------------------
# the fused LM head (linear_logprobs.py): tiles of BLOCK_N tokens x BLOCK_V vocabulary


@triton.jit
def online_lse_update_rows(z, m, s, sz, HAS_ENTROPY: tl.constexpr):
    """online_lse_update for a (BLOCK_N, BLOCK_V) tile: folds each row of z into its own
    running state, m, s, sz being (BLOCK_N,) vectors. Same numerics, row by row."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - ref)
    d = z - ref[:, None]
    e = tl.exp(d)
    if HAS_ENTROPY:
        shift = (tl.where(s > 0.0, m, ref) - ref) * s
        sz = alpha * (sz + shift) + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, sz


@triton.jit
def head_transform(y, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(y * logit_scale) * inv_temperature, softcap(x) = c * tanh(x / c); also returns
    t = tanh(y * logit_scale / c) (the soft-cap's derivative is 1 - t^2; 0 without a soft-cap)."""
    u = y * logit_scale
    if HAS_SOFTCAP:
        # tanh(x) = 2 sigmoid(2x) - 1 (no tanh in triton.language)
        t = 2.0 * tl.sigmoid(2.0 * u / softcap) - 1.0
        z = softcap * t * inv_temperature
    else:
        t = 0.0 * u
        z = u * inv_temperature
    return z, t


@dataclass(frozen=True)
class LinearLaunchConfig:
    BLOCK_N: int  # tokens per tile
    BLOCK_V: int  # vocabulary entries per tile
    BLOCK_K: int  # hidden units per tl.dot step
    num_warps: int
    num_stages: int


_LINEAR_ENV_OVERRIDE = "GRPO_FAST_LINEAR_KERNEL_CONFIG"


def linear_launch_config(N: int, V: int, H: int, dtype: torch.dtype) -> LinearLaunchConfig:
    """Launch settings of the fused LM-head kernels (kernels/linear_logprobs.py).

    The tile lives in registers: BLOCK_N x BLOCK_V float32 accumulators, filled by tl.dot
    over H in BLOCK_K steps. Defaults in the range Cut Cross-Entropy and the Triton matmul
    tutorial use on A100/H100 (64-128 x 128-256 tiles, K steps of 32-64); NOT tuned here:
    no GPU has run them yet. tl.dot needs every block dimension >= 16, so small problems
    get 16 (the interpreter tests run such shapes).
    Override with GRPO_FAST_LINEAR_KERNEL_CONFIG="BLOCK_N,BLOCK_V,BLOCK_K,num_warps,num_stages".
    """
    override = os.environ.get(_LINEAR_ENV_OVERRIDE, "").strip()
    if override:
        try:
            bn, bv, bk, nw, ns = (int(x) for x in override.split(","))
        except ValueError:
            raise ValueError(
                f"{_LINEAR_ENV_OVERRIDE}={override!r}: expected 'BLOCK_N,BLOCK_V,BLOCK_K,num_warps,num_stages'"
            ) from None
        for name, b in (("BLOCK_N", bn), ("BLOCK_V", bv), ("BLOCK_K", bk)):
            if b < 16 or b & (b - 1):
                raise ValueError(f"{_LINEAR_ENV_OVERRIDE}: {name}={b} must be a power of two >= 16")
        return LinearLaunchConfig(bn, bv, bk, nw, ns)
    half = dtype in (torch.bfloat16, torch.float16)
    bn = min(64, max(16, triton.next_power_of_2(N)))
    bv = min(128 if half else 64, max(16, triton.next_power_of_2(V)))
    bk = min(64 if half else 32, max(16, triton.next_power_of_2(H)))
    return LinearLaunchConfig(bn, bv, bk, num_warps=4 if bn * bv <= 4096 else 8, num_stages=3 if half else 2)
