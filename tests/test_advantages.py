"""group_advantages (C++ core) against plain-Python loops written from the formulas."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import devices
from grpo_fast import _C
from grpo_fast.ops.advantages import group_advantages

NAN = float("nan")


# --------------------------------------------------------------------------- reference

def _stats(values):
    """mean and Bessel std of a list of floats (std None for fewer than two)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def reference(rewards, bounds, estimator="grpo", scale="group", eps=1e-4):
    """Plain loops over groups [(begin, end), ...]; float64 Python numbers in and out."""
    out = [0.0] * len(rewards)
    kept = [r for r in rewards if not math.isnan(r)]
    batch_std = _stats(kept)[1] if len(kept) > 1 else 0.0
    for begin, end in bounds:
        members = [r for r in rewards[begin:end] if not math.isnan(r)]
        if len(members) < 2 or len(set(members)) == 1:
            continue  # groups of one and equal rewards: 0
        mean, std = _stats(members)
        n = len(members)
        for i in range(begin, end):
            r = rewards[i]
            if math.isnan(r):
                continue
            if estimator == "grpo":
                centred = r - mean
            else:  # rloo: r minus the mean of the others
                centred = r - (sum(members) - r) / (n - 1)
            if scale == "group":
                centred /= std + eps
            elif scale == "batch":
                centred /= batch_std + eps
            out[i] = centred
    return out


def fixed_bounds(n, group_size):
    return [(b, b + group_size) for b in range(0, n, group_size)]


def offset_bounds(offsets):
    return list(zip(offsets[:-1], offsets[1:]))


def _check_against_reference(rewards, out, bounds, **options):
    expected = reference(rewards.double().cpu().tolist(), bounds, **options)
    assert out.dtype == torch.float32
    assert out.shape == rewards.shape
    assert out.device == rewards.device
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.cpu(), torch.tensor(expected, dtype=torch.float32),
                               rtol=2e-6, atol=2e-6)


def sample_inputs(device, dtype, n=8 * 37, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    rewards[5] = NAN                     # a missing reward
    rewards[16:24] = 0.5                 # a group of equal rewards
    rewards[24:31] = NAN                 # a group with one reward left
    rewards[40:48] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])  # rare success
    return rewards.to(device)


# --------------------------------------------------------------------------- maths

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_fixed_groups(device, dtype, estimator, scale):
    rewards = sample_inputs(device, dtype)
    out = group_advantages(rewards, 8, estimator=estimator, scale=scale)
    _check_against_reference(rewards, out, fixed_bounds(len(rewards), 8),
                             estimator=estimator, scale=scale)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_variable_groups(device, estimator, scale):
    sizes = [3, 0, 1, 7, 2, 16, 0, 5]  # empty groups and groups of one included
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    rewards = torch.randn(offsets[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rewards[4] = NAN
    out = group_advantages(rewards.to(device), group_offsets=torch.tensor(offsets, device=device),
                           estimator=estimator, scale=scale, eps=1e-3)
    _check_against_reference(rewards, out, offset_bounds(offsets), estimator=estimator,
                             scale=scale, eps=1e-3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_groups_and_singletons_are_zero_even_with_eps_zero(device, scale):
    rewards = torch.tensor([0.1] * 8 + [3.0] * 8 + [NAN] * 7 + [2.0], device=device)
    for out in (group_advantages(rewards, 8, scale=scale, eps=0.0),
                group_advantages(rewards, 8, estimator="rloo", scale=scale, eps=0.0),
                group_advantages(rewards, 1, scale=scale, eps=0.0)):
        assert torch.equal(out.cpu(), torch.zeros(24))


@pytest.mark.parametrize("device", devices())
def test_group_of_two(device):
    rewards = torch.tensor([0.0, 1.0, 3.0, 3.0], device=device)
    out = group_advantages(rewards, 2, eps=0.0)
    s = math.sqrt(0.5)  # Bessel std of {0, 1}
    torch.testing.assert_close(out.cpu(), torch.tensor([-0.5 / s, 0.5 / s, 0.0, 0.0]))


@pytest.mark.parametrize("device", devices())
def test_all_nan_and_empty(device):
    assert torch.equal(group_advantages(torch.full((6,), NAN, device=device), 3).cpu(),
                       torch.zeros(6))
    empty = group_advantages(torch.empty(0, device=device), 4)
    assert empty.shape == (0,) and empty.dtype == torch.float32
    empty = group_advantages(torch.empty(0, device=device),
                             group_offsets=torch.zeros(3, dtype=torch.int64, device=device))
    assert empty.shape == (0,)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("group_size", [8, 16])
def test_matches_trl(device, group_size):
    """TRL: (rewards - view(-1,G).mean(1)) / (view(-1,G).std(1) + 1e-4), per group."""
    rewards = torch.rand(group_size * 13, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2)).to(device)
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)
    std = grouped.std(1).repeat_interleave(group_size)
    trl = (rewards - mean) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, group_size), trl.float())
    # scale_rewards="batch": group mean, batch std
    trl_batch = (rewards - mean) / (rewards.std() + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, group_size, scale="batch"),
                               trl_batch.float())


