"""A plain float64 reference of the maths in docs/design.md, written from the formulas and
independent of the library (no chunking, no custom ops, TRL-style tensors)."""
from __future__ import annotations

import math

import torch

# For every loss type: the options a test of it needs (what it requires, and values that make it
# differ from its neighbours). A loss type in grpo_fast's LOSS_TYPES that is missing here fails
# tests/test_loss_variants.py::test_every_loss_type_has_a_reference.
LOSS_TYPE_OPTIONS = {
    "grpo": {},
    "bnpo": {},
    "dr_grpo": {"max_completion_length": 41},
    "dapo": {"num_items_in_batch": 57},
    "cispo": {"epsilon_high": 1.25},
    "sapo": {"sapo_temperature_pos": 2.0, "sapo_temperature_neg": 0.7},
    "luspo": {"importance_sampling_level": "sequence", "epsilon_low": 0.05, "epsilon_high": 0.08},
    "vespo": {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 3.5, "vespo_lambda_neg": 1.2},
}
# loss types whose value holds sg(weight) * logp: finite differences of the value are not the
# gradient they define (d/dlogp = -weight * A), so gradchecks hold their weight fixed
DETACHED_WEIGHT = ("cispo", "vespo")


def ref_token_stats(logits, ids, temperature=1.0):
    """float64 (logp, entropy) of every token; differentiable."""
    z = logits.double() / temperature
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    # p * log p with p = 0 counts 0
    ent = -torch.where(p > 0, p * logsm, torch.zeros_like(p)).sum(-1)
    return logp, ent


