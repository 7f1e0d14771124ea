"""Infinite rewards are found by the C++ pass that reads every reward (no separate torch pass, no
host read on CUDA): on CPU the launcher itself reports the first such index, threaded or not; on
CUDA the advantages the infinity touches come out non-finite, never a plausible number."""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from grpo_fast import _C
from grpo_fast.ops import advantages as adv_ops
from grpo_fast.ops.advantages import group_advantages


class TorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_no_torch_pass_over_the_rewards():
    rewards = torch.randn(1024)
    with TorchCalls() as calls:
        group_advantages(rewards, 8)
    assert not {"isinf", "isfinite", "any", "nonzero", "__bool__", "item"} & set(calls.names), calls.names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_the_launcher_names_the_first_infinite_reward(dtype, scale):
    r = torch.zeros(64, dtype=dtype)
    r[1::2] = 1.0
    r[40], r[21] = -math.inf, math.inf                        # the first one is at 21
    with pytest.raises(ValueError, match=r"rewards\[21\] = inf"):
        adv_ops._launch_group_advantages(r, 8, None, "grpo", scale, 1e-4)   # the C++ pass itself
    r[16] = math.inf                                          # the first member of its group (the shift)
    with pytest.raises(ValueError, match=r"rewards\[16\] = inf"):
        group_advantages(r, 8, scale=scale)
    offsets = torch.tensor([0, 3, 30, 64])
    with pytest.raises(ValueError, match=r"rewards\[16\]"):
        group_advantages(r, group_offsets=offsets, scale=scale)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_threaded_groups_report_the_first_index(scale):
    n = 1 << 17                                               # above the threading threshold
    r = torch.randn(n, generator=torch.Generator().manual_seed(0))
    r[[100_003, 7_777, 90_001]] = torch.tensor([math.inf, -math.inf, math.inf])
    with pytest.raises(ValueError, match=r"rewards\[7777\] = -inf"):
        group_advantages(r, 16, scale=scale)
    if _C.hardware_threads() > 1:
        assert _C.last_parallel_threads() > 1


def test_large_finite_rewards_are_not_called_infinite():
    r = torch.tensor([1e150, -1e150, 3e149, 0.0], dtype=torch.float64)
    out = group_advantages(r, 4)
    assert bool(torch.isfinite(out).all()) and out[0] > 0 > out[1]
    group_advantages(r * 1e50, 4)          # squares overflow (the careful loop runs): still not an infinite reward
    nan_group = torch.tensor([1.0, math.nan, 2.0, 3.0])
    assert group_advantages(nan_group, 4)[1] == 0                        # NaN is a missing reward, not an error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the kernels run on a GPU")
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_cuda_marks_the_group_non_finite_without_a_sync(scale):
    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0, math.inf, 0.0, 1.0, 5.0, 6.0, 5.0, 7.0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = group_advantages(r, 4, scale=scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = out.cpu()
    assert not bool(torch.isfinite(out[4:8]).any())                      # the group with the infinity
    if scale == "group":
        assert bool(torch.isfinite(out[:4]).all()) and bool(torch.isfinite(out[8:]).all())
    else:
        assert not bool(torch.isfinite(out[:4]).any())                   # the batch std is infinite
