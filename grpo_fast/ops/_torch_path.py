"""The pure-PyTorch path of the logits passes (the CPU path, and the oracle the
Triton kernels are tested against).

Phase 1 of every loss reads the (B, T, V) logits once and keeps three numbers
per token, with z = logits / temperature:
    lse = logsumexp(z),  logp = z[id] - lse,  H = lse - sum(softmax(z) * z)
Its backward reads the logits once more and writes the gradient once:
    dL/dz_j = g_logp * (onehot_j - p_j) - g_H * p_j * (log p_j + H),  p_j = exp(z_j - lse)
(d lse/dz = p and dH/dz_j = -p_j (log p_j + H)); dL/dlogits = dL/dz / temperature.

Both passes walk over blocks of rows, so the largest temporaries are a few
float32 blocks of `rows x V`, never a float32 copy of the whole logits.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

# A block holds at most this many elements (float32: 4 MiB), and at least one row.
# Small enough that a handful of float32 temporaries stay under 5% of the logits at
# B*T*V ~ 1e8; large enough that per-block overhead is negligible on a CPU.
_MAX_BLOCK_ELEMS = 1 << 20


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # float64 logits (gradcheck) stay float64; every other dtype computes in float32
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _is_flat(t: torch.Tensor) -> bool:
    # rows of a (B, T, V) tensor are evenly spaced, so it can be seen as (B*T, V) without a copy
    return t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    B, T, V = t.shape
    return t.as_strided((B * T, V), (t.stride(1), t.stride(2)), t.storage_offset())


def _blocks(*tensors: torch.Tensor) -> Iterator[Tuple[slice, Tuple[torch.Tensor, ...]]]:
    """Yield (row slice into the flattened B*T rows, the matching (nb, nt, V) views of each tensor).

    All tensors share the (B, T, V) shape; the blocks are the same for all of them.
    Evenly spaced rows are walked as one (B*T, V) sequence of rows; other layouts
    (e.g. logits[:, :-1]) by whole sequences when T is short, by time chunks of one
    sequence when T is long, so no block is tiny and none is copied.
    """
    B, T, V = tensors[0].shape
    rows = max(1, min(B * T, _MAX_BLOCK_ELEMS // max(V, 1)))
    if all(_is_flat(t) for t in tensors):
        flats = [_flat(t) for t in tensors]
        for r0 in range(0, B * T, rows):
            r1 = min(B * T, r0 + rows)
            yield slice(r0, r1), tuple(f[r0:r1].unsqueeze(0) for f in flats)
    elif T <= rows:
        per = rows // T  # whole sequences per block
        for b0 in range(0, B, per):
            b1 = min(B, b0 + per)
            yield slice(b0 * T, b1 * T), tuple(t[b0:b1] for t in tensors)
    else:
        for b in range(B):
            for t0 in range(0, T, rows):
                t1 = min(T, t0 + rows)
                yield slice(b * T + t0, b * T + t1), tuple(t[b:b + 1, t0:t1] for t in tensors)


def _as_compute(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return block if block.dtype == dtype else block.to(dtype)


def token_logprobs_forward(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, with_entropy: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,T,V), (B,T) -> logp, lse, entropy (B,T) in float32 (float64 for float64 logits).

    entropy is an empty (0,) tensor when with_entropy is False. The temperature is
    folded into the shifted exponent, exp((x - max) / temperature), so there is no
    separate division pass.
    """
    B, T, V = logits.shape
    dtype = compute_dtype(logits)
    inv_t = 1.0 / temperature
    logp = torch.empty(B * T, dtype=dtype, device=logits.device)
    lse = torch.empty(B * T, dtype=dtype, device=logits.device)
    ent = torch.empty(B * T if with_entropy else 0, dtype=dtype, device=logits.device)
    ids = token_ids.reshape(B * T)
    for rows, (block,) in _blocks(logits):
        x = _as_compute(block, dtype)  # (n, V) a view for float32 logits, a copy for half
        m = x.amax(dim=-1, keepdim=True).mul_(inv_t)  # (nb, nt, 1) max of z = x / temperature
        # a row of all -inf has max -inf; shift by 0 there so it gives lse = -inf, not NaN
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        e = torch.add(-m, x, alpha=inv_t).exp_()  # (nb, nt, V) exp(z - m): the one big temporary
        s = e.sum(dim=-1, keepdim=True)
        block_lse = m + torch.log(s)  # (nb, nt, 1)
        lse[rows] = block_lse.reshape(-1)
        idx = ids[rows].view(x.shape[0], x.shape[1], 1)
        logp[rows] = (x.gather(-1, idx) * inv_t - block_lse).reshape(-1)
        if with_entropy:
            # H = lse - sum(p * z), with p = e / s; a row-wise dot avoids another (n, V) buffer
            pz = torch.linalg.vecdot(e, x)
            bad = torch.isnan(pz)
            if bool(bad.any()):
                # x = -inf entries have p = 0 and add 0 (the limit of p * z), not 0 * -inf = NaN;
                # redo only those rows (rows with NaN logits stay NaN)
                xb = x[bad]
                pz[bad] = torch.linalg.vecdot(e[bad], torch.where(torch.isneginf(xb), 0.0, xb))
            ent[rows] = (block_lse.squeeze(-1) - pz * inv_t / s.squeeze(-1)).reshape(-1)
    return logp.view(B, T), lse.view(B, T), (ent.view(B, T) if with_entropy else ent)


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
    """Write dL/dlogits into `out` ((B,T,V), the logits' dtype; may be `logits` itself)."""
    B, T, V = logits.shape
    dtype = compute_dtype(logits)
    inv_t = 1.0 / temperature
    ids = token_ids.reshape(B * T)
    neg_lse = -lse.reshape(B * T, 1).to(dtype)
    g_lp = grad_logp.reshape(B * T, 1).to(dtype) * inv_t  # dL/dlogit carries 1 / temperature
    has_h = grad_entropy is not None
    if has_h:
        g_h = grad_entropy.reshape(B * T, 1).to(dtype) * inv_t
        h_f = entropy.reshape(B * T, 1).to(dtype)
    pairs = _blocks(logits) if out is logits else _blocks(logits, out)
    for rows, views in pairs:
        block, dst = views[0], views[-1]
        shape = (block.shape[0], block.shape[1], 1)  # (nb, nt, 1)
        c1 = g_lp[rows].view(shape)
        # log p = x / temperature - lse, written straight into the destination when it
        # has the compute dtype (also in place into float32 logits), else a block buffer
        if dst.dtype == dtype:
            lp = torch.add(neg_lse[rows].view(shape), block, alpha=inv_t, out=dst) if dst is not block \
                else block.mul_(inv_t).add_(neg_lse[rows].view(shape))
        else:  # half-precision logits: the float32 copy of the block is the working buffer
            lp = block.to(dtype).mul_(inv_t).add_(neg_lse[rows].view(shape))
        if has_h:
            # grad = -p * (c1 + c2 * (log p + H)), then + c1 at the chosen token.
            # log p = -inf (a -inf logit) has p = 0 and must contribute 0, not 0 * inf = NaN:
            # clamping log p at -1e30 keeps the factor finite there while exp(log p) stays 0
            coef = torch.clamp(lp, min=-1e30).add_(h_f[rows].view(shape)).mul_(-g_h[rows].view(shape)).sub_(c1)
            grad = lp.exp_().mul_(coef)
        else:
            grad = lp.exp_().mul_(-c1)  # -p * c1
        grad.scatter_add_(-1, ids[rows].view(shape), c1)
        if grad is not dst:
            dst.copy_(grad)
    return out
