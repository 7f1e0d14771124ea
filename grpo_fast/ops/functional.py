"""The public functional API over logits: `selective_log_softmax` and `policy_loss`.

Every call is two phases (docs/design.md, "The maths"):
  1. the logits passes (custom op grpo_fast::token_logprobs): per token logp, lse and
     entropy, by the Triton kernels on CUDA or the chunked PyTorch path elsewhere;
  2. the loss from those (B, T) numbers, written once below in plain torch. Autograd
     through phase 2 gives dloss/dlogp and dloss/dH per token, and the backward of
     phase 1 turns them into the logits gradient in one read and one write.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers the custom ops)
from .options import LossOptions

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class PolicyLossOutput(NamedTuple):
    """The loss and its detached diagnostics (scalars are means over the mask). As in TRL, a
    fraction of a per-sequence quantity (the clip fractions at importance_sampling_level="sequence"
    with (B,) advantages, vespo's phi) is over the sequences, those with tokens, not the tokens."""

    loss: Tensor  # scalar, differentiable w.r.t. the logits
    logps: Tensor  # (B, T) float32 log-probabilities of the tokens, detached
    kl: Optional[Tensor]  # mean KL(pi || ref) by the chosen estimator; None without ref_logps
    entropy: Tensor  # mean entropy of the (temperature-scaled) distributions
    clip_ratio_low: Tensor  # fraction of tokens with rho < 1 - eps_low and A < 0
    clip_ratio_high: Tensor  # fraction of tokens with rho > 1 + eps_high and A > 0
    clip_ratio_region: Tensor  # low or high (all three are 0 for cispo and sapo: no two-sided clip)
    # appended later, with defaults, so code that builds or unpacks the first seven keeps working
    cispo_clip_ratio: Optional[Tensor] = None  # cispo: fraction with rho > epsilon_high and A > 0 (TRL's metric)
    entropy_masked_frac: Optional[Tensor] = None  # top_entropy_quantile < 1: fraction left out of the policy term
    off_policy_masked_frac: Optional[Tensor] = None  # off_policy_mask_threshold: fraction in dropped sequences
    # top_entropy_quantile < 1: mean entropy over the tokens kept (those the entropy bonus averages and
    # TRL's adaptive entropy control tracks); `entropy` otherwise
    entropy_kept: Optional[Tensor] = None
    # vespo: the mean gamma weight phi (TRL's vespo/phi_seq_mean): over the sequences with at least one
    # masked token for (B,) advantages, over the masked tokens for (B, T) advantages
    vespo_phi_seq_mean: Optional[Tensor] = None


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


def _check_token_ids(token_ids, logits, V: Optional[int] = None, ref_name: str = "logits") -> None:
    """token_ids: int32/int64 (B, T) on the reference tensor's device with values in [0, V); V is the
    logits' last dimension unless given (the fused head passes weight.shape[0])."""
    if not isinstance(token_ids, Tensor):
        raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dtype not in (torch.int64, torch.int32):
        # both backends index with int32 / int64 only; refused (not converted) so neither path
        # makes a hidden copy, and the message is the same on both
        raise TypeError(
            f"token_ids must be an integer tensor of dtype int64 or int32, got {token_ids.dtype} "
            "(convert with token_ids.long())"
        )
    if tuple(token_ids.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"token_ids has shape {_shape(token_ids)}, expected (B, T) = {tuple(logits.shape[:2])} "
            f"to match {ref_name} {_shape(logits)}"
        )
    if token_ids.device != logits.device:
        raise ValueError(f"token_ids is on {token_ids.device}, {ref_name} on {logits.device}")
    # a value check needs the data: skipped while torch.compile traces (the op is opaque there)
    if token_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(token_ids)
        V = logits.shape[-1] if V is None else V
        if token_ids.is_cuda:
            # reading the values back would stall the host on every call: assert on the device
            # (a bad id then fails the next synchronising call with a device-side assert)
            torch._assert_async((lo >= 0) & (hi < V), f"token_ids must lie in [0, V) = [0, {V})")
            return
        if int(lo) < 0 or int(hi) >= V:
            raise ValueError(f"token_ids must lie in [0, V) = [0, {V}), got values in [{int(lo)}, {int(hi)}]")


def _check_bt(name: str, t, logits, *, allow_b: bool = False, integer_ok: bool = False,
              ref_name: str = "logits") -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    B, T = logits.shape[:2]
    ok = tuple(t.shape) == (B, T) or (allow_b and tuple(t.shape) == (B,))
    if not ok:
        want = f"(B,) = ({B},) or (B, T) = ({B}, {T})" if allow_b else f"(B, T) = ({B}, {T})"
        raise ValueError(f"{name} has shape {_shape(t)}, expected {want} to match {ref_name} {_shape(logits)}")
    if t.device != logits.device:
        raise ValueError(f"{name} is on {t.device}, {ref_name} on {logits.device}")
    if not integer_ok and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_mask(mask, logits, ref_name: str = "logits") -> None:
    """mask: (B, T), bool or 0/1 numbers on the logits' device. Any other value is refused
    (weights would need their own metrics); on CUDA by a device-side assert, with no host sync."""
    _check_bt("mask", mask, logits, integer_ok=True, ref_name=ref_name)
    if mask is None or mask.dtype == torch.bool or mask.numel() == 0 or torch.compiler.is_compiling():
        return
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool or real 0/1 numbers, got {mask.dtype}")
    bad = ((mask != 0) & (mask != 1)).any()
    if mask.is_cuda:
        torch._assert_async(~bad, "mask must hold only 0 and 1 (or be a bool tensor)")
        return
    if bool(bad):
        odd = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
        raise ValueError(f"mask must hold only 0 and 1 (or be a bool tensor), got values such as {odd}")


def _empty_phase1(logits: Tensor, token_ids: Tensor):
    """(logp, entropy) for a batch with no tokens (B == 0 or T == 0): empty float32 tensors still
    connected to the logits, so backward gives the logits a zero gradient on every backend."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.sum(-1).to(dtype) * 0.0  # (B, 0): no arithmetic happens
    return z, z


def _check_weights(w, ref) -> None:
    """importance_weights: None, or a float (B, T) / (B, 1) tensor on ref's device."""
    if w is None:
        return
    if not isinstance(w, Tensor):
        raise TypeError(f"importance_weights must be a torch.Tensor or None, got {type(w).__name__}")
    B, T = ref.shape[:2]
    if tuple(w.shape) not in ((B, T), (B, 1)):
        raise ValueError(f"importance_weights has shape {_shape(w)}, expected (B, T) = ({B}, {T}) or (B, 1) = ({B}, 1)")
    if w.device != ref.device:
        raise ValueError(f"importance_weights is on {w.device}, expected {ref.device}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"importance_weights must be a floating-point tensor, got {w.dtype}")


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
    if token_ids.numel() == 0:
        logp, entropy = _empty_phase1(logits, token_ids)
        return (logp, entropy) if return_entropy else logp
    whole, t_start, t_len = _time_window(logits)
    logp, _, entropy = torch.ops.grpo_fast.token_logprobs(
        whole, token_ids, float(temperature), bool(return_entropy), False, t_start, t_len
    )
    return (logp, entropy) if return_entropy else logp


# ---------------------------------------------------------------- policy_loss

def _masked_mean(x: Tensor, m: Tensor, count: Tensor) -> Tensor:
    return torch.where(m, x, 0.0).sum() / count


def _entropy_threshold(entropy: Tensor, m: Tensor, q: float, gather=None) -> Tensor:
    """The q-quantile (linear interpolation, as torch.quantile) of the entropies at the masked
    tokens, as a 0-dim tensor; +inf when there are none (then no token reaches it).

    Written with a sort and a gather instead of torch.quantile, so it needs no host sync (the
    number of masked tokens stays on the device) and has no size limit. `gather` (optional) maps
    this rank's (B*T,) values, NaN at masked-out tokens, to every rank's values."""
    vals = torch.where(m, entropy.detach(), float("nan")).reshape(-1)
    if gather is not None:
        vals = gather(vals).reshape(-1).to(entropy.dtype)
    valid = ~torch.isnan(vals)
    n = valid.sum()
    ordered = torch.where(valid, vals, float("inf")).sort().values  # the masked tokens first, ascending
    if ordered.numel() == 0:
        return torch.full((), float("inf"), dtype=entropy.dtype, device=entropy.device)
    pos = q * (n - 1).clamp(min=0).to(torch.float64)  # float64: exact indices past 2**24 tokens
    lo = pos.floor().long()
    hi = pos.ceil().long()
    # index_select, not ordered[lo]: a 0-dim index tensor would be read back to the host
    a, b = ordered.index_select(0, lo.reshape(1))[0], ordered.index_select(0, hi.reshape(1))[0]
    frac = (pos - lo.to(torch.float64)).to(ordered.dtype)
    # lerp(inf, inf, w) is NaN: the empty case is inf by definition
    return torch.where(n > 0, torch.where(lo == hi, a, torch.lerp(a, b, frac)), float("inf"))


# loss types whose policy term is PPO's clipped surrogate -min(rho A, clip(rho) A); they differ in the reduction
_CLIPPED_SURROGATE = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_LOG_1E_8 = math.log(1e-8)  # VESPO's floor of a log importance weight


def _vespo_weight(log_ratio: Tensor, m: Tensor, A: Tensor, opt: LossOptions) -> Tensor:
    """VESPO's detached gamma weight phi(w) = w^k e^(lambda (1 - w)), computed in log space, of the
    sequence ratio w = prod over the masked tokens of pi / old (times the engine / trainer ratios
    of importance_weights when given). log_ratio: (B, T), 0 at masked-out tokens; A: (B, 1) or
    (B, T), whose sign picks (k, lambda). Returns (B, 1), or (B, T) for per-token advantages."""
    with torch.no_grad():
        log_w = log_ratio.detach().clamp(-20.0, 20.0).sum(-1, keepdim=True)  # (B, 1)
        if opt.importance_weights is not None:  # (B, T): checked by _resolve_options
            log_is = torch.log(opt.importance_weights.detach().to(log_w.dtype)).clamp(_LOG_1E_8, 20.0)
            log_w = log_w + torch.where(m, log_is, 0.0).sum(-1, keepdim=True)
        log_w = log_w.clamp(_LOG_1E_8, 20.0)
        w = torch.exp(log_w)
        kp, lp, kn, ln = opt.vespo_k_pos, opt.vespo_lambda_pos, opt.vespo_k_neg, opt.vespo_lambda_neg
        log_phi = torch.where(A >= 0, lp + kp * log_w - lp * w, ln + kn * log_w - ln * w)
        return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))


