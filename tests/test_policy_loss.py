"""policy_loss and selective_log_softmax against the float64 reference in reference.py.

Each property is one _check_* function over sample_inputs(); thin wrappers run it
per device, and per backend (the Triton kernels run on CPU under TRITON_INTERPRET=1,
on small shapes because the interpreter is slow).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import grpo_fast
from grpo_fast.ops import _torch_path
from conftest import backends, devices
from reference import ref_policy_loss, ref_token_stats


BACKENDS = backends()   # triton whenever it is installed: kernels that fail to import fail here


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("GRPO_FAST_BACKEND", request.param)
    return request.param


def sample_inputs(device="cpu", dtype=torch.float32, B=3, T=37, V=1000, *, strided=False,
                  scale=3.0, per_token_adv=False, seed=0):
    """Logits (maybe a [:, :-1] view), ids, advantages, a ragged mask with one empty row,
    old and ref log-probs near the current ones (so ratios straddle the clip range)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * scale
    logits64 = base[:, :-1] if strided else base[:, :-1].contiguous()
    logits = (base.to(dtype)[:, :-1] if strided else logits64.to(dtype)).to(device)
    ids = torch.randint(0, V, (B, T), generator=g)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    if B > 1:
        mask[-1] = False  # a fully masked sequence must add 0, not NaN
    logp, _ = ref_token_stats(logits.cpu(), ids)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g)
    return dict(logits=logits, ids=ids.to(device), adv=adv.to(device), mask=mask.to(device),
                old=old.to(device), ref=ref.to(device))


def _tol(dtype):
    # our arithmetic is float32 whatever the input dtype; the gradient is rounded to the
    # logits' dtype. Tolerances sit well above that and far below torch's own error in
    # half precision (see test_half_precision_beats_torch).
    return {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}[dtype]


