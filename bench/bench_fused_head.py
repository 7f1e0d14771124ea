"""The fused LM head: policy_loss_from_hidden fwd+bwd against the paths that make logits.

Providers, all from the same hidden states (B, T, H) and head W (V, H) to the same GRPO
loss (beta = 0.04 with k3, epsilon 0.2 / 0.28, temperature 0.9, a mask with padding,
old and reference log-probs), and backward into hidden and W:
    fused        grpo_fast.policy_loss_from_hidden(hidden, W, ...)
    unfused      logits = hidden @ W.T, then grpo_fast.policy_loss(logits, ...)
    torch_trl    logits = hidden @ W.T, then plain torch as TRL wrote it before its fused
                 head: (logits / T).float().log_softmax(-1).gather(...), TRL's loss written out
    trl_chunked  TRL 1.16's trl.kernels.ChunkedLogProbFunction (its fused head; chunk
                 32768 as TRL's trainer uses; entropy requested, as our path computes it),
                 then the same TRL loss
Reported: time (pytest-benchmark), and in extra_info the peak extra memory of one fwd+bwd
beyond the gradients owed (hidden and W), in MB and as a fraction of the float32 logits
it replaces (N*V*4 bytes), and the time relative to `unfused` when that ran first.

Peak memory on CPU is measured in a fresh process per provider (so no provider inherits
another's allocator state): a warm-up fwd+bwd on a small problem loads every library and
code path, then the peak resident set (VmHWM, reset through /proc/self/clear_refs) of the
measured fwd+bwd minus the resident set before it, minus the gradients' bytes. glibc's
mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_=65536) so that freed large blocks leave
the resident set and the peak follows live memory. On CUDA: torch's allocator peak.

    OMP_NUM_THREADS=2 python -m pytest bench/bench_fused_head.py --benchmark-columns=median,min,rounds \
        --benchmark-json=fused_head.json
    python bench/bench_fused_head.py --report fused_head.json     # the markdown table
    OMP_NUM_THREADS=2 python bench/bench_fused_head.py --interleaved 4 512 128 151936 float32 3
        # providers round-robin, for a shared machine whose load drifts (see interleaved())
    GRPO_FAST_BENCH_SIZES=gpu ... on a CUDA machine (default there): N=16384, H=4096
    GRPO_FAST_BENCH_SIZES=cpu_small (N=512), GRPO_FAST_BENCH_ROUNDS=n: shorter CPU runs
"""
from __future__ import annotations

import gc
import json
import statistics
import os
import subprocess
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V_QWEN = 151936
SIZES = {
    "tiny": [(2, 64, 64, 1000)],
    "cpu": [(4, 512, 128, V_QWEN)],  # N = 2048 tokens (the CPU target)
    # bf16 GEMMs are slow on CPUs without native bf16 (minutes per unfused step at N = 2048)
    "cpu_small": [(1, 512, 128, V_QWEN)],
    "gpu": [(16, 1024, 4096, V_QWEN)],  # N = 16384
}[os.environ.get("GRPO_FAST_BENCH_SIZES", "gpu" if DEVICE == "cuda" else "cpu")]
DTYPES = [torch.float32, torch.bfloat16]
BETA, EPS_LOW, EPS_HIGH, TEMP = 0.04, 0.2, 0.28, 0.9
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def _trl_chunked_fn():
    try:
        from trl.kernels import ChunkedLogProbFunction
    except Exception:
        return None
    return ChunkedLogProbFunction


PROVIDERS = ["unfused", "fused", "torch_trl", "trl_chunked"]


