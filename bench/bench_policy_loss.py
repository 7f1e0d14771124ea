"""policy_loss: grpo_fast vs plain torch as TRL writes it vs Liger-Kernel, fwd / bwd / fwd+bwd.

Every provider gets the same (B, T+1, V) logits, as a model returns them with
logits_to_keep = T + 1, and uses the first T positions; the same advantages,
old and reference log-probs, mask, beta = 0.04, epsilon 0.2 / 0.28, temperature 0.9.
Reported: time (pytest-benchmark), and in extra_info the GB/s from the explicit
byte count (forward reads the logits once, backward reads once and writes once)
and the peak extra memory in units of the logits' size. A device-to-device copy
of the logits runs in the same session as the bandwidth reference.

    python -m pytest bench/bench_policy_loss.py --benchmark-columns=median,min,rounds
    GRPO_FAST_BENCH_SIZES=gpu ... on a CUDA machine (default there)
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch

import grpo_fast
from _common import device_name, env_summary, peak_extra_memory, sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {
    "tiny": [(2, 64, 1000)],
    "cpu": [(8, 512, 32000)],
    "gpu": [(16, 1024, 32000), (16, 1024, 128256), (16, 1024, 151936)],
}[os.environ.get("GRPO_FAST_BENCH_SIZES", "gpu" if DEVICE == "cuda" else "cpu")]
DTYPES = [torch.bfloat16, torch.float32]
MODES = ["fwd", "bwd", "fwd_bwd"]
BETA, EPS_LOW, EPS_HIGH, TEMP = 0.04, 0.2, 0.28, 0.9


def _liger():
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception:
        return None
    return triton_grpo_loss


PROVIDERS = ["copy", "grpo_fast", "grpo_fast_inplace", "torch_trl"]
if DEVICE == "cuda":
    PROVIDERS.append("liger")


def _inputs(B, T, V, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(B, T + 1, V, device=DEVICE, dtype=dtype, generator=g)
    ids = torch.randint(0, V, (B, T), device=DEVICE, generator=g)
    mask = torch.ones(B, T, device=DEVICE, dtype=torch.bool)
    mask[:, T - T // 8:] = False  # some padding
    logp = torch.log_softmax(logits[:1, :-1].float() / TEMP, -1).gather(-1, ids[:1, ..., None])[..., 0]
    old = (logp.expand(B, T) + 0.05 * torch.randn(B, T, device=DEVICE, generator=g)).contiguous()
    ref = (logp.expand(B, T) + 0.05 * torch.randn(B, T, device=DEVICE, generator=g)).contiguous()
    adv = torch.randn(B, device=DEVICE, generator=g)
    return logits, ids, mask, old, ref, adv


def _torch_trl(logits, ids, mask, old, ref, adv):
    # log_softmax in float32, gather, ratio, clip, k3: TRL's GRPO loss written out
    z = logits[:, :-1].float() / TEMP
    logps = torch.log_softmax(z, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    per_token = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    d = ref - logps
    per_token = per_token + BETA * (torch.exp(d) - d - 1)
    m = mask.float()
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


def _grpo_fast(logits, ids, mask, old, ref, adv, inplace=False):
    return grpo_fast.policy_loss(
        logits[:, :-1], ids, adv, mask, old, ref, beta=BETA, epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH, temperature=TEMP, inplace_grad=inplace,
    ).loss


def _liger_loss(logits, ids, mask, old, ref, adv):
    fn = _liger()
    kw = dict(temperature=TEMP, beta=BETA, eps_low=EPS_LOW, eps_high=EPS_HIGH, inplace=True)
    params = inspect.signature(fn).parameters
    if "loss_type" in params:
        kw["loss_type"] = "grpo"
    if "reduce" in params:
        kw["reduce"] = True
    out = fn(logits, old, ref, ids, adv, mask.to(torch.int32), **kw)
    loss = out[0] if isinstance(out, tuple) else out
    if loss.dim() > 0:  # older versions return per-token losses
        m = mask.float()
        loss = ((loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    return loss


def _loss_fn(provider):
    return {
        "grpo_fast": _grpo_fast,
        "grpo_fast_inplace": lambda *a: _grpo_fast(*a, inplace=True),
        "torch_trl": _torch_trl,
        "liger": _liger_loss,
    }[provider]


class _LmHeadOutput(torch.autograd.Function):
    """Stands in for `hidden @ W.T`: its output is a fresh tensor, and its backward takes
    the logits gradient and lets it go (the real one turns it into small weight and
    hidden-state gradients), so no provider is charged for a leaf's .grad copy."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def _bytes(mode, logits):
    n = logits[:, :-1].numel() * logits.element_size()
    return {"fwd": n, "bwd": 2 * n, "fwd_bwd": 3 * n, "copy": 2 * logits.numel() * logits.element_size()}[mode]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}xT{}xV{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_policy_loss(benchmark, provider, mode, dtype, size):
    if provider == "liger" and _liger() is None:
        pytest.skip("liger-kernel is not installed")
    if provider == "copy" and mode != "fwd":
        pytest.skip("the copy reference runs once per size")
    B, T, V = size
    base, ids, mask, old, ref, adv = _inputs(B, T, V, dtype)
    benchmark.group = f"policy_loss {mode} {str(dtype)[6:]} B{B} T{T} V{V} on {DEVICE}"
    benchmark.extra_info.update(env_summary(), device=device_name(DEVICE), logits_MB=base.numel() * base.element_size() / 2**20)

    if provider == "copy":
        dst = torch.empty_like(base)

        def run():
            dst.copy_(base)
            sync(DEVICE)

        benchmark.pedantic(run, rounds=10, warmup_rounds=2)
        benchmark.extra_info["GB/s"] = _bytes("copy", base) / benchmark.stats.stats.median / 1e9
        return

    fn = _loss_fn(provider)

    def fresh():
        # the logits as a model returns them: a fresh non-leaf tensor (the lm_head output)
        # whose backward consumes the gradient, as the lm_head matmul would
        leaf = base.clone().requires_grad_()
        return leaf, _LmHeadOutput.apply(leaf)

    def setup_fwd():
        leaf, x = fresh()
        sync(DEVICE)
        return (x,), {}

    def run_fwd(x):
        loss = fn(x, ids, mask, old, ref, adv)  # with autograd recording, as in training
        sync(DEVICE)
        return loss

    def setup_bwd():
        leaf, x = fresh()
        loss = fn(x, ids, mask, old, ref, adv)
        sync(DEVICE)
        return (loss,), {}

    def run_bwd(loss):
        loss.backward()
        sync(DEVICE)

    def run_fwd_bwd(x):
        fn(x, ids, mask, old, ref, adv).backward()
        sync(DEVICE)

    rounds = 5 if DEVICE == "cpu" else 20
    if mode == "fwd":
        benchmark.pedantic(run_fwd, setup=setup_fwd, rounds=rounds, warmup_rounds=1)
    elif mode == "bwd":
        benchmark.pedantic(run_bwd, setup=setup_bwd, rounds=rounds, warmup_rounds=1)
    else:
        benchmark.pedantic(run_fwd_bwd, setup=setup_fwd, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = _bytes(mode, base) / benchmark.stats.stats.median / 1e9

    if mode == "fwd_bwd":
        # peak extra memory of one forward+backward over fresh logits (gradient included)
        (x,), _ = setup_fwd()
        mem = {}
        with peak_extra_memory(DEVICE, mem):
            fn(x, ids, mask, old, ref, adv).backward()
        logits_bytes = base[:, :-1].numel() * base.element_size()
        benchmark.extra_info["peak_extra_MB"] = mem["peak_extra_bytes"] / 2**20
        benchmark.extra_info["peak_extra_x_logits"] = mem["peak_extra_bytes"] / logits_bytes
