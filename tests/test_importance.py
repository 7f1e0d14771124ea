"""The rollout-engine importance-sampling correction (TRL's vllm_importance_sampling_*), against a
float64 reference written from the formula in plain Python, and its effect in policy_loss."""
import math

import pytest
import torch

import grpo_fast
from grpo_fast.rl import IS_MODES, rollout_importance_weights, rollout_logp_mismatch


def reference(trainer, engine, mask, mode, lo, hi):
    """Per completion, per token, in Python floats."""
    out = []
    for tr, en, m in zip(trainer.tolist(), engine.tolist(), mask.tolist()):
        deltas = [(a - b) * k for a, b, k in zip(tr, en, m)]
        deltas = [0.0 if math.isnan(d) else d for d in deltas]
        ratios = [math.exp(sum(deltas))] if mode.startswith("sequence") else [math.exp(d) for d in deltas]
        row = []
        for r in ratios:
            low = -math.inf if lo is None else lo
            high = math.inf if hi is None else hi
            if mode.endswith("truncate"):
                row.append(min(max(r, low), high))
            else:
                row.append(0.0 if (r < low or r > high) else r)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("bounds", [(None, 3.0), (0.5, 2.0), (0.9, None)])
def test_weights_match_the_formula(mode, bounds):
    g = torch.Generator().manual_seed(3)
    B, T = 6, 37
    trainer = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    engine = trainer + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)).to(torch.float64)
    engine[0, 2] = float("nan")  # a token the engine did not score: ratio 1 for it
    w, metrics = rollout_importance_weights(trainer, engine, mask, mode, *bounds)
    ref = reference(trainer, engine, mask, mode, *bounds)
    assert w.shape == ref.shape
    torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-6)
    valid = (mask.sum(1, keepdim=True) > 0) if mode.startswith("sequence") else mask > 0
    assert metrics["is_ratio_max"] == pytest.approx(float(ref[valid].max()), rel=1e-5)
    assert 0.0 <= metrics["is_masked_frac"] <= 1.0


def test_bad_mode_is_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        rollout_importance_weights(x, x, x, "token_clip")


def test_mismatch_metrics():
    tr = torch.tensor([[-1.0, -2.0, -3.0]])
    en = torch.tensor([[-1.1, float("nan"), -2.0]])
    m = torch.tensor([[1, 1, 0]])
    got = rollout_logp_mismatch(tr, en, m)
    assert got["rollout_logp_diff_max"] == pytest.approx(0.1, abs=1e-6)
    assert got["rollout_logp_diff_mean"] == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_policy_loss_multiplies_only_the_policy_term(per_sequence):
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 7, 50
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    ref = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(-1, ids[..., None])[..., 0]
    w = torch.rand((B, 1) if per_sequence else (B, T), generator=g, dtype=torch.float64) * 2
    kw = dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False)
    out = grpo_fast.policy_loss(logits, ids, adv, ref_logps=ref, importance_weights=w, **kw)
    # reference: on-policy ratio 1, pg = -A * rho (rho = exp(logp - logp.detach())), weighted, plus beta * k3
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    rho = torch.exp(logp - logp.detach())
    pg = -(rho * adv[:, None]) * w
    r = ref - logp
    per_token = pg + 0.1 * (torch.exp(r) - r - 1)
    expected = per_token.mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)
    g1, = torch.autograd.grad(out.loss, logits)
    g2, = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g1, g2)


def test_importance_weights_are_validated():
    logits = torch.randn(2, 3, 5)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="importance_weights has shape"):
        grpo_fast.policy_loss(logits, ids, torch.zeros(2), importance_weights=torch.ones(3, 2))
    with pytest.raises(TypeError, match="importance_weights"):
        grpo_fast.policy_loss(logits, ids, torch.zeros(2), importance_weights=torch.ones(2, 3, dtype=torch.long))


def test_fused_head_passes_the_weights_through():
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 5, 8, 37
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    w = torch.rand(B, T, generator=g, dtype=torch.float64)
    fused = grpo_fast.policy_loss_from_hidden(hidden, weight, ids, adv, importance_weights=w)
    plain = grpo_fast.policy_loss(hidden @ weight.T, ids, adv, importance_weights=w)
    assert fused.loss.item() == pytest.approx(plain.loss.item(), rel=1e-9)
    unweighted = grpo_fast.policy_loss(hidden @ weight.T, ids, adv)
    assert unweighted.loss.item() != pytest.approx(plain.loss.item(), rel=1e-3)
    with pytest.raises(ValueError, match="importance_weights has shape"):
        grpo_fast.policy_loss_from_hidden(hidden, weight, ids, adv, importance_weights=torch.ones(B, T + 1))
