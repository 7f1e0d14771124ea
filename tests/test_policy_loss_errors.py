"""Bad input to policy_loss / selective_log_softmax raises a clear error naming the argument."""
from __future__ import annotations

import pytest
import torch

import grpo_fast
from grpo_fast.ops.options import LOSS_TYPES
from conftest import backends
from reference import LOSS_TYPE_OPTIONS

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
    # issue 11 §5: refused the same way on both backends (see test_same_refusal_on_both_backends)
    (dict(token_ids=torch.zeros(B, T, dtype=torch.uint8)), TypeError, ["token_ids", "uint8", "int64", "int32"]),
    (dict(token_ids=torch.zeros(B, T, dtype=torch.int16)), TypeError, ["token_ids", "int16"]),
    (dict(token_ids=torch.zeros(B, T, dtype=torch.bool)), TypeError, ["token_ids", "bool"]),
    (dict(mask=torch.full((B, T), 2.0)), ValueError, ["mask", "0 and 1", "2.0"]),
    (dict(mask=torch.full((B, T), 0.5)), ValueError, ["mask", "0 and 1", "0.5"]),
    (dict(mask=torch.full((B, T), -1, dtype=torch.long)), ValueError, ["mask", "0 and 1", "-1"]),
    (dict(mask=torch.full((B, T), float("nan"))), ValueError, ["mask", "0 and 1"]),
    (dict(loss_type="dapo", num_items_in_batch=torch.tensor(0.0)), ValueError, ["num_items_in_batch", "> 0"]),
    (dict(loss_type="dapo", num_items_in_batch=torch.tensor(-3)), ValueError, ["num_items_in_batch", "-3"]),
    (dict(loss_type="dapo", num_items_in_batch=torch.tensor(float("nan"))), ValueError, ["num_items_in_batch"]),
    (dict(num_items_in_batch=-1.0), ValueError, ["num_items_in_batch", "-1.0"]),
    # the options of issue 14
    (dict(loss_type="cispo"), ValueError, ["cispo", "epsilon_high"]),
    (dict(sapo_temperature_pos=0.0), ValueError, ["sapo_temperature_pos", "0.0"]),
    (dict(sapo_temperature_neg=-1.0), ValueError, ["sapo_temperature_neg", "-1.0"]),
    (dict(top_entropy_quantile=1.5), ValueError, ["top_entropy_quantile", "1.5", "[0, 1]"]),
    (dict(top_entropy_quantile=-0.1), ValueError, ["top_entropy_quantile", "-0.1"]),
    (dict(top_entropy_quantile=float("nan")), ValueError, ["top_entropy_quantile"]),
    (dict(use_bias_correction_kl="yes"), TypeError, ["use_bias_correction_kl", "bool"]),
    (dict(off_policy_mask_threshold=float("inf")), ValueError, ["off_policy_mask_threshold"]),
    (dict(off_policy_mask_threshold="0.5"), TypeError, ["off_policy_mask_threshold", "str"]),
    (dict(sampling_logps=torch.randn(B, T + 1)), ValueError, ["sampling_logps", str((B, T + 1))]),
    (dict(sampling_logps=torch.zeros(B, T, dtype=torch.long)), TypeError, ["sampling_logps", "floating"]),
    (dict(entropy_gather=3), TypeError, ["entropy_gather", "callable"]),
    (dict(gradient_accumulation_steps=0), ValueError, ["gradient_accumulation_steps", "0"]),
    (dict(gradient_accumulation_steps=2.0), TypeError, ["gradient_accumulation_steps", "int"]),
    # luspo, vespo and the generic option path
    (dict(loss_type="luspo"), ValueError, ["importance_sampling_level='token'", "luspo", "'sequence'"]),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), ValueError,
     ["importance_sampling_level='sequence'", "vespo", "'token'"]),
    (dict(vespo_k_pos=-0.5), ValueError, ["vespo_k_pos", "-0.5"]),
    (dict(vespo_k_neg=float("inf")), ValueError, ["vespo_k_neg", "finite"]),
    (dict(vespo_lambda_pos=0.0), ValueError, ["vespo_lambda_pos", "0.0", "0.0001"]),
    (dict(vespo_lambda_neg=-1.0), ValueError, ["vespo_lambda_neg", "-1.0"]),
    (dict(vespo_lambda_neg="2"), TypeError, ["vespo_lambda_neg", "str"]),
    (dict(loss_type="vespo", importance_weights=torch.ones(B, 1)), ValueError,
     ["importance_weights", str((B, 1)), "vespo", "(B, T)"]),
    (dict(vespo_kpos=2.0), TypeError, ["unknown option", "vespo_kpos", "policy_loss"]),
    (dict(options=dict(loss_type="vespo")), TypeError, ["options", "LossOptions", "dict"]),
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


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", ["uint8", "int16", "mask2", "n0"])
def test_same_refusal_on_both_backends(backend, case, monkeypatch):
    """The same bad input gets the same error class and message on the PyTorch path and the kernels
    (before: RuntimeError from gather on one, TypeError on the other; masks of 2 and a zero tensor
    num_items_in_batch were silently used)."""
    monkeypatch.setenv("GRPO_FAST_BACKEND", backend)
    override = {
        "uint8": dict(token_ids=torch.zeros(B, T, dtype=torch.uint8)),
        "int16": dict(token_ids=torch.zeros(B, T, dtype=torch.int16)),
        "mask2": dict(mask=torch.full((B, T), 2.0)),
        "n0": dict(loss_type="dapo", num_items_in_batch=torch.tensor(0)),
    }[case]
    exc = TypeError if case in ("uint8", "int16") else ValueError
    with pytest.raises(exc) as info:
        _call(**override)
    first = str(info.value)
    if case in ("uint8", "int16"):  # selective_log_softmax shares the check
        with pytest.raises(exc):
            grpo_fast.selective_log_softmax(torch.randn(B, T, V), override["token_ids"])
    assert first


