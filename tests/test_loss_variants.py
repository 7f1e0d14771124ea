"""The loss variants against the float64 reference (reference.py), on both backends: every
loss type in LOSS_TYPES (a loss type without a reference fails here; nothing in this file names
the loss types it parametrises over), cispo, sapo, luspo, vespo, top_entropy_quantile,
off_policy_mask_threshold, use_bias_correction_kl, the vLLM importance weights, the entropy
bonus as TRL normalises it, gradient_accumulation_steps, and batches with no tokens.

Shapes are odd (T = 37, V = 1000) on the PyTorch path and small under the Triton interpreter.
"""
from __future__ import annotations

import pytest
import torch

import grpo_fast
from grpo_fast.ops import LossOptions
from grpo_fast.ops.functional import _entropy_threshold
from grpo_fast.ops.options import LOSS_TYPES
from conftest import devices
from reference import DETACHED_WEIGHT, LOSS_TYPE_OPTIONS, ref_policy_loss, ref_token_stats
from test_policy_loss import BACKENDS, sample_inputs  # noqa: F401  (shared inputs)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("GRPO_FAST_BACKEND", request.param)
    return request.param


def _shape(backend):
    return dict(T=37, V=1000) if backend == "torch" else dict(T=6, V=129)


NEW_METRICS = ("cispo_clip_ratio", "entropy_masked_frac", "off_policy_masked_frac", "entropy_kept",
               "vespo_phi_seq_mean")


def _options_of(loss_type):
    """The options a test of loss_type needs, from reference.py (which must know every loss type)."""
    if loss_type not in LOSS_TYPE_OPTIONS:
        pytest.fail(f"loss_type={loss_type!r} has no float64 reference: add it to tests/reference.py "
                    "(LOSS_TYPE_OPTIONS and ref_policy_loss)")
    return dict(LOSS_TYPE_OPTIONS[loss_type], loss_type=loss_type)