def test_large_input_uses_threads_and_agrees():
    n = 1 << 17  # above the threading threshold
    rewards = torch.randn(n, generator=torch.Generator().manual_seed(3))
    rewards[::1001] = NAN
    # as csrc/parallel.h decides: every hardware thread, at least 2^14 rewards each, at most one per group
    expected_threads = min(_C.hardware_threads(), n // (1 << 14), n // 16)
    for scale in ("group", "batch"):
        group_advantages(rewards[:64], 16, scale=scale)             # below the threshold: one thread
        assert _C.last_parallel_threads() == 1
        out = group_advantages(rewards, 16, scale=scale)
        assert _C.last_parallel_threads() == max(1, expected_threads)
        if _C.hardware_threads() > 1:
            assert _C.last_parallel_threads() > 1                   # the large input really ran threaded
        grouped = rewards.double().view(-1, 16)
        valid = ~grouped.isnan()
        count = valid.sum(1, keepdim=True)
        mean = grouped.nansum(1, keepdim=True) / count
        dev = torch.where(valid, grouped - mean, 0.0)
        if scale == "group":
            std = (dev.pow(2).sum(1, keepdim=True) / (count - 1)).sqrt()
        else:
            kept = rewards.double()[~rewards.isnan()]
            std = kept.std()
        expected = torch.where(valid, dev / (std + 1e-4), 0.0).view(-1).float()
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float16, torch.bfloat16])
def test_other_real_dtypes_become_float32(dtype):
    rewards = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1]).to(dtype)
    out = group_advantages(rewards, 4)
    expected = group_advantages(rewards.float(), 4)
    assert torch.equal(out, expected)


def test_non_contiguous_and_requires_grad():
    base = torch.randn(64, requires_grad=True)
    strided = base[::2]
    out = group_advantages(strided, 8)
    assert not out.requires_grad
    torch.testing.assert_close(out, group_advantages(strided.detach().contiguous(), 8))


# --------------------------------------------------------------------------- properties