def _check_advantages_and_logps(advantages, mask, old_logps, ref_logps, ref: Tensor, ref_name: str) -> None:
    """The (B, T) tensor arguments of policy_loss and policy_loss_from_hidden, against `ref`
    (the logits or the hidden states)."""
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    _check_bt("advantages", advantages, ref, allow_b=True, ref_name=ref_name)
    _check_mask(mask, ref, ref_name=ref_name)
    _check_bt("old_logps", old_logps, ref, ref_name=ref_name)
    _check_bt("ref_logps", ref_logps, ref, ref_name=ref_name)


def _resolve_options(fn: str, options: Optional[LossOptions], overrides: dict, ref_logps: Optional[Tensor],
                     ref: Tensor, ref_name: str) -> LossOptions:
    """The LossOptions of a policy_loss call: `options` (LossOptions() when None) with the keyword
    overrides replacing its fields (validated by LossOptions), then the checks that need the
    call's tensors: the option tensors' shapes against `ref`, and beta's ref_logps."""
    if options is not None and not isinstance(options, LossOptions):
        raise TypeError(f"options must be a LossOptions or None, got {type(options).__name__}")
    unknown = sorted(set(overrides).difference(_OPTION_NAMES))
    if unknown:
        raise TypeError(f"{fn} got unknown option(s) {', '.join(unknown)}; the options are the fields of "
                        f"LossOptions: {', '.join(_OPTION_NAMES)}")
    if "temperature" in overrides:
        _check_temperature(overrides["temperature"])
        overrides = dict(overrides, temperature=float(overrides["temperature"]))
    if options is None:
        opt = LossOptions(**overrides)
    else:
        opt = dataclasses.replace(options, **overrides) if overrides else options
    _check_bt("sampling_logps", opt.sampling_logps, ref, ref_name=ref_name)
    _check_weights(opt.importance_weights, ref)
    w = opt.importance_weights
    if opt.loss_type == "vespo" and w is not None and w.shape[1] != ref.shape[1]:
        raise ValueError(
            f"importance_weights has shape {_shape(w)}: loss_type='vespo' needs per-token (B, T) weights, which it "
            "folds into its sequence weight (TRL: vllm_importance_sampling_mode token_truncate or token_mask)"
        )
    if opt.beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={opt.beta} needs ref_logps (the reference model's log-probs), got None")
    return opt


def _policy_loss_from_logps(
    logp: Tensor,
    entropy: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    old_logps: Optional[Tensor],
    ref_logps: Optional[Tensor],
    opt: LossOptions,
) -> PolicyLossOutput:
    """Phase 2: the loss from per-token log-probs and entropies, all (B, T). The maths, once
    (docs/losses.md writes it out, with TRL's names)."""
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
    ratio = torch.exp(log_ratio)  # (B, T) or (B, 1)
    A_m = torch.where(m, A, 0.0) if A.shape[1] == T else A
    phi = None
    lt = opt.loss_type
    if lt in _CLIPPED_SURROGATE:
        ratio_clip = torch.clamp(ratio, 1.0 - opt.epsilon_low, 1.0 + opt.eps_high)
        ratio_main = ratio if opt.delta is None else torch.clamp(ratio, max=opt.delta)
        pg = -torch.minimum(ratio_main * A_m, ratio_clip * A_m)  # (B, T) or (B, 1) broadcast below
        if opt.clip_ratio_c is not None:
            pg = torch.where(A_m < 0, torch.minimum(pg, -opt.clip_ratio_c * A_m), pg)
    elif lt == "cispo":
        # a capped, stop-gradient importance weight times the log-prob: d/dlogp = -min(rho, cap) * A
        weight = torch.clamp(ratio, max=opt.eps_high).detach()
        pg = -weight * A_m * torch.where(m, logp, 0.0)  # (B, T)
    elif lt == "sapo":
        # a soft gate instead of the clip: (4 / tau) * sigmoid(tau * (rho - 1)), slope 1 at rho = 1
        tau = torch.where(A_m > 0, opt.sapo_temperature_pos, opt.sapo_temperature_neg)
        pg = -(torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)) * A_m
    elif lt == "vespo":
        # a stop-gradient gamma weight of the sequence's ratio times the log-prob: d/dlogp = -phi * A
        phi = _vespo_weight(log_ratio, m, A, opt)  # (B, 1) or (B, T), detached
        pg = -phi * A_m * torch.where(m, logp, 0.0)  # (B, T)
    else:  # a loss type in LOSS_TYPES without its policy term here
        raise NotImplementedError(f"loss_type={lt!r} has no policy term in _policy_loss_from_logps")
    per_token = pg.expand(B, T)

    # masks of the policy-gradient term only (the KL term keeps every token, as in TRL)
    keep_seq = None
    if opt.off_policy_mask_threshold is not None:
        # DeepSeek-V3.2 eq. 9: drop a sequence with A < 0 whose mean log(pi_sampling / pi) over its
        # tokens exceeds the threshold (a sample estimate of KL(pi_sampling || pi))
        samp = old if opt.sampling_logps is None else opt.sampling_logps.to(f32)
        d = torch.where(m, torch.nan_to_num(samp - logp.detach(), nan=0.0), 0.0)
        seq_kl = d.sum(-1, keepdim=True) / mw.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
        keep_seq = (A >= 0) | (seq_kl <= opt.off_policy_mask_threshold)  # (B, 1) or (B, T)
        per_token = per_token * keep_seq
    high_h = None
    if opt.top_entropy_quantile < 1.0:
        # "80/20": only the tokens whose entropy is in the top quantile of this micro-batch
        # (of all ranks' micro-batches with entropy_gather) carry the policy gradient
        thr = _entropy_threshold(entropy, m, 1.0 - opt.top_entropy_quantile, opt.entropy_gather)
        high_h = (entropy.detach() >= thr) & m
        per_token = per_token * high_h
    if opt.importance_weights is not None and lt != "vespo":  # vespo: inside phi
        # the engine / trainer mismatch correction (TRL: vllm_importance_sampling_correction)
        per_token = per_token * opt.importance_weights.detach().to(f32)

    kl = None
    if ref_logps is not None:
        r = torch.where(m, ref_logps.to(f32) - logp, 0.0)  # log(ref / pi)
        if opt.kl_estimator == "k1":
            kl = -r
        elif opt.kl_estimator == "k2":
            kl = 0.5 * r * r
        else:
            kl = torch.exp(r) - r - 1.0
        if opt.use_bias_correction_kl:
            # weighted by the (differentiable) ratio: an unbiased estimate of KL(pi || ref) under
            # samples from the old policy, and the gradient of the reverse KL even on-policy
            kl = kl * ratio
        if opt.beta != 0.0:
            per_token = per_token + opt.beta * kl

    # every loss_type is a per-token weight w; loss = sum(w * l)
    ga = opt.gradient_accumulation_steps
    if lt in ("grpo", "sapo"):
        w = mw / (mw.sum(-1, keepdim=True).clamp(min=1.0) * (B * ga))
    elif lt == "bnpo":
        w = mw / (mw.sum().clamp(min=1.0) * ga)
    elif lt == "dr_grpo":
        w = mw / (B * opt.max_completion_length * ga)
    elif lt == "luspo":  # each sequence's sum over its tokens (GSPO's mean times its length), mean over B
        w = mw / (B * ga)
    elif lt in ("dapo", "cispo", "vespo"):  # num_items_in_batch already spans the accumulated batch
        n = opt.num_items_in_batch
        if n is None:
            w = mw / mw.sum().clamp(min=1.0)
        else:
            w = mw / (n.to(f32) if isinstance(n, Tensor) else float(n))
    else:
        raise NotImplementedError(f"loss_type={lt!r} has no reduction in _policy_loss_from_logps")
    loss = torch.where(m, w * per_token, 0.0).sum()
    eff = m if high_h is None else high_h
    if opt.entropy_coef != 0.0:
        # the bonus is the mean entropy over the tokens the policy term uses, whatever the loss type
        mean_h = torch.where(eff, entropy, 0.0).sum() / eff.to(f32).sum().clamp(min=1.0)
        loss = loss - (opt.entropy_coef / ga) * mean_h

    with torch.no_grad():
        count = mw.sum().clamp(min=1.0)
        has = mw.sum(-1, keepdim=True) > 0  # (B, 1): the sequences with tokens
        n_seq = has.to(f32).sum().clamp(min=1.0)

        def frac(x: Tensor) -> Tensor:
            # as TRL: a (B, T) value is averaged over the masked tokens, a (B, 1) one (one per sequence:
            # a sequence-level ratio with (B,) advantages) over the sequences (here: those with tokens)
            return _masked_mean(x.to(f32), m, count) if x.shape[1] == T else _masked_mean(x.to(f32), has, n_seq)

        ratio_d = ratio.detach()  # (B, T) or (B, 1)
        cispo_clip = None
        if lt in _CLIPPED_SURROGATE:
            low = (ratio_d < 1.0 - opt.epsilon_low) & (A < 0)
            high = (ratio_d > 1.0 + opt.eps_high) & (A > 0)
        else:  # no two-sided clip
            low = high = torch.zeros((B, T), dtype=torch.bool, device=logp.device)
            if lt == "cispo":
                cispo_clip = frac((ratio_d > opt.eps_high) & (A > 0))
        mean_kl = None if kl is None else _masked_mean(kl.detach(), m, count)
        out = PolicyLossOutput(
            loss=loss,
            logps=logp.detach(),
            kl=mean_kl,
            entropy=_masked_mean(entropy.detach(), m, count),
            clip_ratio_low=frac(low),
            clip_ratio_high=frac(high),
            clip_ratio_region=frac(low | high),
            cispo_clip_ratio=cispo_clip,
            entropy_masked_frac=None if high_h is None else _masked_mean((~high_h).to(f32), m, count),
            off_policy_masked_frac=(None if keep_seq is None
                                    else _masked_mean((~keep_seq).expand(B, T).to(f32), m, count)),
            entropy_kept=(None if high_h is None else
                          _masked_mean(entropy.detach(), high_h, high_h.to(f32).sum().clamp(min=1.0))),
            vespo_phi_seq_mean=None if phi is None else frac(phi),
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
    options: Optional[LossOptions] = None,
    inplace_grad: bool = False,
    **option_overrides,
) -> PolicyLossOutput:
    """The GRPO / PPO clipped-surrogate loss (and CISPO, SAPO, LUSPO, VESPO) straight from the logits.

    Args:
        logits: (B, T, V) float32 / bfloat16 / float16 for the completion tokens (a strided
            view such as ``logits[:, :-1]`` is read without a copy).
        token_ids: (B, T) the sampled tokens, integers in [0, V).
        advantages: (B,) per sequence (GRPO) or (B, T) per token (PPO).
        mask: (B, T) completion mask (bool or 0/1); None means every token counts.
        old_logps: (B, T) log-probs under the sampling policy; None means on-policy
            (ratio 1, the gradient of rho * A).
        ref_logps: (B, T) log-probs under the reference model; needed when beta != 0.
        options: a LossOptions holding every loss option; None means LossOptions() (its defaults).
        inplace_grad: write the logits gradient into the logits tensor during backward
            (saves a logits-sized buffer; the logits must not be needed afterwards).
        **option_overrides: any LossOptions field by name, replacing the value in `options`
            (an unknown name is a TypeError naming it). The fields (docs/losses.md):

            loss_type: grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo (as in TRL).
            beta, kl_estimator: KL penalty coefficient and estimator k1 | k2 | k3.
            epsilon_low, epsilon_high, delta, clip_ratio_c: ratio clipping (epsilon_high
                defaults to epsilon_low; delta caps the unclipped ratio; clip_ratio_c is the
                dual clip for negative advantages). cispo: the weight is min(rho, epsilon_high).
            importance_sampling_level: token | sequence (GSPO; luspo needs sequence, vespo token).
            entropy_coef: subtracts entropy_coef * (the mean entropy over the masked tokens).
            temperature: the sampling temperature; logits are divided by it.
            max_completion_length: the constant normaliser of dr_grpo.
            num_items_in_batch: dapo / cispo / vespo normaliser (number or scalar tensor, > 0);
                the mask sum if None.
            sapo_temperature_pos, sapo_temperature_neg: sapo's gate temperatures for A > 0 / A <= 0.
            top_entropy_quantile: the policy term (and the entropy bonus) use only the tokens whose
                entropy is at or above this quantile-from-the-top of the masked tokens (1.0 = all).
            use_bias_correction_kl: multiply the KL term by the importance ratio (TRL's default).
            off_policy_mask_threshold: drop the policy term of sequences with A < 0 whose mean
                log(pi_sampling / pi) exceeds it (None = off).
            sampling_logps: (B, T) the sampling engine's log-probs for that mask; old_logps if None.
            entropy_gather: under torch.distributed, gathers the (B*T,) entropies (NaN = masked) of
                every rank, so the entropy quantile is over all ranks' tokens, as in TRL.
            gradient_accumulation_steps: micro-batches whose losses the caller sums for one step.
            importance_weights: (B, T) or (B, 1) detached weights multiplying the policy-gradient
                term (TRL's vLLM importance-sampling correction; grpo_fast.rl.rollout_importance_weights);
                vespo folds (B, T) weights into its sequence weight instead.
            vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, and any later field:
                described by their doc (``dataclasses.fields(LossOptions)[i].metadata["doc"]``).

    Returns:
        PolicyLossOutput(loss, logps, kl, entropy, clip_ratio_low, clip_ratio_high,
        clip_ratio_region, cispo_clip_ratio, entropy_masked_frac, off_policy_masked_frac,
        entropy_kept, vespo_phi_seq_mean):
        ``loss`` is differentiable w.r.t. the logits, the rest detached. Means over zero
        tokens (T == 0, or an all-zero mask) are 0.

    Equivalent plain torch for the default options (TRL's formulation)::

        logps = selective_log_softmax(logits, token_ids)
        ratio = torch.exp(logps - old_logps)            # old_logps = logps.detach() if None
        A = advantages.unsqueeze(1)
        per_token = -torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    """
    _check_logits(logits)
    _check_token_ids(token_ids, logits)
    _check_advantages_and_logps(advantages, mask, old_logps, ref_logps, logits, "logits")
    opt = _resolve_options("policy_loss", options, option_overrides, ref_logps, logits, "logits")
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad must be a bool, got {type(inplace_grad).__name__}")

    if token_ids.numel() == 0:  # no tokens: a zero loss with a zero gradient, on every backend
        logp, entropy = _empty_phase1(logits, token_ids)
        return _policy_loss_from_logps(logp, entropy, advantages, mask, old_logps, ref_logps, opt)
    whole, t_start, t_len = _time_window(logits)
    logp, _, entropy = torch.ops.grpo_fast.token_logprobs(
        whole, token_ids, float(opt.temperature), True, inplace_grad, t_start, t_len
    )
    if opt.entropy_coef == 0.0:
        entropy = entropy.detach()  # no entropy term in the gradient: the backward skips it
    return _policy_loss_from_logps(logp, entropy, advantages, mask, old_logps, ref_logps, opt)
