"""The fused LM head (selective_log_softmax_from_hidden, policy_loss_from_hidden) against
float64 references built from explicit logits.

The reference forms z = softcap((h·Wᵀ + b)·logit_scale) / temperature in float64 and runs
tests/reference.py (written from the formulas, independent of the library); its
gradients w.r.t. hidden, weight and bias come from autograd through that. Each
property is one _check_* over sample_inputs(), run per backend: the PyTorch tile path,
and the Triton kernels under TRITON_INTERPRET=1 (slow, so small shapes there).
Vocabularies are no multiple of any tile (V = 1000, 257, 50257), T is odd.
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import grpo_fast
import grpo_fast.ops._backend
from grpo_fast.ops import _torch_fused
from grpo_fast.ops.options import LossOptions
from conftest import backends
from reference import ref_policy_loss, ref_token_stats


BACKENDS = backends()   # triton whenever it is installed: kernels that fail to import fail here
DEVICE = "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("GRPO_FAST_BACKEND", request.param)
    if request.param == "torch":
        # small tiles, so even these shapes cross many tile boundaries in both directions
        monkeypatch.setattr(_torch_fused, "TILE_ELEMS", 4096)
        monkeypatch.setattr(_torch_fused, "TILE_V", 384)
    return request.param


def _shape_for(backend, B=3, T=37, H=32, V=1000):
    # the interpreter is slow: fewer tokens and entries, still no multiple of any block
    # (kernel blocks here: 16 tokens, 64 vocabulary entries, 32 hidden units per dot step)
    return (B, T, H, V) if backend == "torch" else (2, 11, 40, 257)


def sample_inputs(dtype=torch.float32, B=3, T=37, H=32, V=1000, *, bias=False, strided=True,
                  per_token_adv=False, seed=0, head=None):
    """hidden (a [:, :-1] view of a (B, T+1, H) tensor when strided), weight, bias, ids, and
    for the loss: advantages, a ragged mask with one empty row, old and ref log-probs near
    the current ones (so ratios straddle the clip range). Logits come out with std ~3."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T + 1, H, generator=g, dtype=torch.float64).to(dtype)
    hidden = base[:, :-1] if strided else base[:, :-1].contiguous()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 3 / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    if B > 1:
        mask[-1] = False  # a fully masked sequence must add 0, not NaN
    logits = ref_logits(hidden, weight, b, **(head or {}))
    logp, _ = ref_token_stats(logits, ids)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g)
    return dict(hidden=hidden, weight=weight, bias=b, ids=ids, adv=adv, mask=mask, old=old, ref=ref)


def ref_logits(hidden, weight, bias, logit_scale=1.0, final_logit_softcapping=None):
    """float64 (B, T, V) logits before the temperature; differentiable w.r.t. the inputs."""
    x = hidden.double() @ weight.double().T
    if bias is not None:
        x = x + bias.double()
    x = x * logit_scale
    c = final_logit_softcapping
    return x if c is None else c * torch.tanh(x / c)


def _leaves(inp, dtype=None):
    """Fresh leaves (hidden keeps its strided layout), optionally cast."""
    def leaf(t):
        if t is None:
            return None
        t = t.detach() if dtype is None else t.detach().to(dtype)
        return t.requires_grad_()
    h = inp["hidden"]
    if dtype is None and not h.is_contiguous():
        # re-create the [:, :-1] view of a leaf of the same layout
        full = torch.empty(h.shape[0], h.shape[1] + 1, h.shape[2], dtype=h.dtype)
        full[:, :-1] = h.detach()
        full.requires_grad_()
        return full, full[:, :-1], leaf(inp["weight"]), leaf(inp["bias"])
    hl = leaf(h)
    return hl, hl, leaf(inp["weight"]), leaf(inp["bias"])


def _grad_of(leaf, view):
    g = leaf.grad
    return g[:, :-1] if leaf is not view else g


# tolerances: our arithmetic is float32 whatever the input dtype (float64 for float64);
# half-precision gradients are rounded once, at the end, to the input dtype
def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}[dtype]


def _grad_tol(dtype):
    tol = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    if dtype in (torch.bfloat16, torch.float16) and grpo_fast.ops._backend.backend_setting() == "triton":
        # the kernels' gradient GEMMs take the logits gradient in the inputs' dtype, as tensor cores
        # (and cuBLAS) do: one more rounding of it, which the interpreter makes by truncation (1 ulp)
        tol *= 2.5
    return tol


