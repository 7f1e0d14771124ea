"""Bad input to policy_loss / selective_log_softmax raises a clear error naming the argument."""
from __future__ import annotations

import pytest
import torch

import grpo_fast

B, T, V = 2, 5, 11


def _inputs():
    torch.manual_seed(0)
    return dict(
        logits=torch.randn(B, T, V),
        token_ids=torch.randint(0, V, (B, T)),
        advantages=torch.randn(B),
        mask=torch.ones(B, T, dtype=torch.bool),
        old_logps=torch.randn(B, T),
        ref_logps=torch.randn(B, T),
    )


def _call(**override):
    kw = _inputs()
    opts = {k: override.pop(k) for k in list(override) if k not in kw}
    kw.update(override)
    return grpo_fast.policy_loss(kw.pop("logits"), kw.pop("token_ids"), kw.pop("advantages"), **kw, **opts)


CASES = [
    # (override, exception, words the message must contain)
    (dict(logits=torch.randn(B, T, V).long()), TypeError, ["logits", "int64"]),
    (dict(logits=torch.randn(B * T, V)), ValueError, ["logits", "(B, T, V)", str((B * T, V))]),
    (dict(token_ids=torch.randint(0, V, (B, T + 1))), ValueError, ["token_ids", str((B, T + 1)), str((B, T))]),
    (dict(token_ids=torch.randn(B, T)), TypeError, ["token_ids", "integer"]),
    (dict(token_ids=torch.full((B, T), V)), ValueError, ["token_ids", f"[0, {V})", str(V)]),
    (dict(token_ids=torch.full((B, T), -1)), ValueError, ["token_ids", "-1"]),
    (dict(mask=torch.ones(B, T + 2)), ValueError, ["mask", str((B, T + 2))]),
    (dict(advantages=torch.randn(B + 1)), ValueError, ["advantages", str((B + 1,)), "(B,)"]),
    (dict(advantages=torch.randn(B, T - 1)), ValueError, ["advantages", str((B, T - 1))]),
    (dict(advantages=[1.0, 2.0]), TypeError, ["advantages", "list"]),
    (dict(old_logps=torch.randn(B, T, 1)), ValueError, ["old_logps", str((B, T, 1))]),
    (dict(ref_logps=torch.randn(T, B)), ValueError, ["ref_logps", str((T, B))]),
    (dict(temperature=0.0), ValueError, ["temperature", "0.0"]),
    (dict(temperature=-1.0), ValueError, ["temperature"]),
    (dict(temperature=float("nan")), ValueError, ["temperature"]),
    (dict(loss_type="ppo"), ValueError, ["loss_type", "'ppo'", "grpo"]),
    (dict(kl_estimator="k4"), ValueError, ["kl_estimator", "'k4'", "k3"]),
    (dict(importance_sampling_level="seq"), ValueError, ["importance_sampling_level", "'seq'", "sequence"]),
    (dict(beta=0.1, ref_logps=None), ValueError, ["beta", "ref_logps"]),
    (dict(loss_type="dr_grpo"), ValueError, ["dr_grpo", "max_completion_length"]),
    (dict(loss_type="dr_grpo", max_completion_length=0), ValueError, ["max_completion_length", "0"]),
    (dict(epsilon_low=-0.1), ValueError, ["epsilon_low", "-0.1"]),
    (dict(epsilon_low=1.0), ValueError, ["epsilon_low"]),
    (dict(epsilon_high=-1.0), ValueError, ["epsilon_high"]),
    (dict(delta=0.5), ValueError, ["delta", "0.5"]),
    (dict(clip_ratio_c=1.0), ValueError, ["clip_ratio_c", "1.0"]),
    (dict(num_items_in_batch=0), ValueError, ["num_items_in_batch"]),
    (dict(num_items_in_batch=torch.ones(3)), ValueError, ["num_items_in_batch", "(3,)"]),
    (dict(beta="0.1"), TypeError, ["beta", "str"]),
    (dict(inplace_grad="yes"), TypeError, ["inplace_grad"]),
]


@pytest.mark.parametrize("override,exc,words", CASES, ids=lambda c: str(c)[:40] if not isinstance(c, (list, type)) else None)
def test_bad_input_raises(override, exc, words):
    with pytest.raises(exc) as info:
        _call(**dict(override))
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_selective_log_softmax_bad_input():
    kw = _inputs()
    with pytest.raises(TypeError, match="logits"):
        grpo_fast.selective_log_softmax(kw["logits"].to(torch.int32), kw["token_ids"])
    with pytest.raises(ValueError, match="token_ids"):
        grpo_fast.selective_log_softmax(kw["logits"], kw["token_ids"] + V)
    with pytest.raises(ValueError, match="temperature"):
        grpo_fast.selective_log_softmax(kw["logits"], kw["token_ids"], temperature=0)


def test_bad_backend_setting(monkeypatch):
    monkeypatch.setenv("GRPO_FAST_BACKEND", "cuda")
    kw = _inputs()
    with pytest.raises(ValueError, match="GRPO_FAST_BACKEND"):
        grpo_fast.selective_log_softmax(kw["logits"], kw["token_ids"])


def test_good_input_still_works():
    out = _call(beta=0.1, loss_type="dapo", num_items_in_batch=torch.tensor(7.0))
    assert torch.isfinite(out.loss)
