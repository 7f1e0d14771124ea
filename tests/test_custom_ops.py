"""The registered custom ops: opcheck, torch.compile, import hygiene, property tests."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo_fast
import grpo_fast.ops.functional  # noqa: F401  (registers the grpo_fast:: ops)
from reference import ref_policy_loss


def _sample(B=2, T=5, V=13, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    return logits, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_opcheck_token_logprobs(dtype, with_entropy):
    logits, ids = _sample(dtype=dtype)
    logits.requires_grad_()
    torch.library.opcheck(torch.ops.grpo_fast.token_logprobs.default,
                          (logits, ids, 0.8, with_entropy, False))


def test_opcheck_windowed():
    logits, _ = _sample(B=2, T=7, V=13)
    ids = torch.randint(0, 13, (2, 5))
    logits.requires_grad_()
    torch.library.opcheck(torch.ops.grpo_fast.token_logprobs.default, (logits, ids, 1.0, True, False, 1, 5))
    logp, lse, ent = torch.ops.grpo_fast.token_logprobs(logits, ids, 1.0, True, False, 1, 5)
    lse, ent = lse.detach(), ent.detach()
    args = (logits.detach(), ids, lse, ent, torch.randn_like(logp), torch.randn_like(ent), 1.0, 1, 5)
    torch.library.opcheck(torch.ops.grpo_fast.token_logprobs_backward.default, args)


def test_opcheck_backward_ops():
    logits, ids = _sample()
    logp, lse, ent = torch.ops.grpo_fast.token_logprobs(logits, ids, 1.0, True, False)
    gl, ge = torch.randn_like(logp), torch.randn_like(ent)
    torch.library.opcheck(torch.ops.grpo_fast.token_logprobs_backward.default,
                          (logits, ids, lse, ent, gl, ge, 1.0))
    torch.library.opcheck(torch.ops.grpo_fast.token_logprobs_backward.default,
                          (logits, ids, lse, ent, gl, None, 1.0))
    torch.library.opcheck(torch.ops.grpo_fast.token_logprobs_backward_.default,
                          (logits.clone(), ids, lse, ent, gl, ge, 1.0))


def _loss_fn(logits, ids, adv, mask, old, ref):
    out = grpo_fast.policy_loss(logits, ids, adv, mask, old, ref, beta=0.04, epsilon_high=0.28,
                                entropy_coef=0.01, temperature=0.9, loss_type="dapo")
    return out.loss, out.kl, out.entropy


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    B, T, V = 3, 7, 50
    logits, ids = _sample(B, T, V, seed=1)
    adv = torch.randn(B)
    mask = torch.rand(B, T) > 0.3
    old = torch.randn(B, T) * 0.1 - 4
    ref = torch.randn(B, T) * 0.1 - 4
    results = []
    for fn in (_loss_fn, torch.compile(_loss_fn, fullgraph=True, backend="aot_eager")):
        x = logits.clone().requires_grad_()
        loss, kl, ent = fn(x, ids, adv, mask, old, ref)
        loss.backward()
        results.append((loss.detach(), kl, ent, x.grad))
    (l0, k0, e0, g0), (l1, k1, e1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6) and torch.allclose(k0, k1) and torch.allclose(e0, e1)
    assert torch.allclose(g0, g1, atol=1e-7)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    B, T, V = 2, 6, 40
    logits, ids = _sample(B, T, V, seed=2)
    adv, mask = torch.randn(B), torch.ones(B, T, dtype=torch.bool)
    old, ref = torch.randn(B, T) - 3, torch.randn(B, T) - 3
    x0 = logits.clone().requires_grad_()
    l0 = _loss_fn(x0, ids, adv, mask, old, ref)[0]
    l0.backward()
    x1 = logits.clone().requires_grad_()
    l1 = torch.compile(_loss_fn, fullgraph=True)(x1, ids, adv, mask, old, ref)[0]
    l1.backward()
    assert torch.allclose(l0, l1, atol=1e-6) and torch.allclose(x0.grad, x1.grad, atol=1e-6)


def test_import_is_light():
    """Importing grpo_fast queries no device, imports no triton and no transformers."""
    code = (
        "import sys, torch\n"
        "called = []\n"
        "torch.cuda.is_available = lambda: called.append(1) or False\n"
        "torch.cuda.device_count = lambda: called.append(1) or 0\n"
        "import grpo_fast\n"
        "assert not called, 'device query at import'\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "grpo_fast.policy_loss\n"
        "assert 'triton' not in sys.modules, 'triton imported by the functional API'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 9),
    V=st.integers(1, 40),
    level=st.sampled_from(["token", "sequence"]),
    loss_type=st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"]),
    data=st.data(),
)
def test_property_random_shapes_and_masks(B, T, V, level, loss_type, data):
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B)))
    adv = torch.randn(B, generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0] + 0.5 * torch.randn(B, T, generator=g)
    kw = dict(importance_sampling_level=level, loss_type=loss_type, epsilon_high=0.3,
              max_completion_length=T + 2 if loss_type == "dr_grpo" else None)
    x = logits.clone().requires_grad_()
    out = grpo_fast.policy_loss(x, ids, adv, mask, old, **kw)
    out.loss.backward()
    x64 = logits.double().requires_grad_()
    ref, _ = ref_policy_loss(x64, ids, adv, mask, old, **kw)
    ref.backward()
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-4)
    # masked tokens get no gradient
    assert (x.grad[~mask] == 0).all()