def check(inp, *, use_old=True, use_ref=True, sampling=None, extra_entropies=None, gather=None, weights=None,
          **opts):
    """Loss, logits gradient and every metric of policy_loss against the float64 reference."""
    logits = inp["logits"].detach().clone().requires_grad_()
    kw = dict(mask=inp["mask"], old_logps=inp["old"] if use_old else None,
              ref_logps=inp["ref"] if use_ref else None)
    out = grpo_fast.policy_loss(logits, inp["ids"], inp["adv"], **kw, sampling_logps=sampling,
                                entropy_gather=gather, importance_weights=weights, **opts)
    (out.loss * 1.3).backward()

    x64 = inp["logits"].detach().cpu().double().requires_grad_()
    kw64 = {k: (v.cpu() if v is not None else None) for k, v in kw.items()}
    ref_loss, ref_m = ref_policy_loss(x64, inp["ids"].cpu(), inp["adv"].cpu(), **kw64,
                                      sampling_logps=None if sampling is None else sampling.cpu(),
                                      extra_entropies=extra_entropies,
                                      importance_weights=None if weights is None else weights.cpu(), **opts)
    (ref_loss * 1.3).backward()

    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref_loss.item()) <= 2e-5 * max(1.0, abs(ref_loss.item())), \
        (out.loss.item(), ref_loss.item())
    g, g64 = logits.grad.cpu().double(), x64.grad
    gscale = g64.abs().max().item() + 1e-30
    assert (g - g64).abs().max().item() <= 2e-5 * gscale, ((g - g64).abs().max().item(), gscale)
    for name in ("entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "kl") + NEW_METRICS:
        ours, want = getattr(out, name), ref_m[name]
        if want is None:
            assert ours is None, name
        else:
            assert abs(ours.item() - want.item()) <= 1e-4 * max(1.0, abs(want.item())), (name, ours, want)
    return out, ref_loss


# ------------------------------------------------------------------ cispo

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap,num_items", [(1.25, None), (5.0, 31), (0.9, None)])
def test_cispo(device, backend, level, cap, num_items):
    inp = sample_inputs(device, B=3, **_shape(backend), seed=20)
    out, _ = check(inp, loss_type="cispo", epsilon_high=cap, importance_sampling_level=level,
                   num_items_in_batch=num_items, beta=0.03)
    assert out.clip_ratio_region.item() == 0.0  # no two-sided clip in cispo
    if cap == 0.9 and level == "token":
        assert out.cispo_clip_ratio.item() > 0  # the cap does bind here, so the test sees it


def test_cispo_gradient_is_capped_weight_times_advantage():
    """d loss / d logp = -min(rho, cap) * A / N per token: the weight carries no gradient."""
    B, T = 2, 4
    logp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + torch.tensor([[0.5, -0.5, 0.0, 1.0], [-1.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    from grpo_fast.ops.functional import _policy_loss_from_logps
    from grpo_fast.ops.options import LossOptions

    opt = LossOptions(loss_type="cispo", epsilon_high=1.2)
    out = _policy_loss_from_logps(logp, torch.zeros_like(logp), adv, None, old, None, opt)
    out.loss.backward()
    rho = torch.exp(logp.detach() - old)
    want = -rho.clamp(max=1.2) * adv[:, None] / (B * T)
    assert torch.allclose(logp.grad, want, atol=1e-12)


# ------------------------------------------------------------------ sapo

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("temps", [(1.0, 1.05), (3.0, 0.5)])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_sapo(device, backend, level, temps, per_token_adv):
    inp = sample_inputs(device, B=3, **_shape(backend), per_token_adv=per_token_adv, seed=21)
    inp["old"] = inp["old"] + 0.5 * torch.randn_like(inp["old"])
    out, _ = check(inp, loss_type="sapo", importance_sampling_level=level, sapo_temperature_pos=temps[0],
                   sapo_temperature_neg=temps[1], beta=0.02, entropy_coef=0.01)
    assert out.clip_ratio_region.item() == 0.0 and out.cispo_clip_ratio is None


def test_sapo_on_policy_gradient_equals_grpo():
    """d/drho of the gate (4 / tau) * sigmoid(tau * (rho - 1)) is 4 * s * (1 - s), which is 1 at
    rho = 1 (s = 1/2): on-policy its gradient is that of rho * A, grpo's, whatever the temperatures."""
    inp = sample_inputs("cpu", B=3, T=9, V=50, seed=22)
    grads = []
    for lt, extra in (("grpo", {}), ("sapo", dict(sapo_temperature_pos=2.0, sapo_temperature_neg=0.7))):
        x = inp["logits"].clone().requires_grad_()
        grpo_fast.policy_loss(x, inp["ids"], inp["adv"], inp["mask"], loss_type=lt, **extra).loss.backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------ top_entropy_quantile

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("q", [0.2, 0.5, 0.0])
@pytest.mark.parametrize("loss_type,extra", [("grpo", {}), ("dapo", {}), ("cispo", {"epsilon_high": 2.0}),
                                             ("sapo", {})])
def test_top_entropy_quantile(device, backend, q, loss_type, extra):
    inp = sample_inputs(device, B=3, **_shape(backend), seed=23)
    out, _ = check(inp, loss_type=loss_type, top_entropy_quantile=q, beta=0.05, entropy_coef=0.02, **extra)
    m = inp["mask"]
    n = int(m.sum())
    kept = round((1 - out.entropy_masked_frac.item()) * n)
    assert 1 <= kept <= max(1, int(q * n) + 1), (kept, n, q)


def test_top_entropy_quantile_one_is_off_and_zero_keeps_the_max():
    inp = sample_inputs("cpu", B=3, T=37, V=1000, seed=24)
    base = grpo_fast.policy_loss(inp["logits"], inp["ids"], inp["adv"], inp["mask"], inp["old"])
    same = grpo_fast.policy_loss(inp["logits"], inp["ids"], inp["adv"], inp["mask"], inp["old"],
                                 top_entropy_quantile=1.0)
    assert same.entropy_masked_frac is None and torch.equal(base.loss, same.loss)
    top = grpo_fast.policy_loss(inp["logits"], inp["ids"], inp["adv"], inp["mask"], inp["old"],
                                top_entropy_quantile=0.0)
    assert abs(top.entropy_masked_frac.item() - (1 - 1 / int(inp["mask"].sum()))) < 1e-6


def test_entropy_threshold_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for B, T in ((3, 37), (1, 1), (4, 5)):
        ent = torch.rand(B, T, generator=g) * 5
        ent[0, 0] = ent[-1, -1]  # a tie
        m = torch.rand(B, T, generator=g) < 0.7
        m[0, 0] = True
        for q in (0.0, 0.2, 0.5, 0.8, 1.0):
            got = _entropy_threshold(ent, m, q).item()
            want = torch.quantile(ent[m], q).item()
            assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (B, T, q, got, want)
    none = _entropy_threshold(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool), 0.8)
    assert none.item() == float("inf")


@pytest.mark.parametrize("device", devices())
def test_entropy_quantile_over_all_ranks(device, backend):
    """entropy_gather joins other ranks' entropies before the quantile (TRL gathers across processes)."""
    inp = sample_inputs(device, B=3, **_shape(backend), seed=25)
    other = torch.rand(23, dtype=torch.float64) * 8  # another rank's masked-token entropies

    def gather(local):
        pad = torch.full((5,), float("nan"), dtype=local.dtype, device=local.device)  # its padding
        return torch.cat([local, other.to(local.dtype).to(local.device), pad])

    check(inp, top_entropy_quantile=0.3, extra_entropies=other.float().double(), gather=gather,
          entropy_coef=0.01)


# ------------------------------------------------------------------ off_policy_mask_threshold

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("threshold", [0.0, 0.05, 10.0])
@pytest.mark.parametrize("use_sampling", [False, True])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_off_policy_mask(device, backend, threshold, use_sampling, level):
    inp = sample_inputs(device, B=4, **_shape(backend), seed=26)
    inp["mask"][-1] = True  # every sequence has tokens here
    inp["adv"] = torch.tensor([-1.0, -0.5, 0.7, -2.0], device=device)
    sampling = None
    if use_sampling:
        logp, _ = ref_token_stats(inp["logits"].cpu(), inp["ids"].cpu())
        shift = torch.tensor([0.5, -0.5, 0.5, 0.01])[:, None]
        sampling = (logp + shift).float().to(device)
    out, _ = check(inp, loss_type="bnpo", off_policy_mask_threshold=threshold, sampling=sampling,
                   importance_sampling_level=level, beta=0.05)
    if threshold == 10.0:
        assert out.off_policy_masked_frac.item() == 0.0
    if use_sampling and threshold == 0.05:
        # sequence 0 (A < 0, KL 0.5) dropped; 1 (KL < 0), 2 (A > 0), 3 (KL 0.01) kept
        m = inp["mask"].cpu().float()
        assert abs(out.off_policy_masked_frac.item() - (m[0].sum() / m.sum()).item()) < 1e-6


def test_off_policy_mask_drops_only_the_policy_term():
    inp = sample_inputs("cpu", B=2, T=9, V=50, seed=27)
    inp["mask"][:] = True
    adv = torch.tensor([-1.0, -1.0])
    logp, _ = ref_token_stats(inp["logits"], inp["ids"])
    sampling = (logp + 1.0).float()  # mean KL 1 > threshold for both: both dropped
    x = inp["logits"].clone().requires_grad_()
    out = grpo_fast.policy_loss(x, inp["ids"], adv, inp["mask"], inp["old"], inp["ref"], beta=0.1,
                                off_policy_mask_threshold=0.5, sampling_logps=sampling)
    x2 = inp["logits"].clone().requires_grad_()
    kl_only = grpo_fast.policy_loss(x2, inp["ids"], torch.zeros(2), inp["mask"], inp["old"], inp["ref"], beta=0.1)
    assert out.off_policy_masked_frac.item() == 1.0
    assert torch.allclose(out.loss, kl_only.loss, atol=1e-7)


# ------------------------------------------------------------------ KL bias correction

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("estimator", ["k3", "k1", "k2"])
@pytest.mark.parametrize("use_old", [True, False])
def test_kl_bias_correction(device, backend, bias, level, estimator, use_old):
    inp = sample_inputs(device, B=3, **_shape(backend), seed=28)
    check(inp, use_old=use_old, beta=0.2, use_bias_correction_kl=bias, importance_sampling_level=level,
          kl_estimator=estimator)


def test_bias_correction_changes_the_on_policy_gradient_not_the_value():
    inp = sample_inputs("cpu", B=3, T=37, V=1000, seed=29)
    res = {}
    for bias in (True, False):
        x = inp["logits"].clone().requires_grad_()
        out = grpo_fast.policy_loss(x, inp["ids"], inp["adv"], inp["mask"], None, inp["ref"], beta=0.1,
                                    use_bias_correction_kl=bias)
        out.loss.backward()
        res[bias] = (out.loss.item(), x.grad, out.kl.item())
    assert abs(res[True][0] - res[False][0]) < 1e-6 and abs(res[True][2] - res[False][2]) < 1e-6
    diff = (res[True][1] - res[False][1]).abs().max() / res[False][1].abs().max()
    assert diff > 1e-3, diff


# ------------------------------------------------------------------ entropy bonus, accumulation

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("ga", [1, 3])
def test_entropy_bonus_and_accumulation(device, backend, loss_type, ga):
    inp = sample_inputs(device, B=3, **_shape(backend), seed=30)
    check(inp, entropy_coef=0.05, gradient_accumulation_steps=ga, beta=0.01, **_options_of(loss_type))


def test_entropy_bonus_is_the_token_mean_whatever_the_loss_type():
    """With A = 0 and no KL the loss is -coef * (mean entropy over the masked tokens) for every loss type."""
    inp = sample_inputs("cpu", B=3, T=11, V=64, seed=31)
    _, ent = ref_token_stats(inp["logits"], inp["ids"])
    m = inp["mask"]
    want = -0.1 * ent[m].mean().item()
    for lt in LOSS_TYPES:
        out = grpo_fast.policy_loss(inp["logits"], inp["ids"], torch.zeros(3), m, inp["old"],
                                    entropy_coef=0.1, **_options_of(lt))
        assert abs(out.loss.item() - want) < 1e-5, (lt, out.loss.item(), want)
        out2 = grpo_fast.policy_loss(inp["logits"], inp["ids"], torch.zeros(3), m, inp["old"],
                                     entropy_coef=0.1, gradient_accumulation_steps=4, **_options_of(lt))
        assert abs(out2.loss.item() - want / 4) < 1e-5, lt


# ------------------------------------------------------------------ every loss type

def test_every_loss_type_has_a_reference():
    """LOSS_TYPES and the float64 reference's loss types are the same set: a new loss type in
    options.py fails here until tests/reference.py knows its formula."""
    missing = [lt for lt in LOSS_TYPES if lt not in LOSS_TYPE_OPTIONS]
    assert not missing, f"no float64 reference in tests/reference.py for loss_type(s) {missing}"
    assert set(LOSS_TYPE_OPTIONS) <= set(LOSS_TYPES), set(LOSS_TYPE_OPTIONS) - set(LOSS_TYPES)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("use_old", [True, False])
def test_every_loss_type(device, backend, loss_type, per_token_adv, use_old):
    inp = sample_inputs(device, B=4, **_shape(backend), per_token_adv=per_token_adv, seed=40)
    check(inp, use_old=use_old, beta=0.03, entropy_coef=0.01, temperature=0.9, **_options_of(loss_type))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence"])
def test_every_loss_type_with_options(device, backend, loss_type, mode):
    """Every loss type under the masks, the entropy quantile, accumulation and vLLM importance weights
    (vespo takes per-token weights only, into its sequence weight)."""
    opts = _options_of(loss_type)
    if mode == "sequence" and loss_type == "vespo":
        pytest.skip("vespo refuses per-sequence importance weights (test_vespo_refuses_sequence_weights)")
    inp = sample_inputs(device, B=4, **_shape(backend), seed=41)
    inp["adv"] = torch.tensor([-1.0, 0.5, -0.3, 1.2], device=device)
    g = torch.Generator().manual_seed(41)
    T = inp["ids"].shape[1]
    w = torch.exp(0.2 * torch.randn(4, 1 if mode == "sequence" else T, generator=g))
    if mode == "token_truncate":
        w = w.clamp(max=1.1)
    elif mode == "token_mask":
        w = torch.where(w > 1.15, 0.0, w)  # TRL's token_mask: out-of-range ratios become 0
    check(inp, beta=0.04, entropy_coef=0.01, top_entropy_quantile=0.4, off_policy_mask_threshold=0.02,
          gradient_accumulation_steps=2, weights=w.to(device), **opts)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_gradcheck_every_loss_type(loss_type, per_token_adv):
    """float64 gradcheck of each loss type. For those with a stop-gradient weight (cispo, vespo) the
    old log-probs move with the logits (old = sg(logp) - c), so the weight is a constant of the
    finite differences too and the value is an objective whose gradient is the defined one."""
    torch.manual_seed(0)
    B, T, V = 2, 4, 7
    ids = torch.randint(0, V, (B, T))
    adv = torch.tensor([0.7, -1.1], dtype=torch.float64)
    if per_token_adv:
        adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    shift = torch.randn(B, T, dtype=torch.float64) * 0.3
    ref = torch.randn(B, T, dtype=torch.float64) * 0.1 - 2
    x = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    opts = _options_of(loss_type)
    opts.pop("num_items_in_batch", None)
    detached = loss_type in DETACHED_WEIGHT
    old_fixed = grpo_fast.selective_log_softmax(x.detach().clone(), ids, temperature=0.8) - shift

    def f(z):
        if detached:  # bias correction off too: its ratio would be a constant of the finite differences
            old = grpo_fast.selective_log_softmax(z, ids, temperature=0.8).detach() - shift
            extra = dict(use_bias_correction_kl=False)
        else:
            old, extra = old_fixed, {}
        return grpo_fast.policy_loss(z, ids, adv, mask, old, ref, beta=0.1, temperature=0.8, entropy_coef=0.02,
                                     **extra, **opts).loss

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6), loss_type


# ------------------------------------------------------------------ luspo

def test_luspo_is_gspo_scaled_by_the_length():
    """With every sequence of length L, luspo's loss and gradient are L times grpo's at the sequence
    level (GSPO); with ragged lengths each sequence's GSPO term is weighted by its own length."""
    inp = sample_inputs("cpu", B=3, T=11, V=50, seed=42)
    x = inp["logits"].clone().requires_grad_()
    lu = grpo_fast.policy_loss(x, inp["ids"], inp["adv"], None, inp["old"], loss_type="luspo",
                               importance_sampling_level="sequence")
    lu.loss.backward()
    x2 = inp["logits"].clone().requires_grad_()
    gs = grpo_fast.policy_loss(x2, inp["ids"], inp["adv"], None, inp["old"], importance_sampling_level="sequence")
    gs.loss.backward()
    assert torch.allclose(lu.loss, 11 * gs.loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(x.grad, 11 * x2.grad, rtol=1e-5, atol=1e-8)
    m = inp["mask"]  # ragged, one empty sequence
    lens = m.sum(-1).float()
    per_seq = [grpo_fast.policy_loss(inp["logits"][i:i + 1], inp["ids"][i:i + 1], inp["adv"][i:i + 1], m[i:i + 1],
                                     inp["old"][i:i + 1], importance_sampling_level="sequence").loss
               for i in range(3)]
    want = sum(lens[i] * per_seq[i] for i in range(3)) / 3
    got = grpo_fast.policy_loss(inp["logits"], inp["ids"], inp["adv"], m, inp["old"], loss_type="luspo",
                                importance_sampling_level="sequence").loss
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (got, want)


@pytest.mark.parametrize("loss_type", ["grpo", "luspo"])
def test_sequence_level_clip_fractions_count_sequences(loss_type):
    """At the sequence level with (B,) advantages the clip fractions are fractions of the sequences
    (with tokens), as TRL's: one long clipped sequence is 1 of 3, not its share of the tokens."""
    from grpo_fast.ops.functional import _policy_loss_from_logps

    B, T = 4, 10
    logp = torch.full((B, T), -2.0)
    lens = torch.tensor([10, 2, 3, 0])  # the last sequence has no tokens: not counted
    mask = torch.arange(T)[None, :] < lens[:, None]
    old = logp - torch.tensor([0.5, 0.0, -0.5, 0.9])[:, None]  # sequence ratios e^0.5, 1, e^-0.5, e^0.9
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    opt = LossOptions(loss_type=loss_type, importance_sampling_level="sequence")
    out = _policy_loss_from_logps(logp, torch.zeros_like(logp), adv, mask, old, None, opt)
    assert abs(out.clip_ratio_high.item() - 1 / 3) < 1e-6  # sequence 0 (A > 0, rho > 1.2)
    assert abs(out.clip_ratio_low.item() - 1 / 3) < 1e-6   # sequence 2 (A < 0, rho < 0.8)
    assert abs(out.clip_ratio_region.item() - 2 / 3) < 1e-6
    per_token = _policy_loss_from_logps(logp, torch.zeros_like(logp), adv[:, None].expand(B, T), mask, old, None, opt)
    assert abs(per_token.clip_ratio_high.item() - 10 / 15) < 1e-6  # (B, T) advantages: over the tokens


# ------------------------------------------------------------------ vespo

def _vespo_case(B=4, T=9, V=40, seed=43):
    inp = sample_inputs("cpu", B=B, T=T, V=V, seed=seed)
    inp["mask"][:] = True
    inp["adv"] = torch.tensor([1.0, -1.0, 0.0, 2.0])[:B]
    return inp


def test_vespo_weight_by_hand():
    """phi = w^k e^(lambda (1 - w)) of w = prod over the tokens of pi / old, with (k, lambda) by the sign
    of A (A = 0 takes the positive pair); d loss / d logp = -phi A / N; the metric is phi's mean."""
    from grpo_fast.ops.functional import _policy_loss_from_logps

    B, T = 3, 4
    logp = torch.full((B, T), -1.0, dtype=torch.float64, requires_grad=True)
    log_w = torch.tensor([0.4, -0.6, 0.0], dtype=torch.float64)  # per sequence
    old = logp.detach() - (log_w / T)[:, None]
    adv = torch.tensor([1.5, -2.0, 0.0], dtype=torch.float64)
    opt = LossOptions(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=3.5,
                      vespo_lambda_neg=1.2)
    out = _policy_loss_from_logps(logp, torch.zeros_like(logp), adv, None, old, None, opt)
    out.loss.backward()
    w = log_w.exp()
    k = torch.tensor([1.5, 3.5, 1.5], dtype=torch.float64)
    lam = torch.tensor([2.5, 1.2, 2.5], dtype=torch.float64)
    phi = w ** k * torch.exp(lam * (1 - w))
    assert torch.allclose(logp.grad, (-phi * adv / (B * T))[:, None].expand(B, T), atol=1e-12)
    assert abs(out.vespo_phi_seq_mean.item() - phi.mean().item()) < 1e-12
    assert abs(phi[2].item() - 1.0) < 1e-12  # phi(1) = 1


def test_vespo_on_policy_gradient_equals_dapo():
    """phi(1) = 1: on-policy (and with no importance weights) vespo has dapo's gradient, -A grad log pi / N."""
    inp = _vespo_case()
    grads = []
    for lt in ("dapo", "vespo"):
        x = inp["logits"].clone().requires_grad_()
        grpo_fast.policy_loss(x, inp["ids"], inp["adv"], inp["mask"], loss_type=lt).loss.backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("k", [None, 0.1])
def test_vespo_clamps(device, backend, k):
    """TRL's clamps, each where it changes phi: a token log-ratio past 20 (clamped to 20 before the sum),
    a summed log-weight in [-20, log 1e-8) (floored at log 1e-8; visible with a small k), and a zero
    importance weight (token_mask; its log floored at log 1e-8). A weight at a masked-out token counts
    for nothing."""
    inp = sample_inputs(device, B=4, **_shape(backend), seed=44)
    T = inp["ids"].shape[1]
    inp["mask"][:] = True
    inp["mask"][3, T // 2:] = False
    inp["adv"] = torch.tensor([1.0, -1.0, 0.5, -2.0], device=device)
    logp, _ = ref_token_stats(inp["logits"].cpu(), inp["ids"].cpu())
    lr = torch.zeros(4, T, dtype=torch.float64)  # the log-ratios log(pi / old) we want
    lr[0, 0], lr[0, 1:] = 25.0, -19.0 / (T - 1)  # sum 1 after the token clamp (6 without)
    lr[1] = -19.5 / T                             # sum -19.5: floored at log 1e-8
    lr[2] = 18.0 / T                              # + log(1e-8) from the zero weight below: about -0.4
    inp["old"] = (logp - lr).float().to(device)
    w = torch.ones(4, T)
    w[2, 1] = 0.0
    w[3, -1] = 0.0  # masked out: ignored
    opts = {} if k is None else dict(vespo_k_pos=k, vespo_k_neg=k)
    out, _ = check(inp, use_ref=False, loss_type="vespo", weights=w.to(device), **opts)  # no KL: its ratio is e^25
    assert torch.isfinite(out.vespo_phi_seq_mean)


def test_vespo_refuses_sequence_weights():
    inp = _vespo_case()
    with pytest.raises(ValueError, match=r"importance_weights has shape \(4, 1\).*vespo.*per-token"):
        grpo_fast.policy_loss(inp["logits"], inp["ids"], inp["adv"], inp["mask"], inp["old"], loss_type="vespo",
                              importance_weights=torch.ones(4, 1))
    # with T = 1, (B, 1) is per-token
    grpo_fast.policy_loss(inp["logits"][:, :1], inp["ids"][:, :1], inp["adv"], inp["mask"][:, :1],
                          inp["old"][:, :1], loss_type="vespo", importance_weights=torch.ones(4, 1))


def test_vespo_metric_skips_empty_sequences():
    """vespo_phi_seq_mean is over the sequences that have tokens (TRL counts empty ones as phi = 1)."""
    inp = _vespo_case()
    inp["mask"][2] = False
    out = grpo_fast.policy_loss(inp["logits"], inp["ids"], inp["adv"], inp["mask"], inp["old"], loss_type="vespo")
    keep = grpo_fast.policy_loss(inp["logits"][[0, 1, 3]], inp["ids"][[0, 1, 3]], inp["adv"][[0, 1, 3]],
                                 inp["mask"][[0, 1, 3]], inp["old"][[0, 1, 3]], loss_type="vespo")
    assert abs(out.vespo_phi_seq_mean.item() - keep.vespo_phi_seq_mean.item()) < 1e-6
    assert grpo_fast.policy_loss(inp["logits"], inp["ids"], inp["adv"], inp["mask"], inp["old"]).vespo_phi_seq_mean \
        is None


# ------------------------------------------------------------------ options= and keyword overrides

def test_options_object_and_keyword_overrides():
    """policy_loss(options=LossOptions(...), **overrides) == policy_loss(**all keywords); the fused head
    takes the same; an override replaces the field and is validated."""
    inp = _vespo_case()
    base = LossOptions(loss_type="vespo", vespo_k_pos=1.5, beta=0.05)
    args = (inp["logits"], inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"])
    a = grpo_fast.policy_loss(*args, options=base, vespo_lambda_neg=1.2, temperature=0.9)
    b = grpo_fast.policy_loss(*args, loss_type="vespo", vespo_k_pos=1.5, beta=0.05, vespo_lambda_neg=1.2,
                              temperature=0.9)
    c = grpo_fast.policy_loss(*args, options=base)
    assert torch.equal(a.loss, b.loss) and not torch.equal(a.loss, c.loss)
    with pytest.raises(ValueError, match="vespo_lambda_neg=0.0"):
        grpo_fast.policy_loss(*args, options=base, vespo_lambda_neg=0.0)
    with pytest.raises(TypeError, match="unknown option.*vespo_k"):
        grpo_fast.policy_loss(*args, options=base, vespo_k=1.0)
    with pytest.raises(TypeError, match="options must be a LossOptions"):
        grpo_fast.policy_loss(*args, options={"loss_type": "vespo"})
    H = 16
    hidden = torch.randn(4, inp["ids"].shape[1], H)
    weight = torch.randn(40, H)
    logits = hidden @ weight.T
    f = grpo_fast.policy_loss_from_hidden(hidden, weight, inp["ids"], inp["adv"], inp["mask"], inp["old"],
                                          inp["ref"], options=base, vespo_lambda_neg=1.2, temperature=0.9)
    p = grpo_fast.policy_loss(logits, inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"], options=base,
                              vespo_lambda_neg=1.2, temperature=0.9)
    assert torch.allclose(f.loss, p.loss, atol=1e-6) and torch.allclose(f.vespo_phi_seq_mean, p.vespo_phi_seq_mean)


# ------------------------------------------------------------------ every option at once

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("loss_type,extra", [("grpo", {"delta": 1.5, "epsilon_high": 0.28}),
                                             ("cispo", {"epsilon_high": 1.5}), ("sapo", {})])
def test_all_options_together(device, backend, loss_type, extra):
    inp = sample_inputs(device, B=4, **_shape(backend), seed=32)
    inp["adv"] = torch.tensor([-1.0, 0.5, -0.3, 1.2], device=device)
    check(inp, loss_type=loss_type, beta=0.04, entropy_coef=0.01, top_entropy_quantile=0.4,
          off_policy_mask_threshold=0.02, temperature=0.8, gradient_accumulation_steps=2, **extra)


def test_gradcheck_float64_variants():
    torch.manual_seed(0)
    B, T, V = 2, 4, 7
    ids = torch.randint(0, V, (B, T))
    adv = torch.tensor([0.7, -1.1])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    old = torch.randn(B, T, dtype=torch.float64) * 0.1 - 2
    ref = torch.randn(B, T, dtype=torch.float64) * 0.1 - 2
    x = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    # (not cispo: its loss value contains the stop-gradient weight, so finite differences of the
    # value are not its defined gradient; test_cispo_gradient_is_capped_weight_times_advantage covers it)
    for opts in (dict(loss_type="sapo"),
                 dict(top_entropy_quantile=0.3, entropy_coef=0.05), dict(off_policy_mask_threshold=0.0),
                 dict(importance_sampling_level="sequence", loss_type="sapo")):
        def f(z):
            return grpo_fast.policy_loss(z, ids, adv, mask, old, ref, beta=0.1, temperature=0.8, **opts).loss
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6), opts


# ------------------------------------------------------------------ no tokens (issue 11 §5)

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("B,T", [(2, 0), (0, 5)])
@pytest.mark.parametrize("strided", [False, True])
def test_no_tokens_gives_zero_loss_and_zero_gradient(device, backend, B, T, strided):
    V = 11
    full = torch.randn(B, T + 1, V, device=device, requires_grad=True)
    logits = full[:, :-1] if strided else full[:, :T]
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    z = torch.zeros(B, T, device=device)
    for lt in LOSS_TYPES:
        out = grpo_fast.policy_loss(logits, ids, torch.randn(B, device=device), torch.ones(B, T, device=device),
                                    z, z, beta=0.1, entropy_coef=0.01, top_entropy_quantile=0.2,
                                    off_policy_mask_threshold=0.1, **_options_of(lt))
        out.loss.backward()
        assert out.loss.item() == 0.0
        assert full.grad is not None and full.grad.shape == full.shape and (full.grad == 0).all()
        for name in ("entropy", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region",
                     "entropy_masked_frac", "off_policy_masked_frac", "entropy_kept", "vespo_phi_seq_mean"):
            if name != "vespo_phi_seq_mean" or lt == "vespo":
                assert getattr(out, name).item() == 0.0, (lt, name)
        full.grad = None
    lp, ent = grpo_fast.selective_log_softmax(logits, ids, return_entropy=True)
    assert lp.shape == (B, T) and ent.shape == (B, T) and lp.dtype == torch.float32
