"""Shared helpers of the benchmarks: peak-memory measurement and device facts."""
from __future__ import annotations

import gc
import os
import platform
import re
from contextlib import contextmanager

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        cpu = m.group(1).strip() if m else platform.processor()
    except OSError:
        cpu = platform.processor()
    return f"{cpu} ({torch.get_num_threads()} threads)"


def _rss_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def peak_extra_memory(device: str, result: dict):
    """result["peak_extra_bytes"] = peak memory during the block minus memory at its start.

    CUDA: torch's allocator statistics (exact). CPU: the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs), which also counts allocator slack:
    an upper bound on what torch allocated.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        result["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - start
    else:
        start = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        yield
        result["peak_extra_bytes"] = max(0, _rss_hwm_bytes() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def env_summary() -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    for name in ("liger_kernel", "trl", "transformers"):
        try:
            from importlib.metadata import version

            info[name] = version(name.replace("_", "-"))
        except Exception:
            pass
    info["GRPO_FAST_BACKEND"] = os.environ.get("GRPO_FAST_BACKEND", "auto")
    return info
