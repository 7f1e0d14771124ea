"""gae (C++ core) against a plain-Python loop written from the formula."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import devices
from grpo_fast.ops.advantages import gae


def reference(rewards, values, mask, gamma, lam):
    """Per sequence, over the masked-in tokens from last to first; float64 lists."""
    adv = [[0.0] * len(row) for row in rewards]
    ret = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(len(rewards[b]))):
            if not mask[b][t]:
                continue
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            next_adv = delta + gamma * lam * next_adv
            adv[b][t] = next_adv
            ret[b][t] = next_adv + values[b][t]
            next_value = values[b][t]
    return adv, ret


def sample_inputs(device, dtype, batch=5, length=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = max(batch, 5)
    rewards = torch.randn(rows, length, generator=g, dtype=torch.float64)
    values = torch.randn(rows, length, generator=g, dtype=torch.float64)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    mask[0, :length * 3 // 4] = True       # right padding
    mask[1, length // 4:] = True           # left padding
    mask[2, 3:length // 2] = True          # both
    mask[2, 8:11] = False                  # a hole (e.g. tool output)
    mask[3] = True                         # full
    # row 4: empty sequence; further rows: random
    mask[5:] = torch.rand(rows - 5, length, generator=g) < 0.7
    return (rewards[:batch].to(dtype).to(device), values[:batch].to(dtype).to(device),
            mask[:batch].to(device))


def _check(rewards, values, mask, gamma, lam):
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = reference(rewards.double().tolist(), values.double().tolist(),
                                 (mask != 0).tolist(), gamma, lam)
    for got, expected in ((adv, exp_adv), (ret, exp_ret)):
        assert got.dtype == rewards.dtype and got.shape == rewards.shape
        assert got.device == rewards.device
        tol = 1e-12 if rewards.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got.cpu().double(), torch.tensor(expected, dtype=torch.float64).reshape(got.shape),
                                   rtol=tol, atol=tol)
    off = (mask == 0).cpu()
    assert (adv.cpu()[off] == 0).all() and (ret.cpu()[off] == 0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.0, 0.5), (1.0, 1.0), (0.9, 0.0)])
def test_matches_reference(device, dtype, gamma, lam):
    _check(*sample_inputs(device, dtype), gamma, lam)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int32, torch.int64, torch.float32,
                                        torch.float64, torch.int16, torch.bfloat16])
def test_mask_dtypes(device, mask_dtype):
    rewards, values, mask = sample_inputs(device, torch.float32)
    _check(rewards, values, mask.to(mask_dtype), 0.99, 0.95)
    expected = gae(rewards, values, mask)
    got = gae(rewards, values, mask.to(mask_dtype))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("device", devices())
def test_padding_does_not_change_a_sequence(device):
    """The same tokens give the same numbers whether padded left, right, or not at all."""
    rewards, values, _ = sample_inputs(device, torch.float64, batch=1, length=12)
    full = gae(rewards, values, torch.ones_like(rewards, dtype=torch.bool))
    pad = torch.zeros(1, 5, dtype=torch.float64, device=device)
    ones, zeros = torch.ones(1, 12, dtype=torch.bool, device=device), pad.bool()
    right = gae(torch.cat([rewards, pad], 1), torch.cat([values, pad + 7], 1),
                torch.cat([ones, zeros], 1))
    left = gae(torch.cat([pad, rewards], 1), torch.cat([pad - 3, values], 1),
               torch.cat([zeros, ones], 1))
    for a, r, l in zip(full, right, left):
        assert torch.equal(r[:, :12], a) and torch.equal(l[:, 5:], a)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(0, 4), length=st.integers(0, 9), seed=st.integers(0, 2**31),
       gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_random_masks(batch, length, seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, length, generator=g, dtype=torch.float64)
    values = torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=g) < 0.6
    _check(rewards, values, mask, gamma, lam)


def test_large_input_uses_threads():
    rewards, values, mask = sample_inputs("cpu", torch.float32, batch=512, length=129)
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    for i in (0, 1, 2, 4, 511):
        a, r = gae(rewards[i:i + 1], values[i:i + 1], mask[i:i + 1], 0.99, 0.95)
        assert torch.equal(adv[i:i + 1], a) and torch.equal(ret[i:i + 1], r)


def test_non_contiguous_inputs():
    rewards, values, mask = sample_inputs("cpu", torch.float64, length=40)
    got = gae(rewards[:, ::2], values[:, ::2], mask[:, ::2])
    expected = gae(rewards[:, ::2].contiguous(), values[:, ::2].contiguous(),
                   mask[:, ::2].contiguous())
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


_r = torch.zeros(2, 3)


@pytest.mark.parametrize("args, kwargs, error, words", [
    ((_r[0], _r[0], _r[0].bool()), {}, ValueError, ["rewards", "2-D", "(3,)"]),
    ((_r, torch.zeros(2, 4), _r.bool()), {}, ValueError, ["values", "(2, 3)", "(2, 4)"]),
    ((_r, _r, torch.ones(3, 2, dtype=torch.bool)), {}, ValueError, ["mask", "(2, 3)", "(3, 2)"]),
    ((_r, _r.double(), _r.bool()), {}, TypeError, ["values", "float32", "float64"]),
    ((_r.long(), _r, _r.bool()), {}, TypeError, ["rewards", "float32 or float64", "int64"]),
    ((_r.half(), _r.half(), _r.bool()), {}, TypeError, ["rewards", "float16"]),
    ((_r, _r, _r.bool()), {"gamma": 1.5}, ValueError, ["gamma", "[0, 1]", "1.5"]),
    ((_r, _r, _r.bool()), {"lam": -0.1}, ValueError, ["lam", "[0, 1]", "-0.1"]),
    ((_r, _r, _r.bool()), {"lam": "0.9"}, TypeError, ["lam", "str"]),
    ((_r, _r, [[1, 1, 1]] * 2), {}, TypeError, ["mask", "Tensor", "list"]),
    ((_r, _r, _r.to(torch.complex64)), {}, TypeError, ["mask", "complex64"]),
])
def test_bad_inputs(args, kwargs, error, words):
    with pytest.raises(error) as info:
        gae(*args, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    rewards, values, mask = sample_inputs(device, torch.float32, batch=3, length=11)
    op = torch.ops.grpo_fast.gae.default
    torch.library.opcheck(op, (rewards, values, mask, 0.99, 0.95))
    torch.library.opcheck(op, (rewards.double(), values.double(), mask.long(), 1.0, 0.9))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(rewards, values, mask):
        adv, ret = gae(rewards, values, mask, 0.99, 0.95)
        return adv * 2.0, ret - values

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = sample_inputs(device, torch.float32, batch=3, length=11)
    for got, expected in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, expected)
