"""A plain float64 reference of DESIGN.md's maths, written from the formulas and
independent of the library (no chunking, no custom ops, TRL-style tensors)."""
from __future__ import annotations

import torch


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
):
    """float64 loss and metrics dict; the loss is differentiable w.r.t. logits."""
    B, T = ids.shape
    logp, ent = ref_token_stats(logits, ids, temperature)
    m = torch.ones(B, T, dtype=torch.float64) if mask is None else mask.double()
    mb = m != 0
    old = logp.detach() if old_logps is None else old_logps.double()
    eh = epsilon_low if epsilon_high is None else epsilon_high
    lr = torch.where(mb, logp - old, torch.zeros_like(logp))
    if importance_sampling_level == "sequence":
        lr = (lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        lr = lr.expand(B, T)
    rho = torch.exp(lr)
    A = advantages.double()
    A = A[:, None].expand(B, T) if A.dim() == 1 else torch.where(mb, A, torch.zeros_like(A))
    rho_c = rho.clamp(1 - epsilon_low, 1 + eh)
    rho_u = rho if delta is None else rho.clamp(max=delta)
    pg = -torch.min(rho_u * A, rho_c * A)
    if clip_ratio_c is not None:
        pg = torch.where(A < 0, torch.min(pg, -clip_ratio_c * A), pg)
    loss_tok = pg
    kl = None
    if ref_logps is not None:
        r = torch.where(mb, ref_logps.double() - logp, torch.zeros_like(logp))
        kl = {"k1": -r, "k2": r * r / 2, "k3": torch.exp(r) - r - 1}[kl_estimator]
        loss_tok = loss_tok + beta * kl
    loss_tok = loss_tok - entropy_coef * ent
    if loss_type == "grpo":
        w = m / (m.sum(-1, keepdim=True).clamp(min=1) * B)
    elif loss_type == "bnpo":
        w = m / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        w = m / (B * max_completion_length)
    else:
        w = m / (m.sum().clamp(min=1) if num_items_in_batch is None else float(num_items_in_batch))
    loss = torch.where(mb, w * loss_tok, torch.zeros_like(loss_tok)).sum()
    cnt = m.sum().clamp(min=1)

    def mmean(x):
        return torch.where(mb, x.double(), torch.zeros_like(m)).sum() / cnt

    low = (rho < 1 - epsilon_low) & (A < 0)
    high = (rho > 1 + eh) & (A > 0)
    metrics = {
        "logps": logp.detach(),
        "kl": None if kl is None else mmean(kl.detach()),
        "entropy": mmean(ent.detach()),
        "clip_ratio_low": mmean(low),
        "clip_ratio_high": mmean(high),
        "clip_ratio_region": mmean(low | high),
    }
    return loss, metrics
