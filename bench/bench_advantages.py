"""group_advantages and gae (C++ core) against plain-torch compositions, on CPU.

    python -m pytest bench/bench_advantages.py --benchmark-columns=median,min,rounds

The timed call is the public function a user calls (validation, dispatch, output
allocation included). The torch baselines are what trainers write by hand:
TRL's view / mean / std / sub / div for GRPO, and a Python loop over T of
vectorised torch ops for GAE.
"""
import pytest
import torch

from grpo_fast.ops.advantages import gae, group_advantages

GROUP = 8
SIZES = [64, 256, 1024, 4096, 16384, 65536]


def torch_group_advantages(rewards, group_size, eps=1e-4):
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def torch_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Masked reverse scan, vectorised over the batch, a Python loop over T."""
    batch, length = rewards.shape
    mask = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(batch, dtype=rewards.dtype)
    next_adv = torch.zeros(batch, dtype=rewards.dtype)
    for t in range(length - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        next_adv = m * a + (1 - m) * next_adv
        next_value = m * values[:, t] + (1 - m) * next_value
        adv[:, t] = m * a
    return adv, (adv + values) * mask


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", ["grpo_fast", "torch"])
def test_group_advantages(benchmark, provider, n):
    benchmark.group = f"group_advantages N={n} G={GROUP}"
    rewards = torch.randn(n, generator=torch.Generator().manual_seed(0))
    if provider == "grpo_fast":
        out = benchmark(group_advantages, rewards, GROUP)
    else:
        out = benchmark(torch_group_advantages, rewards, GROUP)
    torch.testing.assert_close(out, group_advantages(rewards, GROUP), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 256), (256, 1024)])
@pytest.mark.parametrize("provider", ["grpo_fast", "torch"])
def test_gae(benchmark, provider, shape):
    batch, length = shape
    benchmark.group = f"gae B={batch} T={length}"
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(batch, length, generator=g)
    values = torch.randn(batch, length, generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]  # right-padded
    fn = gae if provider == "grpo_fast" else torch_gae
    adv, ret = benchmark(fn, rewards, values, mask, 1.0, 0.95)
    ref_adv, ref_ret = gae(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-4, atol=1e-4)
