"""TRPO's natural-gradient step over an arbitrary list of trainable parameters.

    maximise  L(θ) = mean(ρ · A)      subject to  mean KL(π_old || π_θ) <= δ

1. g = ∇L at θ_old.
2. s ≈ F⁻¹ g by conjugate gradient, F the Fisher matrix = Hessian of the mean KL at
   θ_old, applied as Fisher-vector products by double backpropagation:
   F v = ∇(∇KL · v)  (+ damping · v).
3. Full step β s with β = sqrt(2δ / sᵀ F s), so the quadratic model of the KL is δ.
4. Backtracking line search over β s · ratio^k: accept the first step whose surrogate
   improves and whose measured KL is at most δ; otherwise restore θ_old exactly.

Only the parameters passed in move (e.g. LoRA adapters), so the Fisher products are
over those only.

Data parallel (torchrun): pass `reduce`, a callable that averages a tensor over ranks (in place or
returning the average). It is applied to g, to every Fisher-vector product, and to the surrogate /
KL scalars of the line search (and the initial surrogate). Each rank's surrogate_fn / kl_fn must
then be its share of the global objective such that the average over ranks IS the global value
(e.g. local sum / (global token count / world size)); the gradient and Hessian of an average are
the averages of the gradients and Hessians, so every rank sees the global g and F·v, and computes
the same CG iterates, step size and accept / reject decisions: parameters stay identical across
ranks with no broadcast. With reduce=None (one process) nothing is communicated.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def flat_grad(output: Tensor, params: Sequence[Tensor], *, create_graph: bool = False) -> Tensor:
    grads = torch.autograd.grad(output, params, create_graph=create_graph, allow_unused=True)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)
    ])


def get_flat(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


@torch.no_grad()
def set_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def conjugate_gradient(avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> Tensor:
    """Solve A x = b for symmetric positive-definite A given only x -> A x."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for _ in range(iters):
        if rr.item() <= residual_tol:
            break
        Ap = avp(p)
        pAp = p.dot(Ap)
        if pAp.item() <= 0:  # not positive definite along p (numerical trouble): stop here
            break
        alpha = rr / pAp
        x += alpha * p
        r -= alpha * Ap
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


Reduce = Optional[Callable[[Tensor], Optional[Tensor]]]


def _apply(reduce: Reduce, t: Tensor) -> Tensor:
    """reduce(t) for a reducer that returns the average or averages t in place (returning None)."""
    if reduce is None:
        return t
    out = reduce(t)
    return t if out is None else out


def _scalars(reduce: Reduce, *values: Tensor) -> List[float]:
    """Python floats of scalar tensors; with reduce, averaged over ranks in one float64 collective."""
    if reduce is None:
        return [v.item() for v in values]
    return _apply(reduce, torch.stack([v.detach().to(torch.float64).reshape(()) for v in values])).tolist()


# sdpa_kernel sets process-global backend flags and restores what it saw on entry: two threads in it
# at once (e.g. data-parallel ranks simulated by threads) could leave the process on the math backend
_SDPA_LOCK = threading.Lock()


@contextlib.contextmanager
def _double_backward_attention():
    with _SDPA_LOCK, sdpa_kernel([SDPBackend.MATH]):
        yield


def fisher_vector_product(kl_fn: Callable[[], Tensor], params: Sequence[Tensor], damping: float = 0.1,
                          reduce: Reduce = None):
    """v -> (F + damping I) v, F the Hessian of kl_fn() at the current parameters.

    kl_fn is re-evaluated for every product (no graph is kept between calls), so
    memory stays that of one forward + double backward. With reduce, the product F v is
    averaged over ranks (F the Hessian of the average of the ranks' kl_fn).
    """

    def fvp(v: Tensor) -> Tensor:
        # fused attention kernels (flash / memory-efficient SDPA) have no double backward:
        # the Fisher product runs attention on SDPA's math backend, which does
        with _double_backward_attention():
            kl = kl_fn()
            g = flat_grad(kl, params, create_graph=True)
            gv = g.dot(v.detach())
            hv = flat_grad(gv, params)
        if reduce is not None:
            hv = _apply(reduce, hv)
        return hv + damping * v

    return fvp