@pytest.mark.parametrize("backend", backends())
def test_zero_length_completions_work(backend, monkeypatch):
    """T = 0 (issue 11 §5): a zero loss with a zero gradient, metrics 0 (means over no tokens)."""
    monkeypatch.setenv("GRPO_FAST_BACKEND", backend)
    logits = torch.randn(B, 0, V, requires_grad=True)
    out = grpo_fast.policy_loss(logits, torch.zeros(B, 0, dtype=torch.long), torch.randn(B))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.entropy.item() == 0.0 and out.clip_ratio_region.item() == 0.0
    assert logits.grad.shape == (B, 0, V)


def test_float_and_int_masks_of_zeros_and_ones_are_accepted():
    for mask in (torch.ones(B, T), torch.ones(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.int32),
                 torch.ones(B, T, dtype=torch.bfloat16)):
        mask[0, -1] = 0
        out = _call(mask=mask)
        ref = _call(mask=mask != 0)
        assert torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_cuda_checks_need_no_host_sync(loss_type):
    """On CUDA the value checks are device-side asserts, and phase 2 reads nothing back: no .item() /
    bool() of a device tensor, for every loss type (with the vLLM weights, which vespo folds in)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kw = {k: v.cuda() for k, v in _inputs().items()}
    kw["mask"] = kw["mask"].float()
    opts = dict(LOSS_TYPE_OPTIONS[loss_type], loss_type=loss_type)
    opts["num_items_in_batch"] = torch.tensor(9.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grpo_fast.policy_loss(kw.pop("logits"), kw.pop("token_ids"), kw.pop("advantages"), **kw, **opts,
                                    top_entropy_quantile=0.5, off_policy_mask_threshold=0.1, beta=0.01,
                                    importance_weights=torch.full((B, T), 0.9, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss)