_values = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, 3.25, NAN])


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=12),
       data=st.data(),
       estimator=st.sampled_from(["grpo", "rloo"]),
       scale=st.sampled_from(["group", "batch", "none"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_random_group_layouts(sizes, data, estimator, scale, dtype):
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    values = data.draw(st.lists(_values, min_size=offsets[-1], max_size=offsets[-1]))
    rewards = torch.tensor(values, dtype=dtype)
    out = group_advantages(rewards, group_offsets=torch.tensor(offsets),
                           estimator=estimator, scale=scale)
    _check_against_reference(rewards, out, offset_bounds(offsets), estimator=estimator,
                             scale=scale)
    # fixed groups give the same numbers as the equivalent offsets
    if len(set(sizes)) == 1 and sizes[0] > 0:
        fixed = group_advantages(rewards, sizes[0], estimator=estimator, scale=scale)
        assert torch.equal(fixed, out)


@settings(max_examples=50, deadline=None)
@given(shift=st.floats(-1e3, 1e3), factor=st.floats(0.01, 100.0))
def test_grpo_is_shift_and_scale_invariant(shift, factor):
    rewards = torch.tensor([0.0, 1.0, 2.0, 4.0, 1.0, 1.0, 3.0, 0.5], dtype=torch.float64)
    base = group_advantages(rewards, 4, eps=0.0)
    moved = group_advantages(rewards * factor + shift, 4, eps=0.0)
    torch.testing.assert_close(moved, base, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("call, error, words", [
    (lambda r: group_advantages(r.view(4, 8), 8), ValueError, ["rewards", "1-D", "(4, 8)"]),
    (lambda r: group_advantages(r, 5), ValueError, ["N = 32", "group_size = 5"]),
    (lambda r: group_advantages(r), ValueError, ["group_size", "group_offsets", "neither"]),
    (lambda r: group_advantages(r, 8, group_offsets=torch.tensor([0, 32])), ValueError,
     ["group_size", "group_offsets", "both"]),
    (lambda r: group_advantages(r, 0), ValueError, ["group_size", ">= 1", "0"]),
    (lambda r: group_advantages(r, 8.0), TypeError, ["group_size", "int", "float"]),
    (lambda r: group_advantages(r, group_offsets=torch.tensor([1, 32])), ValueError,
     ["group_offsets", "offsets[0] = 1"]),
    (lambda r: group_advantages(r, group_offsets=torch.tensor([0, 31])), ValueError,
     ["group_offsets", "N = 32", "offsets[-1] = 31"]),
    (lambda r: group_advantages(r, group_offsets=torch.tensor([0, 20, 10, 32])), ValueError,
     ["group_offsets", "non-decreasing", "offsets[1] = 20"]),
    (lambda r: group_advantages(r, group_offsets=torch.tensor([[0, 32]])), ValueError,
     ["group_offsets", "1-D", "(1, 2)"]),
    (lambda r: group_advantages(r, group_offsets=torch.tensor([0.0, 32.0])), TypeError,
     ["group_offsets", "int64", "float32"]),
    (lambda r: group_advantages(r, group_offsets=[0, 32]), TypeError,
     ["group_offsets", "Tensor", "list"]),
    (lambda r: group_advantages(r, 8, estimator="ppo"), ValueError, ["estimator", "'ppo'", "rloo"]),
    (lambda r: group_advantages(r, 8, scale="global"), ValueError, ["scale", "'global'", "batch"]),
    (lambda r: group_advantages(r, 8, eps=-1e-4), ValueError, ["eps", ">= 0", "-0.0001"]),
    (lambda r: group_advantages(r, 8, eps=float("nan")), ValueError, ["eps", "nan"]),
    (lambda r: group_advantages(r.to(torch.complex64), 8), TypeError, ["rewards", "complex64"]),
    (lambda r: group_advantages(r.tolist(), 8), TypeError, ["rewards", "Tensor", "list"]),
])
def test_bad_inputs(call, error, words):
    rewards = torch.randn(32)
    with pytest.raises(error) as info:
        call(rewards)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# --------------------------------------------------------------------------- torch integration

@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    rewards = sample_inputs(device, torch.float32, n=48)
    offsets = torch.tensor([0, 5, 5, 20, 48], device=device)
    op = torch.ops.grpo_fast.group_advantages.default
    for args in [(rewards, 8, None, "grpo", "group", 1e-4),
                 (rewards.double(), 6, None, "rloo", "batch", 0.0),
                 (rewards, None, offsets, "grpo", "none", 1e-4),
                 (rewards, None, offsets, "grpo", "batch", 1e-4)]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(rewards):
        return group_advantages(rewards * 2.0, 4, scale="batch") + 1.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    rewards = sample_inputs(device, torch.float32, n=48)
    torch.testing.assert_close(compiled(rewards), step(rewards))


def test_has_cuda_is_a_bool():
    assert isinstance(_C.has_cuda(), bool)


def test_default_scale_follows_the_estimator():
    """scale=None: grpo divides by the group std, rloo is plain leave-one-out (docs/design.md)."""
    r = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])
    loo = group_advantages(r, 3, estimator="rloo")
    want = [1.0 - 3.0, 2.0 - 2.5, 4.0 - 1.5, 0.0 - 1.5, 0.0 - 1.5, 3.0 - 0.0]
    assert torch.allclose(loo, torch.tensor(want))
    assert torch.equal(group_advantages(r, 3), group_advantages(r, 3, scale="group"))
    assert torch.equal(loo, group_advantages(r, 3, estimator="rloo", scale="none"))