def inputs(B, T, H, V, dtype, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, T - T // 8:] = False  # some padding
    # old / ref near a plausible log-prob (uniform over V), so ratios straddle the clip range
    base = -torch.log(torch.tensor(float(V)))
    old = (base + 0.05 * torch.randn(B, T, generator=g)).to(device)
    ref = (base + 0.05 * torch.randn(B, T, generator=g)).to(device)
    adv = torch.randn(B, generator=g).to(device)
    return dict(hidden=hidden, weight=weight, ids=ids, mask=mask.to(device), old=old, ref=ref, adv=adv)


def _trl_loss(logps, mask, old, ref, adv):
    # TRL's GRPO loss from per-token log-probs: ratio, clip, k3 KL, mean per sequence then over sequences
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    per_token = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    d = ref - logps
    per_token = per_token + BETA * (torch.exp(d) - d - 1)
    m = mask.float()
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


def loss_fn(provider):
    import grpo_fast

    def fused(x):
        return grpo_fast.policy_loss_from_hidden(
            x["hidden"], x["weight"], x["ids"], x["adv"], x["mask"], x["old"], x["ref"],
            beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, temperature=TEMP).loss

    def unfused(x):
        logits = x["hidden"] @ x["weight"].T  # (B, T, V)
        return grpo_fast.policy_loss(logits, x["ids"], x["adv"], x["mask"], x["old"], x["ref"], beta=BETA,
                                     epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, temperature=TEMP).loss

    def torch_trl(x):
        logits = x["hidden"] @ x["weight"].T  # (B, T, V)
        z = logits.float() / TEMP
        logps = torch.log_softmax(z, dim=-1).gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
        return _trl_loss(logps, x["mask"], x["old"], x["ref"], x["adv"])

    def trl_chunked(x):
        B, T, H = x["hidden"].shape
        logps, _entropy, *_ = _trl_chunked_fn().apply(
            x["hidden"].reshape(B * T, H), x["weight"], None, x["ids"].reshape(B * T), TEMP, TRL_CHUNK,
            None, 1.0, ("entropy",))
        return _trl_loss(logps.view(B, T).float(), x["mask"], x["old"], x["ref"], x["adv"])

    return {"fused": fused, "unfused": unfused, "torch_trl": torch_trl, "trl_chunked": trl_chunked}[provider]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _step(fn, x):
    x["hidden"].grad = None
    x["weight"].grad = None
    fn(x).backward()
    _sync()


# ---------------------------------------------------------------- peak memory (fresh process)

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_bytes(provider: str, B: int, T: int, H: int, V: int, dtype: torch.dtype) -> int:
    """In this process: peak memory of one fwd+bwd beyond its start and the gradients owed."""
    fn = loss_fn(provider)
    small = inputs(1, 64, H, 4096, dtype)
    _step(fn, small)  # libraries, thread pools and every code path warmed on a small problem
    del small
    x = inputs(B, T, H, V, dtype)
    owed = sum(t.numel() * t.element_size() for t in (x["hidden"], x["weight"]))
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        _step(fn, x)
        return torch.cuda.max_memory_allocated() - start - owed
    start = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    _step(fn, x)
    return _status("VmHWM:") - start - owed


def peak_in_fresh_process(provider, B, T, H, V, dtype) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, os.path.abspath(__file__), "--peak", provider, str(B), str(T), str(H), str(V),
           str(dtype).replace("torch.", "")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"peak measurement of {provider} failed:\n{res.stderr[-3000:]}")
    return int(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # run as a script (--peak / --report) without pytest
    pytest = None

if pytest is not None:
    from _common import device_name, env_summary

    _UNFUSED_MEDIAN = {}

    @pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}xT{}xH{}xV{}".format(*s))
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
    @pytest.mark.parametrize("provider", PROVIDERS)
    def test_fused_head_fwd_bwd(benchmark, provider, dtype, size):
        if provider == "trl_chunked" and _trl_chunked_fn() is None:
            pytest.skip("trl (1.16, trl.kernels.ChunkedLogProbFunction) is not installed")
        B, T, H, V = size
        N = B * T
        key = (str(dtype), size)
        benchmark.group = f"fused LM head fwd+bwd {str(dtype)[6:]} N{N} H{H} V{V} on {DEVICE}"
        benchmark.extra_info.update(env_summary(), device=device_name(DEVICE), N=N, H=H, V=V,
                                    logits_fp32_MB=N * V * 4 / 2**20)
        fn = loss_fn(provider)
        x = inputs(B, T, H, V, dtype)
        rounds = int(os.environ.get("GRPO_FAST_BENCH_ROUNDS", 3 if DEVICE == "cpu" else 10))
        benchmark.pedantic(lambda: _step(fn, x), rounds=rounds, warmup_rounds=1)
        median = benchmark.stats.stats.median
        if provider == "unfused":
            _UNFUSED_MEDIAN[key] = median
        if key in _UNFUSED_MEDIAN:
            benchmark.extra_info["time_vs_unfused"] = median / _UNFUSED_MEDIAN[key]
        del x
        gc.collect()
        if DEVICE == "cpu" or os.environ.get("GRPO_FAST_BENCH_PEAK", "1") == "1":
            peak = peak_in_fresh_process(provider, B, T, H, V, dtype)
            benchmark.extra_info["peak_extra_MB"] = peak / 2**20
            benchmark.extra_info["peak_extra_x_fp32_logits"] = peak / (N * V * 4)