@dataclass
class TRPOStepResult:
    accepted: bool  # whether a step was taken
    kl: float  # measured mean KL after the step (0 when rejected)
    surrogate_gain: float  # improvement of the surrogate (0 when rejected)
    line_search_steps: int  # backtracking steps tried
    step_norm: float  # norm of the accepted step
    expected_gain: float  # first-order predicted gain of the full step
    nonfinite: bool = False  # the surrogate, its gradient or the Fisher product was NaN/inf: no step was tried


def trpo_step(
    params: List[Tensor],
    surrogate_fn: Callable[[], Tensor],
    kl_fn: Callable[[], Tensor],
    max_kl: float,
    *,
    cg_iters: int = 10,
    damping: float = 0.1,
    backtrack_iters: int = 10,
    backtrack_ratio: float = 0.5,
    accept_ratio: float = 0.0,
    reduce: Reduce = None,
) -> TRPOStepResult:
    """One TRPO update of `params` in place.

    surrogate_fn() -> the surrogate objective to MAXIMISE (differentiable), e.g. mean(ρ·A);
    kl_fn() -> mean KL(π_old || π_θ) (differentiable, 0 with zero gradient at θ_old).
    A rejected step leaves the parameters bit-identical to what they were.
    reduce: None (one process) or a callable averaging a tensor over ranks (see the module doc);
    every rank must call trpo_step with the same arguments at the same time (it is a collective).
    """
    if not (max_kl > 0 and math.isfinite(max_kl)):
        raise ValueError(f"max_kl={max_kl!r}: expected a finite number > 0")
    if not params:
        raise ValueError("trpo_step: no trainable parameters")
    old = get_flat(params)
    with torch.enable_grad():
        surr = surrogate_fn()
        g = flat_grad(surr, params)
    if reduce is None:
        surr_old = surr.item()
    else:
        g = _apply(reduce, g)
        surr_old, = _scalars(reduce, surr)
    if not (math.isfinite(surr_old) and bool(torch.isfinite(g).all())):
        return TRPOStepResult(False, 0.0, 0.0, 0, 0.0, 0.0, nonfinite=True)
    if g.abs().max().item() == 0.0:
        return TRPOStepResult(False, 0.0, 0.0, 0, 0.0, 0.0)
    fvp = fisher_vector_product(kl_fn, params, damping, reduce)
    with torch.enable_grad():
        s = conjugate_gradient(fvp, g, iters=cg_iters)
        sFs = s.dot(fvp(s)).item()
    if not math.isfinite(sFs):
        return TRPOStepResult(False, 0.0, 0.0, 0, 0.0, 0.0, nonfinite=True)
    if not sFs > 0:
        return TRPOStepResult(False, 0.0, 0.0, 0, 0.0, 0.0)
    beta = math.sqrt(2.0 * max_kl / sFs)
    full_step = beta * s
    expected = g.dot(full_step).item()
    frac = 1.0
    for k in range(backtrack_iters):
        set_flat(params, old + frac * full_step)
        with torch.no_grad():
            surr_new, kl_new = _scalars(reduce, surrogate_fn(), kl_fn())
        gain = surr_new - surr_old
        if math.isfinite(gain) and math.isfinite(kl_new) and kl_new <= max_kl \
                and gain > accept_ratio * expected * frac and gain > 0:
            return TRPOStepResult(True, kl_new, gain, k + 1, frac * full_step.norm().item(), expected)
        frac *= backtrack_ratio
    set_flat(params, old)  # exact: the saved values are copied back
    return TRPOStepResult(False, 0.0, 0.0, backtrack_iters, 0.0, expected)
