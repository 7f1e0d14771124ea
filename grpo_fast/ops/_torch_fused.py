"""The pure-PyTorch path of the fused LM head (the CPU path, and the oracle the Triton
kernels are tested against): per-token log-probs, logsumexp and entropy straight
from the hidden states and the head, and their backward, in tiles.

With y = h·Wᵀ + b (one row per token), u = y·logit_scale and
    z = c·tanh(u / c) / temperature   (final_logit_softcapping = c, Gemma 2)
    z = u / temperature               (no soft-cap)
phase 1 is _torch_path's: lse = logsumexp(z), logp = z[id] − lse, H = lse − Σ softmax(z)·z.
The backward of one tile, with p = exp(z − lse):
    dL/dz_j = g_logp·(onehot_j − p_j) − g_H·p_j·(log p_j + H)
    dL/dy_j = dL/dz_j · (logit_scale / temperature) · (1 − tanh²(u_j / c))   (last factor with a soft-cap)
    grad_h += (dL/dy)·W_tile,  grad_W_tile += (dL/dy)ᵀ·h,  grad_b_tile += Σ_rows dL/dy

Tiles are TILE_N tokens × TILE_V vocabulary entries, computed by one matmul into a
float32 buffer allocated once per call and reused; the forward folds each tile into
per-token running statistics (an online logsumexp), the backward recomputes it. So
the temporaries are two or three tile buffers (a few MiB) whatever N and V are, and
no (N, V) tensor exists. The gradients accumulate in float32 (N, H) and (V, H)
buffers (for float32 inputs these are the returned gradients themselves) and are
cast to the inputs' dtype once, at the end: no per-tile rounding to bfloat16.

Logits here are finite (a product of finite hidden states and weights), so the
-inf handling of _torch_path (masked vocabulary entries) is not needed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# One tile holds at most this many elements (float32: 4 MiB). The backward keeps two
# such buffers (three with a soft-cap), the forward two.
TILE_ELEMS = 1 << 20
# Vocabulary entries per tile: wide enough that the row-wise reductions of the fold
# are long, narrow enough that a tile still covers a few hundred tokens (the matmul
# then runs at full speed on a CPU, where tokens x vocabulary is the GEMM's M x N).
TILE_V = 2048


def compute_dtype(hidden: Tensor) -> torch.dtype:
    # float64 inputs (gradcheck) stay float64; every other dtype computes in float32
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def tile_shape(N: int, V: int, tile_elems: Optional[int] = None, tile_v: Optional[int] = None) -> Tuple[int, int]:
    """(tokens, vocabulary entries) per tile: at most `tile_elems` elements, at least one of each
    (defaults: the module's TILE_ELEMS and TILE_V, read at call time so tests can shrink them)."""
    tile_elems = TILE_ELEMS if tile_elems is None else tile_elems
    tile_v = TILE_V if tile_v is None else tile_v
    tv = max(1, min(V, tile_v))
    tn = max(1, min(N, tile_elems // tv))
    return tn, tv


def _tile_view(buf: Tensor, n: int, v: int) -> Tensor:
    # a contiguous (n, v) view of the flat buffer: matmul out= and the in-place ops stay copy-free
    return buf[: n * v].view(n, v)


def _logits_tile(out: Tensor, h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """out (n, v) <- h (n, H) · w (v, H)ᵀ (+ b (v,)), all in the compute dtype."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _softcap_(y: Tensor, logit_scale: float, softcap: float, inv_t: float) -> Tensor:
    """y -> z = c·tanh(y·logit_scale / c) / temperature, in place."""
    return y.mul_(logit_scale / softcap).tanh_().mul_(softcap * inv_t)


def _prescale(softcap: Optional[float], logit_scale: float, temperature: float) -> float:
    """Without a soft-cap z = k·(h·Wᵀ + b), k = logit_scale / temperature, is linear: k goes
    into the (n, H) hidden block and the bias instead of costing a pass over every tile."""
    return logit_scale / temperature if softcap is None else 1.0


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def linear_logprobs_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    token_ids: Tensor,
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
    with_entropy: bool,
    *,
    tile_elems: Optional[int] = None,
    tile_v: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) or None, token_ids (N,) in [0, V)
    -> logp, lse, entropy (N,) float32 (float64 for float64 inputs); entropy is an
    empty (0,) tensor when with_entropy is False."""
    N, _ = hidden.shape
    V = weight.shape[0]
    cd = compute_dtype(hidden)
    dev = hidden.device
    inv_t = 1.0 / temperature
    m = torch.full((N,), float("-inf"), dtype=cd, device=dev)  # running max of z
    s = torch.zeros((N,), dtype=cd, device=dev)  # sum exp(z - m)
    sz = torch.zeros((N,), dtype=cd, device=dev)  # sum exp(z - m) * (z - m)
    z_tok = torch.zeros((N,), dtype=cd, device=dev)  # z of the chosen token
    ids = token_ids.reshape(N).long()
    if N == 0:
        empty = torch.empty((0,), dtype=cd, device=dev)
        return empty, empty.clone(), empty.clone()
    tn, tv = tile_shape(N, V, tile_elems, tile_v)
    k = _prescale(softcap, logit_scale, temperature)
    buf_z = torch.empty(tn * tv, dtype=cd, device=dev)
    buf_e = torch.empty(tn * tv, dtype=cd, device=dev)
    for v0 in range(0, V, tv):
        v1 = min(V, v0 + tv)
        w = _as(weight[v0:v1], cd)  # (v, H): a view for float32 weights
        b = None if bias is None else _as(bias[v0:v1], cd) * k
        for n0 in range(0, N, tn):
            n1 = min(N, n0 + tn)
            rows = slice(n0, n1)
            h = _as(hidden[rows], cd)
            h = h * k if k != 1.0 else h  # (n, H)
            z = _logits_tile(_tile_view(buf_z, n1 - n0, v1 - v0), h, w, b)  # (n, v)
            if softcap is not None:
                z = _softcap_(z, logit_scale, softcap, inv_t)
            local = ids[rows] - v0
            in_tile = (local >= 0) & (local < v1 - v0)
            picked = z.gather(1, local.clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            z_tok[rows] = torch.where(in_tile, picked, z_tok[rows])
            m_old = m[rows]
            m_new = torch.maximum(m_old, z.amax(1))  # (n,)
            d = z.sub_(m_new.unsqueeze(1))  # z - m_new, in place
            e = torch.exp(d, out=_tile_view(buf_e, n1 - n0, v1 - v0))
            alpha = torch.exp(m_old - m_new)  # 0 on the first tile (m_old = -inf)
            s_old = s[rows]
            if with_entropy:
                # move the old sum from reference m_old to m_new: sum e_old (z - m_new) = sz + (m_old - m_new) s;
                # guarded where s = 0 (first tile), where (m_old - m_new) * s would be -inf * 0
                shift = torch.where(s_old > 0, (m_old - m_new) * s_old, 0.0)
                # row-wise dot sum(e * d) as a batched (1, v) x (v, 1) matmul: no (n, v) product temporary
                e_dot_d = torch.bmm(e.unsqueeze(1), d.unsqueeze(2)).view(-1)
                sz[rows] = alpha * (sz[rows] + shift) + e_dot_d
            s[rows] = alpha * s_old + e.sum(1)
            m[rows] = m_new
    log_s = torch.log(s)
    lse = m + log_s
    logp = z_tok - lse
    entropy = log_s - sz / s if with_entropy else torch.empty((0,), dtype=cd, device=dev)
    return logp, lse, entropy


def linear_logprobs_backward(
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
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    *,
    tile_elems: Optional[int] = None,
    tile_v: Optional[int] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of sum(grad_logp·logp + grad_entropy·entropy) w.r.t. hidden (N, H),
    weight (V, H) and bias (V,), each in its input's dtype (None where not needed, and
    for the bias when there is none). lse, entropy: the forward's (N,) outputs;
    grad_entropy None skips the entropy term (entropy may then be empty)."""
    N, H = hidden.shape
    V = weight.shape[0]
    cd = compute_dtype(hidden)
    dev = hidden.device
    need_bias = need_bias and bias is not None
    # float32 accumulators (the returned gradients themselves for float32 inputs)
    gh = torch.zeros((N, H), dtype=cd, device=dev) if need_hidden else None
    gw = torch.zeros((V, H), dtype=cd, device=dev) if need_weight else None
    gb = torch.zeros((V,), dtype=cd, device=dev) if need_bias else None
    if N > 0 and (need_hidden or need_weight or need_bias):
        # Without a soft-cap the tile is z itself (k = logit_scale / temperature prescales the hidden
        # block and the bias), the products below are with dL/dz, and k multiplies grad_h and grad_b
        # once at the end (grad_W comes out right from the prescaled hidden block). With a soft-cap
        # the tile is y, and the factor k common to every entry of dL/dy rides on the row coefficients.
        k = _prescale(softcap, logit_scale, temperature)
        kc = 1.0 if softcap is None else logit_scale / temperature
        c1 = (_as(grad_logp.reshape(N), cd) * kc).unsqueeze(1)  # (N, 1)
        has_h = grad_entropy is not None
        if has_h:
            c2 = (_as(grad_entropy.reshape(N), cd) * kc).unsqueeze(1)
            ent = _as(entropy.reshape(N), cd).unsqueeze(1)
        neg_lse = -_as(lse.reshape(N), cd).unsqueeze(1)
        ids = token_ids.reshape(N).long()
        inv_t = 1.0 / temperature
        tn, tv = tile_shape(N, V, tile_elems, tile_v)
        buf_a = torch.empty(tn * tv, dtype=cd, device=dev)
        buf_p = torch.empty(tn * tv, dtype=cd, device=dev)
        buf_c = torch.empty(tn * tv, dtype=cd, device=dev) if softcap is not None else None
        for v0 in range(0, V, tv):
            v1 = min(V, v0 + tv)
            nv = v1 - v0
            w = _as(weight[v0:v1], cd)  # (v, H)
            b = None if bias is None else _as(bias[v0:v1], cd) * k
            for n0 in range(0, N, tn):
                n1 = min(N, n0 + tn)
                rows = slice(n0, n1)
                h = _as(hidden[rows], cd)
                h = h * k if k != 1.0 else h  # (n, H)
                y = _logits_tile(_tile_view(buf_a, n1 - n0, nv), h, w, b)  # (n, v)
                if softcap is None:
                    lp = y  # z
                else:
                    t = y.mul_(logit_scale / softcap).tanh_()
                    dtanh = torch.mul(t, t, out=_tile_view(buf_c, n1 - n0, nv)).neg_().add_(1.0)  # 1 - tanh^2
                    lp = t.mul_(softcap * inv_t)
                lp = lp.add_(neg_lse[rows])  # log p = z - lse
                p = torch.exp(lp, out=_tile_view(buf_p, n1 - n0, nv))
                if has_h:
                    # dL/dy = -p (c1 + c2 (log p + H)) + c1 onehot
                    coef = lp.add_(ent[rows]).mul_(c2[rows]).add_(c1[rows])
                    g = p.mul_(coef).neg_()
                else:
                    g = p.mul_(-c1[rows])
                local = ids[rows] - v0
                in_tile = (local >= 0) & (local < nv)
                g.scatter_add_(1, local.clamp(0, nv - 1).unsqueeze(1),
                               torch.where(in_tile.unsqueeze(1), c1[rows], 0.0))
                if softcap is not None:
                    g.mul_(dtanh)
                if gh is not None:
                    gh[rows].addmm_(g, w)  # (n, v) · (v, H)
                if gw is not None:
                    gw[v0:v1].addmm_(g.t(), h)  # (v, n) · (n, H)
                if gb is not None:
                    gb[v0:v1] += g.sum(0)
        if k != 1.0:
            if gh is not None:
                gh.mul_(k)
            if gb is not None:
                gb.mul_(k)
    gh = None if gh is None else _as(gh, hidden.dtype)
    gw = None if gw is None else _as(gw, weight.dtype)
    gb = None if gb is None else _as(gb, bias.dtype)
    return gh, gw, gb