# ---------------------------------------------------------------- script entry points

def _report(path: str) -> None:
    data = json.load(open(path))
    rows = data["benchmarks"]
    first = rows[0]["extra_info"] if rows else {}
    print(f"Device: {first.get('device', '?')}; torch {first.get('torch', '?')}, trl {first.get('trl', '-')}, "
          f"transformers {first.get('transformers', '-')}; {data.get('datetime', '')}\n")
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, rs in groups.items():
        unf = next((r for r in rs if "[unfused" in r["name"]), None)
        print(f"### {group}\n")
        print("| provider | median s | min s | time vs unfused | peak extra MB | peak extra / fp32 logits |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rs:
            e, st = r["extra_info"], r["stats"]
            name = r["name"].split("[", 1)[1].split("-", 1)[0]
            rel = st["median"] / unf["stats"]["median"] if unf else float("nan")
            print(f"| {name} | {st['median']:.3f} | {st['min']:.3f} | {rel:.2f}x | "
                  f"{e.get('peak_extra_MB', float('nan')):.0f} | {e.get('peak_extra_x_fp32_logits', float('nan')):.3f} |")
        print()


def interleaved(B, T, H, V, dtype, rounds, providers=PROVIDERS, peak=True):
    """Time the providers round-robin (round r runs every provider once), so that a machine
    whose load changes over minutes (a shared CPU) slows all of them alike; print medians, the
    ratio to `unfused`, and each provider's peak extra memory from a fresh process."""
    import time

    providers = [p for p in providers if p != "trl_chunked" or _trl_chunked_fn() is not None]
    x = inputs(B, T, H, V, dtype)
    fns = {p: loss_fn(p) for p in providers}
    times = {p: [] for p in providers}
    for p in providers:  # warm-up
        _step(fns[p], inputs(1, 64, H, 4096, dtype))
    for _ in range(rounds):
        for p in providers:
            t0 = time.perf_counter()
            _step(fns[p], x)
            times[p].append(time.perf_counter() - t0)
    del x
    gc.collect()
    med = {p: statistics.median(ts) for p, ts in times.items()}
    N = B * T
    print(f"fused LM head fwd+bwd, N={N} H={H} V={V} {str(dtype)[6:]}, {torch.get_num_threads()} threads, "
          f"{rounds} interleaved rounds; fp32 logits = {N * V * 4 / 2**20:.0f} MB\n")
    print("| provider | median s | all rounds s | time vs unfused | peak extra MB | peak extra / fp32 logits |")
    print("|---|---:|---|---:|---:|---:|")
    for p in providers:
        pk = peak_in_fresh_process(p, B, T, H, V, dtype) if peak else float("nan")
        rel = med[p] / med["unfused"] if "unfused" in med else float("nan")
        print(f"| {p} | {med[p]:.2f} | {', '.join(f'{t:.1f}' for t in times[p])} | {rel:.2f}x | "
              f"{pk / 2**20:.0f} | {pk / (N * V * 4):.3f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--interleaved":
        # --interleaved B T H V dtype rounds
        B, T, H, V = map(int, sys.argv[2:6])
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        interleaved(B, T, H, V, getattr(torch, sys.argv[6]), int(sys.argv[7]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--peak":
        provider, B, T, H, V, dtype = sys.argv[2], *map(int, sys.argv[3:7]), getattr(torch, sys.argv[7])
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(peak_extra_bytes(provider, B, T, H, V, dtype))
    elif len(sys.argv) == 3 and sys.argv[1] == "--report":
        _report(sys.argv[2])
    else:
        print(__doc__)