def _close_grad(g, g64, dtype, name):
    assert g is not None and g.dtype == dtype, (name, None if g is None else g.dtype)
    scale = g64.abs().max().item() + 1e-30
    err = (g.double() - g64).abs().max().item()
    assert err <= _grad_tol(dtype) * scale, (name, err, scale)


# ------------------------------------------------------------------ checks

def _check_loss(inp, *, use_old=True, use_ref=True, head=None, **opts):
    head = head or {}
    dtype = inp["hidden"].dtype
    full, hidden, weight, bias = _leaves(inp)
    kw = dict(mask=inp["mask"], old_logps=inp["old"] if use_old else None,
              ref_logps=inp["ref"] if use_ref else None)
    out = grpo_fast.policy_loss_from_hidden(hidden, weight, inp["ids"], inp["adv"], **kw, bias=bias,
                                            **head, **opts)
    upstream = 1.7
    (out.loss * upstream).backward()

    f64, h64, w64, b64 = _leaves(inp, torch.float64)
    ref_loss, ref_m = ref_policy_loss(ref_logits(h64, w64, b64, **head), inp["ids"], inp["adv"], **kw, **opts)
    (ref_loss * upstream).backward()

    assert torch.isfinite(out.loss)
    scale = max(1.0, abs(ref_loss.item()))
    assert abs(out.loss.item() - ref_loss.item()) <= 10 * _tol(dtype) * scale, (out.loss.item(), ref_loss.item())
    _close_grad(_grad_of(full, hidden), h64.grad, dtype, "hidden")
    _close_grad(weight.grad, w64.grad, dtype, "weight")
    if bias is not None:
        _close_grad(bias.grad, b64.grad, dtype, "bias")
    m = inp["mask"]
    assert torch.allclose(out.logps.double()[m], ref_m["logps"][m], atol=1e-4, rtol=1e-5)
    for name in ("entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        assert abs(getattr(out, name).item() - ref_m[name].item()) <= 1e-4 * max(1.0, abs(ref_m[name].item())), name
    if ref_m["kl"] is None:
        assert out.kl is None
    else:
        assert abs(out.kl.item() - ref_m["kl"].item()) <= 1e-4 * max(1.0, abs(ref_m["kl"].item()))
    return out


def _check_logprobs(inp, *, temperature=0.8, head=None, return_entropy=True, seed=0):
    """logps and entropy, and all three gradients for a random upstream gradient on both."""
    head = head or {}
    dtype = inp["hidden"].dtype
    full, hidden, weight, bias = _leaves(inp)
    res = grpo_fast.selective_log_softmax_from_hidden(hidden, weight, inp["ids"], temperature, return_entropy,
                                                      bias=bias, **head)
    logp, ent = res if return_entropy else (res, None)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    f64, h64, w64, b64 = _leaves(inp, torch.float64)
    lp64, ent64 = ref_token_stats(ref_logits(h64, w64, b64, **head), inp["ids"], temperature)
    tol = {torch.float64: 1e-10}.get(dtype, 1e-4)
    assert (logp.double() - lp64).abs().max().item() <= tol * max(1.0, lp64.abs().max().item())
    g = torch.Generator().manual_seed(seed + 100)
    g_lp = torch.randn(logp.shape, generator=g, dtype=torch.float64)
    loss, loss64 = (logp * g_lp.to(logp.dtype)).sum(), (lp64 * g_lp).sum()
    if return_entropy:
        assert (ent.double() - ent64).abs().max().item() <= tol * max(1.0, ent64.abs().max().item())
        g_h = torch.randn(ent.shape, generator=g, dtype=torch.float64)
        loss, loss64 = loss + (ent * g_h.to(ent.dtype)).sum(), loss64 + (ent64 * g_h).sum()
    loss.backward()
    loss64.backward()
    _close_grad(_grad_of(full, hidden), h64.grad, dtype, "hidden")
    _close_grad(weight.grad, w64.grad, dtype, "weight")
    if bias is not None:
        _close_grad(bias.grad, b64.grad, dtype, "bias")


# ------------------------------------------------------------------ option matrix (both backends)

HEADS = [
    dict(),
    dict(logit_scale=0.37),
    dict(final_logit_softcapping=4.0),
    dict(logit_scale=1.9, final_logit_softcapping=6.5),
]
HEAD_IDS = ["plain", "scale", "softcap", "scale+softcap"]

LOSS_TYPES = [("grpo", {}), ("bnpo", {}), ("dr_grpo", {"max_completion_length": 40}),
              ("dapo", {}), ("dapo", {"num_items_in_batch": 23})]


@pytest.mark.parametrize("loss_type,extra", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias", [False, True])
def test_loss_types_and_levels(backend, loss_type, extra, level, bias):
    B, T, H, V = _shape_for(backend)
    inp = sample_inputs(B=B, T=T, H=H, V=V, bias=bias)
    _check_loss(inp, loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon_high=0.28, **extra)


CLIP_OPTIONS = [
    dict(),
    dict(epsilon_low=0.1, epsilon_high=0.3),
    dict(delta=1.5),
    dict(clip_ratio_c=3.0),
    dict(delta=1.4, clip_ratio_c=2.0, epsilon_high=0.25),
]


@pytest.mark.parametrize("clip", CLIP_OPTIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_clipping_options(backend, clip, per_token_adv):
    B, T, H, V = _shape_for(backend)
    inp = sample_inputs(B=B, T=T, H=H, V=V, per_token_adv=per_token_adv, bias=True, seed=1)
    inp["old"] = inp["old"] + 0.8 * torch.randn_like(inp["old"])  # many ratios outside every clip range
    _check_loss(inp, **clip)


@pytest.mark.parametrize("kl_estimator,beta", [("k1", 0.1), ("k2", 0.1), ("k3", 0.1), ("k3", 0.0)])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_entropy_temperature(backend, kl_estimator, beta, entropy_coef, temperature):
    B, T, H, V = _shape_for(backend)
    inp = sample_inputs(B=B, T=T, H=H, V=V, seed=2)
    _check_loss(inp, kl_estimator=kl_estimator, beta=beta, entropy_coef=entropy_coef, temperature=temperature)


@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("bias", [False, True])
def test_head_transforms_in_the_loss(backend, head, bias):
    B, T, H, V = _shape_for(backend)
    inp = sample_inputs(B=B, T=T, H=H, V=V, bias=bias, seed=3, head=head)
    _check_loss(inp, head=head, beta=0.04, entropy_coef=0.01, temperature=0.9)


@pytest.mark.parametrize("use_old,use_ref", [(False, False), (True, False), (False, True)])
def test_on_policy_and_optional_inputs(backend, use_old, use_ref):
    B, T, H, V = _shape_for(backend)
    inp = sample_inputs(B=B, T=T, H=H, V=V, seed=4)
    out = _check_loss(inp, use_old=use_old, use_ref=use_ref, beta=0.05 if use_ref else 0.0)
    if not use_old:
        assert out.clip_ratio_region.item() == 0.0  # on-policy: every ratio is exactly 1


@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_entropy_and_gradients(backend, head, bias, dtype):
    B, T, H, V = _shape_for(backend)
    inp = sample_inputs(dtype, B=B, T=T, H=H, V=V, bias=bias, seed=5)
    _check_logprobs(inp, head=head)


@pytest.mark.parametrize("strided", [False, True])
def test_logprobs_without_entropy(backend, strided):
    B, T, H, V = _shape_for(backend)
    inp = sample_inputs(B=B, T=T, H=H, V=V, bias=True, strided=strided, seed=6)
    _check_logprobs(inp, return_entropy=False, temperature=1.3)


def test_gpt2_vocabulary_size(backend, monkeypatch):
    # V = 50257 (GPT-2): odd, and many tiles of either backend
    monkeypatch.setattr(_torch_fused, "TILE_ELEMS", 1 << 16)
    B, T, H, V = (2, 37, 8, 50257) if backend == "torch" else (1, 3, 16, 50257)
    inp = sample_inputs(torch.bfloat16, B=B, T=T, H=H, V=V, bias=True, seed=7)
    _check_loss(inp, beta=0.04, loss_type="bnpo", entropy_coef=0.01)


@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias"])
def test_only_the_gradients_asked_for(backend, frozen):
    B, T, H, V = _shape_for(backend)
    inp = sample_inputs(B=B, T=T, H=H, V=V, bias=True, strided=False, seed=8)
    h, w, b = (inp[k].clone().requires_grad_(k != frozen) for k in ("hidden", "weight", "bias"))
    out = grpo_fast.policy_loss_from_hidden(h, w, inp["ids"], inp["adv"], inp["mask"], inp["old"], bias=b)
    out.loss.backward()
    h64, w64, b64 = (inp[k].double().requires_grad_() for k in ("hidden", "weight", "bias"))
    ref_loss, _ = ref_policy_loss(ref_logits(h64, w64, b64), inp["ids"], inp["adv"], inp["mask"], inp["old"])
    ref_loss.backward()
    for name, t, t64 in (("hidden", h, h64), ("weight", w, w64), ("bias", b, b64)):
        if name == frozen:
            assert t.grad is None
        else:
            _close_grad(t.grad, t64.grad, torch.float32, name)


def test_matches_the_logits_path(backend):
    """The same numbers as policy_loss over explicit logits (float32)."""
    B, T, H, V = _shape_for(backend)
    inp = sample_inputs(B=B, T=T, H=H, V=V, bias=True, seed=9)
    opts = dict(beta=0.04, epsilon_high=0.28, entropy_coef=0.01, temperature=0.8, loss_type="bnpo")
    full, h, w, b = _leaves(inp)
    fused = grpo_fast.policy_loss_from_hidden(h, w, inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"],
                                              bias=b, **opts)
    fused.loss.backward()
    full2, h2, w2, b2 = _leaves(inp)
    plain = grpo_fast.policy_loss(torch.addmm(b2, h2.reshape(-1, H), w2.T).view(B, T, V), inp["ids"], inp["adv"],
                                  inp["mask"], inp["old"], inp["ref"], **opts)
    plain.loss.backward()
    assert abs(fused.loss.item() - plain.loss.item()) <= 1e-5 * max(1.0, abs(plain.loss.item()))
    for name in ("entropy", "kl", "clip_ratio_region"):
        assert abs(getattr(fused, name).item() - getattr(plain, name).item()) <= 1e-5, name
    for a, c in ((full, full2), (w, w2), (b, b2)):
        assert torch.allclose(a.grad, c.grad, rtol=1e-4, atol=1e-6 * c.grad.abs().max().item())


def test_the_chosen_backend_runs(backend, monkeypatch):
    """GRPO_FAST_BACKEND picks the implementation (so the triton runs above test the kernels)."""
    from grpo_fast.ops import _fused_ops

    impl = _fused_ops._impl_for(torch.empty(1, 1, 1))
    assert impl.__name__.endswith("kernels" if backend == "triton" else "_torch_fused"), impl.__name__
    assert _fused_ops._impl_for(torch.empty(1, 1, 1, dtype=torch.float64)) is _torch_fused


# ------------------------------------------------------------------ float64, opcheck, compile

def test_gradcheck_float64():
    g = torch.Generator().manual_seed(10)
    B, T, H, V = 2, 3, 4, 13
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)

    def f(h, w, b):
        return grpo_fast.selective_log_softmax_from_hidden(h, w, ids, 0.7, True, bias=b, logit_scale=1.3,
                                                           final_logit_softcapping=2.5)

    assert torch.autograd.gradcheck(f, (h, w, b))
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0

    def loss(h, w, b):
        return grpo_fast.policy_loss_from_hidden(h, w, ids, adv, None, old, old, bias=b, beta=0.1,
                                                 entropy_coef=0.05, temperature=0.9).loss

    assert torch.autograd.gradcheck(loss, (h, w, b))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_opcheck(backend, with_bias, softcap):
    g = torch.Generator().manual_seed(11)
    B, T, H, V = 2, 5, 16, 70
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if with_bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    torch.library.opcheck(torch.ops.grpo_fast.linear_token_logprobs.default,
                          (h, w, b, ids, 0.8, 1.1, softcap, True))
    torch.library.opcheck(torch.ops.grpo_fast.linear_token_logprobs.default,
                          (h, w, b, ids, 1.0, 1.0, softcap, False))
    # the backward op has no autograd formula of its own (no double backward): plain tensors
    h, w, b = h.detach(), w.detach(), (None if b is None else b.detach())
    _, lse, ent = torch.ops.grpo_fast.linear_token_logprobs(h, w, b, ids, 0.8, 1.1, softcap, True)
    gl, ge = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    for args in ((h, w, b, ids, lse, ent, gl, ge, 0.8, 1.1, softcap, True, True, True),
                 (h, w, b, ids, lse, ent, gl, None, 0.8, 1.1, softcap, False, True, False)):
        torch.library.opcheck(torch.ops.grpo_fast.linear_token_logprobs_backward.default, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    inp = sample_inputs(B=2, T=9, H=16, V=300, bias=True, strided=False, seed=12)
    opts = dict(beta=0.04, entropy_coef=0.01, temperature=0.9, logit_scale=0.5, final_logit_softcapping=5.0)

    def step(h, w, b):
        out = grpo_fast.policy_loss_from_hidden(h, w, inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"],
                                                bias=b, **opts)
        return out.loss, out.logps

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss_c, logps_c = compiled(*leaves)
    loss_c.backward()
    eager = [inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss_e, logps_e = step(*eager)
    loss_e.backward()
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    assert torch.allclose(logps_c, logps_e, rtol=1e-6, atol=1e-6)
    for a, c in zip(leaves, eager):
        assert torch.allclose(a.grad, c.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ memory: no (N, V) tensor

def _largest_allocation(fn) -> int:
    """The largest number of bytes any op allocated while fn ran, from the profiler's memory
    accounting (which sees inside the custom ops): an op that creates a tensor of X bytes
    reports at least X, and so does every op around it that keeps it alive."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_logits_sized_tensor(dtype):
    """fwd + bwd allocate nothing near the size of the logits (the torch tile path)."""
    B, T, H, V = 2, 256, 8, 40000
    N = B * T
    inp = sample_inputs(dtype, B=B, T=T, H=H, V=V, bias=True, strided=False, seed=13)
    h, w, b = (inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))

    def run():
        out = grpo_fast.policy_loss_from_hidden(h, w, inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"],
                                                bias=b, beta=0.04, entropy_coef=0.01, final_logit_softcapping=9.0)
        out.loss.backward()

    largest = _largest_allocation(run)
    # at most a tile buffer (or the weight gradient, V*H*4 bytes, smaller here)
    assert largest <= max(_torch_fused.TILE_ELEMS * 4, V * H * 4), largest
    assert largest < N * V * 4 // 8
    # the check can fail: the unfused path allocates logits-sized tensors
    unfused = _largest_allocation(lambda: grpo_fast.policy_loss(
        (h.detach() @ w.detach().T).requires_grad_(), inp["ids"], inp["adv"]).loss.backward())
    assert unfused >= N * V * h.element_size()


_PEAK_SCRIPT = r"""
import sys, torch, grpo_fast
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
N, H, V, fused = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "fused"
g = torch.Generator().manual_seed(0)
h = torch.randn(1, N, H, generator=g).requires_grad_()
w = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
ids = torch.randint(0, V, (1, N), generator=g)
adv, old = torch.randn(1, generator=g), torch.randn(1, N, generator=g) - 10.0
def step():
    if fused:
        out = grpo_fast.policy_loss_from_hidden(h, w, ids, adv, None, old, old, beta=0.04)
    else:
        out = grpo_fast.policy_loss(h @ w.T, ids, adv, None, old, old, beta=0.04)
    out.loss.backward()
step()  # warm-up: libraries, allocator arenas and the gradients owed exist before the measurement
start = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
step()
print(rss("VmHWM:") - start)
"""


@pytest.mark.parametrize("path", ["fused", "unfused"])
def test_peak_memory_beyond_the_gradients(path):
    """Peak resident memory of a warm fwd + bwd (the gradients owed already allocated by the
    warm-up) stays under 10% of the float32 logits (N*V*4 bytes); the unfused path, measured
    the same way, needs more than the logits, which shows the measurement can fail."""
    import os
    import subprocess
    import sys

    N, H, V = 1024, 8, 65536
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("needs /proc/self/clear_refs to reset the peak RSS")
    res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(N), str(H), str(V), path],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "GRPO_FAST_BACKEND": "torch",
                              # freed large blocks leave the resident set: the peak follows live memory
                              "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert res.returncode == 0, res.stderr[-2000:]
    extra = int(res.stdout.split()[-1])
    logits = N * V * 4
    if path == "fused":
        assert extra <= 0.10 * logits, (extra, logits)
    else:
        assert extra >= logits, (extra, logits)


# ------------------------------------------------------------------ validation

def _valid(**over):
    g = torch.Generator().manual_seed(14)
    kw = dict(hidden=torch.randn(2, 5, 8, generator=g), weight=torch.randn(30, 8, generator=g),
              token_ids=torch.randint(0, 30, (2, 5), generator=g), advantages=torch.randn(2, generator=g))
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,exc,match", [
    (dict(hidden=torch.randn(10, 8)), ValueError, r"hidden must have shape \(B, T, H\)"),
    (dict(hidden=torch.randint(0, 3, (2, 5, 8))), TypeError, "hidden must be float32"),
    (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
    (dict(weight=torch.randn(30, 7)), ValueError, r"weight has shape \(30, 7\), expected \(V, H\) with H = 8"),
    (dict(weight=torch.randn(30, 8, 1)), ValueError, r"weight must have shape \(V, H\)"),
    (dict(weight=torch.randn(0, 8)), ValueError, "empty vocabulary"),
    (dict(weight=torch.randn(30, 8, dtype=torch.bfloat16)), TypeError, "weight is torch.bfloat16 but hidden is"),
    (dict(weight=None), TypeError, "weight must be a torch.Tensor"),
    (dict(bias=torch.randn(29)), ValueError, r"bias has shape \(29,\), expected \(V,\) = \(30,\)"),
    (dict(bias=torch.randn(30, dtype=torch.float64)), TypeError, "bias is torch.float64 but weight"),
    (dict(bias=3.0), TypeError, "bias must be a torch.Tensor or None"),
    (dict(token_ids=torch.full((2, 5), 30)), ValueError, r"token_ids must lie in \[0, V\) = \[0, 30\)"),
    (dict(token_ids=torch.full((2, 5), -1)), ValueError, r"token_ids must lie in \[0, V\)"),
    (dict(token_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"token_ids has shape \(2, 4\)"),
    (dict(token_ids=torch.zeros(2, 5)), TypeError, "token_ids must be an integer tensor"),
    (dict(temperature=0.0), ValueError, "temperature=0.0"),
    (dict(temperature="1"), TypeError, "temperature must be a Python number"),
    (dict(logit_scale=0.0), ValueError, "logit_scale=0.0"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale=nan"),
    (dict(logit_scale=torch.tensor(1.0)), TypeError, "logit_scale must be a Python number"),
    (dict(final_logit_softcapping=-1.0), ValueError, "final_logit_softcapping=-1.0"),
    (dict(final_logit_softcapping=float("inf")), ValueError, "final_logit_softcapping=inf"),
    (dict(final_logit_softcapping="30"), TypeError, "final_logit_softcapping must be a Python number"),
])
def test_validation(over, exc, match):
    kw = _valid(**over)
    with pytest.raises(exc, match=match):
        grpo_fast.policy_loss_from_hidden(**kw)
    kw.pop("advantages")
    with pytest.raises(exc, match=match):
        grpo_fast.selective_log_softmax_from_hidden(**kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(advantages=torch.randn(3)), ValueError, r"advantages has shape \(3,\)"),
    (dict(mask=torch.ones(2, 4)), ValueError, r"mask has shape \(2, 4\)"),
    (dict(old_logps=torch.zeros(2, 5, dtype=torch.long)), TypeError, "old_logps must be a floating-point"),
    (dict(ref_logps=torch.zeros(5, 2)), ValueError, r"ref_logps has shape \(5, 2\)"),
    (dict(beta=0.1), ValueError, "beta=0.1 needs ref_logps"),
    (dict(loss_type="nope"), ValueError, "loss_type='nope'"),
    (dict(epsilon_low=1.5), ValueError, "epsilon_low=1.5"),
    (dict(inplace_grad=True), TypeError, "inplace_grad is an option of the logits path only"),
    (dict(no_such_option=1), TypeError, "unknown option"),
])
def test_loss_validation(over, exc, match):
    with pytest.raises(exc, match=match):
        grpo_fast.policy_loss_from_hidden(**_valid(**over))


def test_every_policy_loss_option_is_accepted():
    """Both entry points take options= and every LossOptions field as a keyword (**option_overrides),
    with no keyword of their own for a loss option: policy_loss's only other keyword is inplace_grad,
    the fused head's are the head's."""
    for fn, own in ((grpo_fast.policy_loss, {"inplace_grad"}),
                    (grpo_fast.policy_loss_from_hidden, {"bias", "logit_scale", "final_logit_softcapping"})):
        params = inspect.signature(fn).parameters
        kw_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert kw_only == own | {"options"}, (fn.__name__, kw_only)
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), fn.__name__
    B, T, H, V = 2, 3, 8, 11
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
    defaults = LossOptions()
    for f in dataclasses.fields(LossOptions):  # each field by name, at its default (valid by definition)
        for fn, x in ((grpo_fast.policy_loss_from_hidden, (hidden, weight)),
                      (grpo_fast.policy_loss, (hidden @ weight.T,))):
            out = fn(*x, ids, adv, **{f.name: getattr(defaults, f.name)})
            assert torch.isfinite(out.loss), (fn.__name__, f.name)