def _grad_tol(dtype):
    return {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


def _check_loss(inp, *, use_old=True, use_ref=True, per_token_adv=False, grad_tol=None, **opts):
    logits = inp["logits"].detach().clone().requires_grad_()
    kw = dict(mask=inp["mask"], old_logps=inp["old"] if use_old else None,
              ref_logps=inp["ref"] if use_ref else None)
    out = grpo_fast.policy_loss(logits, inp["ids"], inp["adv"], **kw, **opts)
    upstream = 1.7
    (out.loss * upstream).backward()

    x64 = inp["logits"].detach().cpu().double().requires_grad_()
    kw64 = {k: (v.cpu() if v is not None else None) for k, v in kw.items()}
    ref_loss, ref_m = ref_policy_loss(x64, inp["ids"].cpu(), inp["adv"].cpu(), **kw64, **opts)
    (ref_loss * upstream).backward()

    dtype = inp["logits"].dtype
    assert torch.isfinite(out.loss)
    scale = max(1.0, abs(ref_loss.item()))
    assert abs(out.loss.item() - ref_loss.item()) <= _tol(dtype) * scale * 10, (out.loss.item(), ref_loss.item())
    g, g64 = logits.grad.cpu().double(), x64.grad
    gscale = g64.abs().max().item() + 1e-30
    gtol = _grad_tol(dtype) * gscale if grad_tol is None else grad_tol
    assert (g - g64).abs().max().item() <= gtol, ((g - g64).abs().max().item(), gscale)
    # detached metrics
    m = inp["mask"].cpu()
    assert torch.allclose(out.logps.cpu().double()[m], ref_m["logps"][m], atol=1e-4, rtol=1e-5)
    for name in ("entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        assert abs(getattr(out, name).item() - ref_m[name].item()) <= 1e-4 * max(1.0, abs(ref_m[name].item())), name
    if ref_m["kl"] is None:
        assert out.kl is None
    else:
        assert abs(out.kl.item() - ref_m["kl"].item()) <= 1e-4 * max(1.0, abs(ref_m["kl"].item()))
    return out


# ------------------------------------------------------------------ option matrix

LOSS_TYPES = [("grpo", {}), ("bnpo", {}), ("dr_grpo", {"max_completion_length": 40}),
              ("dapo", {}), ("dapo", {"num_items_in_batch": 23})]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("loss_type,extra", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_types_and_levels(device, backend, loss_type, extra, level):
    V = 1000 if backend == "torch" else 257
    inp = sample_inputs(device, B=3, T=37 if backend == "torch" else 7, V=V)
    _check_loss(inp, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                epsilon_high=0.28, **extra)


CLIP_OPTIONS = [
    dict(),
    dict(epsilon_low=0.1, epsilon_high=0.3),
    dict(delta=1.5),
    dict(clip_ratio_c=3.0),
    dict(delta=1.4, clip_ratio_c=2.0, epsilon_high=0.25),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("clip", CLIP_OPTIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_clipping_options(device, backend, clip, per_token_adv):
    inp = sample_inputs(device, B=3, T=37 if backend == "torch" else 6, V=1000 if backend == "torch" else 129,
                        per_token_adv=per_token_adv, seed=1)
    # large old-log-prob offsets so that many ratios fall outside every clip range
    inp["old"] = inp["old"] + 0.8 * torch.randn_like(inp["old"])
    _check_loss(inp, **clip)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kl_estimator,beta", [("k1", 0.1), ("k2", 0.1), ("k3", 0.1), ("k3", 0.0)])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_entropy_temperature(device, backend, kl_estimator, beta, entropy_coef, temperature):
    inp = sample_inputs(device, B=2, T=37 if backend == "torch" else 5, V=1000 if backend == "torch" else 100, seed=2)
    _check_loss(inp, kl_estimator=kl_estimator, beta=beta, entropy_coef=entropy_coef, temperature=temperature)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("use_old,use_ref", [(False, False), (True, False), (False, True)])
def test_on_policy_and_optional_inputs(device, backend, use_old, use_ref):
    inp = sample_inputs(device, B=3, T=37 if backend == "torch" else 5, V=1000 if backend == "torch" else 64, seed=3)
    out = _check_loss(inp, use_old=use_old, use_ref=use_ref, beta=0.05 if use_ref else 0.0)
    if not use_old:
        # on-policy: every ratio is exactly 1, nothing is clipped
        assert out.clip_ratio_region.item() == 0.0


# ------------------------------------------------------------------ dtypes, shapes, views

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
def test_dtypes_and_strided_views(device, backend, dtype, strided):
    inp = sample_inputs(device, dtype, B=2, T=37 if backend == "torch" else 5, V=1000 if backend == "torch" else 300,
                        strided=strided, seed=4)
    if strided:
        assert not inp["logits"].is_contiguous()
    _check_loss(inp, beta=0.04, entropy_coef=0.01, temperature=0.9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_beats_torch(dtype):
    """Our error on half-precision logits is below what plain torch makes in that dtype."""
    inp = sample_inputs("cpu", dtype, B=2, T=37, V=1000, seed=5)
    ours = grpo_fast.selective_log_softmax(inp["logits"], inp["ids"]).double()
    exact, _ = ref_token_stats(inp["logits"], inp["ids"])
    torch_half = torch.log_softmax(inp["logits"], -1).gather(-1, inp["ids"][..., None])[..., 0].double()
    err_ours = (ours - exact).abs().max().item()
    err_torch = (torch_half - exact).abs().max().item()
    assert err_ours < err_torch / 10, (err_ours, err_torch)


@pytest.mark.slow
def test_gpt2_vocabulary_size():
    # V = 50257 (GPT-2), odd and larger than one block of the PyTorch path
    inp = sample_inputs("cpu", torch.bfloat16, B=2, T=9, V=50257, seed=6)
    _check_loss(inp, beta=0.04, loss_type="bnpo")


def _torch_fp32_loss(x32, inp):
    """The reference loss computed by plain torch in float32 (its own rounding error)."""
    lp = torch.log_softmax(x32, -1).gather(-1, inp["ids"].cpu()[..., None])[..., 0]
    old, ref, A, m = inp["old"].cpu(), inp["ref"].cpu(), inp["adv"].cpu()[:, None], inp["mask"].cpu().float()
    rho = torch.exp(lp - old)
    pg = -torch.min(rho * A, rho.clamp(0.8, 1.2) * A)
    r = ref - lp
    tok = pg + 0.1 * (torch.exp(r) - r - 1)
    return ((tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


@pytest.mark.parametrize("device", devices())
def test_extreme_logits(device, backend):
    inp = sample_inputs(device, B=2, T=7, V=257, scale=1.0, seed=7)
    big = inp["logits"] * 1e4  # |z| ~ 1e4: exp would overflow without the max shift
    inp["logits"] = big
    logp, _ = ref_token_stats(big.cpu(), inp["ids"].cpu())
    inp["old"] = logp.float().to(device)
    inp["ref"] = (logp.float() + 0.1).to(device)
    # at |z| ~ 1e4 float32 resolves z - lse only to ~1e-3: allow a few times the error
    # that plain torch makes in float32 on the same inputs
    x32 = big.detach().cpu().float().requires_grad_()
    l32, _ = ref_policy_loss(x32.float(), inp["ids"].cpu(), inp["adv"].cpu(), inp["mask"].cpu(),
                             inp["old"].cpu(), inp["ref"].cpu(), beta=0.1)
    x64 = big.detach().cpu().double().requires_grad_()
    l64, _ = ref_policy_loss(x64, inp["ids"].cpu(), inp["adv"].cpu(), inp["mask"].cpu(),
                             inp["old"].cpu(), inp["ref"].cpu(), beta=0.1)
    torch_err = torch.autograd.grad(torch.log_softmax(x32, -1).sum() * 0 + _torch_fp32_loss(x32, inp), x32)[0]
    torch_err = (torch_err.double() - torch.autograd.grad(l64, x64)[0]).abs().max().item()
    out = _check_loss(inp, beta=0.1, grad_tol=max(4 * torch_err, 1e-6))
    assert torch.isfinite(out.logps).all()


@pytest.mark.parametrize("device", devices())
def test_neg_inf_logits_are_masked_vocabulary(device, backend):
    """-inf logits (a masked-out vocabulary) have probability 0: finite loss, entropy and gradient."""
    inp = sample_inputs(device, B=2, T=5, V=64, seed=8)
    logits = inp["logits"].clone()
    logits[..., 50:] = float("-inf")
    inp["ids"] = inp["ids"] % 50
    inp["logits"] = logits
    logits_r = logits.detach().clone().requires_grad_()
    out = grpo_fast.policy_loss(logits_r, inp["ids"], inp["adv"], inp["mask"], entropy_coef=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.entropy)
    assert torch.isfinite(logits_r.grad).all()
    assert (logits_r.grad[..., 50:] == 0).all()
    exact, ent = ref_token_stats(logits.cpu(), inp["ids"].cpu())
    m = inp["mask"].cpu()
    assert torch.allclose(out.logps.cpu().double()[m], exact[m], atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_non_finite_logits_give_non_finite_loss(device, backend):
    inp = sample_inputs(device, B=2, T=5, V=64, seed=9)
    for bad in (float("nan"), float("inf")):
        logits = inp["logits"].clone()
        logits[0, 0, 3] = bad
        out = grpo_fast.policy_loss(logits, inp["ids"], inp["adv"])  # no mask: the bad token counts
        assert not torch.isfinite(out.loss)


@pytest.mark.parametrize("device", devices())
def test_fully_masked_batch_is_zero_not_nan(device, backend):
    inp = sample_inputs(device, B=2, T=5, V=64, seed=10)
    logits = inp["logits"].clone().requires_grad_()
    zero = torch.zeros_like(inp["mask"])
    for lt, extra in LOSS_TYPES:
        out = grpo_fast.policy_loss(logits, inp["ids"], inp["adv"], zero, inp["old"], inp["ref"],
                                    loss_type=lt, beta=0.1, **extra)
        out.loss.backward()
        assert out.loss.item() == 0.0
        assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()
        logits.grad = None


def test_masked_positions_may_hold_garbage():
    """-inf / nan old and ref log-probs on masked tokens (padding) must not leak NaN."""
    inp = sample_inputs("cpu", B=3, T=11, V=100, seed=11)
    m = inp["mask"]
    old = torch.where(m, inp["old"], torch.full_like(inp["old"], float("-inf")))
    ref = torch.where(m, inp["ref"], torch.full_like(inp["ref"], float("nan")))
    logits = inp["logits"].clone().requires_grad_()
    out = grpo_fast.policy_loss(logits, inp["ids"], inp["adv"], m, old, ref, beta=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all()
    clean = _check_loss(inp, beta=0.1)
    assert abs(clean.loss.item() - out.loss.item()) < 1e-6


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_grad_matches(device, backend, dtype):
    inp = sample_inputs(device, dtype, B=2, T=9 if backend == "torch" else 5, V=300, strided=True, seed=12)
    grads = []
    for inplace in (False, True):
        leaf = inp["logits"].detach().clone().requires_grad_()
        x = leaf * 1.0  # the logits are an intermediate, as they are after lm_head
        out = grpo_fast.policy_loss(x, inp["ids"], inp["adv"], inp["mask"], inp["old"],
                                    entropy_coef=0.01, inplace_grad=inplace)
        out.loss.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


# ------------------------------------------------------------------ selective_log_softmax

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_selective_log_softmax(device, backend, dtype, temperature):
    inp = sample_inputs(device, dtype, B=2, T=37 if backend == "torch" else 5, V=1000 if backend == "torch" else 200,
                        strided=True, seed=13)
    x = inp["logits"].detach().clone().requires_grad_()
    logp, ent = grpo_fast.selective_log_softmax(x, inp["ids"], temperature=temperature, return_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    x64 = inp["logits"].detach().cpu().double().requires_grad_()
    rlogp, rent = ref_token_stats(x64, inp["ids"].cpu(), temperature)
    assert torch.allclose(logp.cpu().double(), rlogp, atol=5e-5, rtol=1e-5)
    assert torch.allclose(ent.cpu().double(), rent, atol=5e-5, rtol=1e-5)
    gl = torch.randn_like(rlogp)
    ge = torch.randn_like(rent)
    ((logp.cpu().double() * gl).sum() + (ent.cpu().double() * ge).sum()).backward()
    ((rlogp * gl).sum() + (rent * ge).sum()).backward()
    scale = x64.grad.abs().max().item()
    assert (x.grad.cpu().double() - x64.grad).abs().max().item() <= _grad_tol(dtype) * scale
    only = grpo_fast.selective_log_softmax(inp["logits"], inp["ids"], temperature=temperature)
    assert torch.equal(only, logp.detach())


def test_gradcheck_float64():
    torch.manual_seed(0)
    B, T, V = 2, 3, 7
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    old = torch.randn(B, T, dtype=torch.float64) * 0.1 - 2
    ref = torch.randn(B, T, dtype=torch.float64) * 0.1 - 2
    x = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    for level in ("token", "sequence"):
        def f(z):
            return grpo_fast.policy_loss(z, ids, adv, mask, old.double(), ref.double(), beta=0.1,
                                         entropy_coef=0.05, temperature=0.8,
                                         importance_sampling_level=level).loss
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)

    def g(z):
        lp, ent = grpo_fast.selective_log_softmax(z, ids, temperature=1.3, return_entropy=True)
        return lp, ent
    assert torch.autograd.gradcheck(g, (x,), eps=1e-6, atol=1e-6)


def test_every_option_combination_small():
    """A coarse sweep over combinations that interact (level x delta x dual clip x estimator x loss type)."""
    inp = sample_inputs("cpu", B=3, T=6, V=50, seed=14)
    inp["old"] = inp["old"] + 0.7 * torch.randn_like(inp["old"])
    for level, delta, c, est, (lt, extra) in itertools.product(
        ("token", "sequence"), (None, 1.6), (None, 2.5), ("k1", "k3"), LOSS_TYPES[:4]
    ):
        _check_loss(inp, importance_sampling_level=level, delta=delta, clip_ratio_c=c,
                    kl_estimator=est, beta=0.05, loss_type=lt, epsilon_high=0.3, **extra)


def test_matches_trl_formulation():
    """The default settings reproduce TRL's GRPO loss code path written out by hand."""
    inp = sample_inputs("cpu", B=4, T=37, V=1000, seed=15)
    logits = inp["logits"].clone().requires_grad_()
    z = logits.float()
    logps = torch.log_softmax(z, -1).gather(-1, inp["ids"][..., None]).squeeze(-1)
    coef_1 = torch.exp(logps - inp["old"])
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    l1 = coef_1 * inp["adv"].unsqueeze(1)
    l2 = coef_2 * inp["adv"].unsqueeze(1)
    per_token = -torch.min(l1, l2)
    d = inp["ref"] - logps
    per_token = per_token + 0.04 * (torch.exp(d) - d - 1) * coef_1  # use_bias_correction_kl (TRL 1.16 default)
    m = inp["mask"].float()
    trl_loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    trl_loss.backward()
    g_trl = logits.grad.clone()
    logits.grad = None
    out = grpo_fast.policy_loss(logits, inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"],
                                beta=0.04, epsilon_high=0.28)
    out.loss.backward()
    assert math.isclose(out.loss.item(), trl_loss.item(), rel_tol=1e-5, abs_tol=1e-7)
    assert torch.allclose(logits.grad, g_trl, atol=1e-7, rtol=1e-4)


def _graph_names(fn):
    seen, stack, names = set(), [fn], []
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.append(type(f).__name__)
        stack.extend(nf for nf, _ in f.next_functions)
    return names


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_time_slice_of_model_output_needs_no_slice_backward(backend, inplace, dtype):
    """logits = out.logits[:, :-1]: the op takes the whole tensor and a window, so autograd
    adds no SliceBackward (which would allocate a second logits-sized gradient)."""
    inp = sample_inputs("cpu", dtype, B=2, T=6, V=300, seed=16)
    leaf = torch.randn(2, 7, 300, dtype=torch.float64).to(dtype).requires_grad_()
    full = leaf * 1.0  # stands in for the lm_head output (B, T + 1, V)
    out = grpo_fast.policy_loss(full[:, :-1], inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"],
                                beta=0.1, entropy_coef=0.01, inplace_grad=inplace)
    assert "SliceBackward0" not in _graph_names(out.loss.grad_fn)
    out.loss.backward()
    x64 = leaf.detach().double().requires_grad_()
    ref, _ = ref_policy_loss(x64[:, :-1], inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"],
                             beta=0.1, entropy_coef=0.01)
    ref.backward()
    assert (leaf.grad[:, -1] == 0).all()
    scale = x64.grad.abs().max().item()
    assert (leaf.grad.double() - x64.grad).abs().max().item() <= _grad_tol(dtype) * scale
    # a window in the middle (e.g. logits[:, 2:5]) is handled too
    leaf.grad = None
    full = leaf * 1.0
    lp = grpo_fast.selective_log_softmax(full[:, 1:4], inp["ids"][:, :3])
    lp.sum().backward()
    assert (leaf.grad[:, 0] == 0).all() and (leaf.grad[:, 4:] == 0).all() and (leaf.grad[:, 1:4] != 0).any()


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("block_elems", [1, 3 * 100, 16 * 100, 1 << 20])
def test_blocking_of_the_torch_path_does_not_change_results(monkeypatch, strided, block_elems):
    """Whole sequences per block, time chunks of one sequence, one row per block: same numbers."""
    inp = sample_inputs("cpu", B=3, T=7, V=100, strided=strided, seed=17)
    monkeypatch.setenv("GRPO_FAST_BACKEND", "torch")
    results = []
    for elems in (1 << 20, block_elems):
        monkeypatch.setattr(_torch_path, "_MAX_BLOCK_ELEMS", elems)
        if strided:
            base = torch.zeros(3, 8, 100)
            base[:, :-1] = inp["logits"]
            base.requires_grad_()
            xr = base
            view = (base * 1.0)[:, :-1]
        else:
            xr = inp["logits"].detach().clone().requires_grad_()
            view = xr
        out = grpo_fast.policy_loss(view, inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"],
                                    beta=0.1, entropy_coef=0.02, temperature=0.8)
        out.loss.backward()
        results.append((out.loss.detach(), out.logps, xr.grad))
    (l0, p0, g0), (l1, p1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-7) and torch.allclose(p0, p1, atol=1e-6)
    assert torch.allclose(g0, g1, atol=1e-7)


def test_view_made_by_a_custom_function_keeps_its_backward():
    """A view whose autograd path is not pure view ops must not be bypassed via its base."""
    class Scale(torch.autograd.Function):  # returns a view; its backward scales the gradient
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return 3.0 * g

    inp = sample_inputs("cpu", B=2, T=5, V=40, seed=18)
    leaf = torch.randn(2, 6, 40).requires_grad_()
    out = grpo_fast.policy_loss(Scale.apply(leaf)[:, :-1], inp["ids"], inp["adv"], inp["mask"], inp["old"])
    out.loss.backward()
    g_scaled = leaf.grad.clone()
    leaf.grad = None
    grpo_fast.policy_loss((leaf * 1.0)[:, :-1], inp["ids"], inp["adv"], inp["mask"], inp["old"]).loss.backward()
    assert torch.allclose(g_scaled, 3.0 * leaf.grad, atol=1e-7) and leaf.grad.abs().max() > 0