def ref_policy_loss(
    logits, ids, advantages, mask=None, old_logps=None, ref_logps=None, *,
    loss_type="grpo", beta=0.0, kl_estimator="k3", epsilon_low=0.2, epsilon_high=None,
    delta=None, clip_ratio_c=None, importance_sampling_level="token", entropy_coef=0.0,
    temperature=1.0, max_completion_length=None, num_items_in_batch=None,
    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, top_entropy_quantile=1.0,
    use_bias_correction_kl=True, off_policy_mask_threshold=None, sampling_logps=None,
    gradient_accumulation_steps=1, extra_entropies=None, importance_weights=None,
    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
):
    """float64 loss and metrics dict; the loss is differentiable w.r.t. logits.

    extra_entropies: entropies of other ranks' masked tokens, joined for the quantile
    (what entropy_gather does)."""
    B, T = ids.shape
    logp, ent = ref_token_stats(logits, ids, temperature)
    m = torch.ones(B, T, dtype=torch.float64) if mask is None else mask.double()
    mb = m != 0
    zeros = torch.zeros_like(logp)
    old = logp.detach() if old_logps is None else old_logps.double()
    eh = epsilon_low if epsilon_high is None else epsilon_high
    lr = torch.where(mb, logp - old, zeros)
    if importance_sampling_level == "sequence":
        lr = (lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        lr = lr.expand(B, T)
    rho = torch.exp(lr)
    A = advantages.double()
    A = A[:, None].expand(B, T) if A.dim() == 1 else torch.where(mb, A, torch.zeros_like(A))
    phi = None
    if loss_type == "cispo":
        # MiniMax-M1 / TRL: -sg(min(rho, eps_high)) * A * log pi
        pg = -rho.clamp(max=eh).detach() * A * logp
    elif loss_type == "sapo":
        tau = torch.where(A > 0, torch.full_like(A, sapo_temperature_pos), torch.full_like(A, sapo_temperature_neg))
        pg = -torch.sigmoid(tau * (rho - 1)) * 4 / tau * A
    elif loss_type == "vespo":
        # VESPO / TRL: w = the sequence's product of token ratios (each log clamped to [-20, 20]), times
        # the engine / trainer ratios (logs floored at log 1e-8), log w clamped to [log 1e-8, 20];
        # phi(w) = w^k exp(lambda (1 - w)), (k, lambda) by the sign of A (>= 0: "pos"); -sg(phi) A log pi
        tok = torch.where(mb, (logp - old).clamp(-20, 20), zeros).detach()
        log_w = tok.sum(-1, keepdim=True)
        if importance_weights is not None:
            lis = torch.log(importance_weights.double()).clamp(math.log(1e-8), 20)
            log_w = log_w + torch.where(mb, lis.expand(B, T), zeros).sum(-1, keepdim=True)
        log_w = log_w.clamp(math.log(1e-8), 20).expand(B, T)
        pos = A >= 0
        k = torch.where(pos, torch.full_like(A, vespo_k_pos), torch.full_like(A, vespo_k_neg))
        lam = torch.where(pos, torch.full_like(A, vespo_lambda_pos), torch.full_like(A, vespo_lambda_neg))
        phi = torch.exp(k * log_w + lam * (1 - torch.exp(log_w)))
        pg = -phi * A * logp
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        rho_c = rho.clamp(1 - epsilon_low, 1 + eh)
        rho_u = rho if delta is None else rho.clamp(max=delta)
        pg = -torch.min(rho_u * A, rho_c * A)
        if clip_ratio_c is not None:
            pg = torch.where(A < 0, torch.min(pg, -clip_ratio_c * A), pg)
    else:
        raise NotImplementedError(f"no float64 reference for loss_type={loss_type!r}: add it to tests/reference.py")
    keep = torch.ones(B, T, dtype=torch.bool)
    if off_policy_mask_threshold is not None:
        samp = old if sampling_logps is None else sampling_logps.double()
        d = torch.where(mb, samp - logp.detach(), zeros)
        seq = d.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        keep = ((A >= 0) | (seq <= off_policy_mask_threshold)).expand(B, T)
    high = mb.clone()
    if top_entropy_quantile < 1.0:
        vals = ent.detach()[mb].double()
        if extra_entropies is not None:
            vals = torch.cat([vals, extra_entropies.double()])
        thr = float("inf") if vals.numel() == 0 else torch.quantile(vals, 1 - top_entropy_quantile).item()
        high = (ent.detach() >= thr) & mb
    loss_tok = torch.where(keep & high, pg, zeros)
    if importance_weights is not None and loss_type != "vespo":
        loss_tok = loss_tok * importance_weights.double()
    kl = None
    if ref_logps is not None:
        r = torch.where(mb, ref_logps.double() - logp, zeros)
        kl = {"k1": -r, "k2": r * r / 2, "k3": torch.exp(r) - r - 1}[kl_estimator]
        if use_bias_correction_kl:
            kl = kl * rho
        loss_tok = loss_tok + beta * kl
    ga = gradient_accumulation_steps
    if loss_type in ("grpo", "sapo"):
        loss = ((loss_tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean() / ga
    elif loss_type == "bnpo":
        loss = (loss_tok * m).sum() / m.sum().clamp(min=1) / ga
    elif loss_type == "dr_grpo":
        loss = (loss_tok * m).sum() / (B * max_completion_length) / ga
    elif loss_type == "luspo":  # LUSPO: GSPO's per-sequence loss times the length = the sum over its tokens
        loss = (loss_tok * m).sum(-1).mean() / ga
    elif loss_type in ("dapo", "cispo", "vespo"):
        n = m.sum().clamp(min=1) if num_items_in_batch is None else float(num_items_in_batch)
        loss = (loss_tok * m).sum() / n
    else:
        raise NotImplementedError(f"no float64 reference reduction for loss_type={loss_type!r}")
    if entropy_coef != 0.0:
        eff = high.double()
        loss = loss - entropy_coef * (ent * eff).sum() / eff.sum().clamp(min=1) / ga
    cnt = m.sum().clamp(min=1)

    def mmean(x):
        return torch.where(mb, x.double(), torch.zeros_like(m)).sum() / cnt

    has = m.sum(-1) > 0  # the sequences with tokens

    def seq_mean(x):  # x (B, T), the same value at every token of a sequence: its mean over the sequences
        per_seq = x[:, 0].double() if T else torch.zeros(B, dtype=torch.float64)
        return per_seq[has].sum() / has.sum().clamp(min=1)

    # TRL: a fraction of a per-sequence event (sequence-level ratio, (B,) advantages) is over sequences
    frac = seq_mean if (importance_sampling_level == "sequence" and advantages.dim() == 1) else mmean
    if loss_type in ("cispo", "sapo", "vespo"):
        low = hi_c = torch.zeros(B, T, dtype=torch.bool)
    else:
        low = (rho < 1 - epsilon_low) & (A < 0)
        hi_c = (rho > 1 + eh) & (A > 0)
    metrics = {
        "logps": logp.detach(),
        "kl": None if kl is None else mmean(kl.detach()),
        "entropy": mmean(ent.detach()),
        "clip_ratio_low": frac(low),
        "clip_ratio_high": frac(hi_c),
        "clip_ratio_region": frac(low | hi_c),
        "cispo_clip_ratio": frac((rho > eh) & (A > 0)) if loss_type == "cispo" else None,
        "entropy_masked_frac": mmean(~high) if top_entropy_quantile < 1.0 else None,
        "off_policy_masked_frac": mmean(~keep) if off_policy_mask_threshold is not None else None,
        "entropy_kept": ((ent.detach() * high).sum() / high.sum().clamp(min=1)
                         if top_entropy_quantile < 1.0 else None),
        "vespo_phi_seq_mean": None,
    }
    if phi is not None:  # one phi per sequence with (B,) advantages
        metrics["vespo_phi_seq_mean"] = seq_mean(phi) if advantages.dim() == 1 else mmean(phi)
    return loss, metrics
