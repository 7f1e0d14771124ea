"""Which implementation runs an op: Triton kernels, or the pure-PyTorch path.

GRPO_FAST_BACKEND = auto (default) | torch | triton
  auto:   Triton kernels for CUDA tensors when triton imports, else PyTorch.
  torch:  the PyTorch path everywhere.
  triton: the Triton kernels even for CPU tensors (runs only under
          TRITON_INTERPRET=1: that is how CI tests the kernels).
Read on every call (cheap), so tests can switch it with monkeypatch.
"""
from __future__ import annotations

import functools
import os

_CHOICES = ("auto", "torch", "triton")


def backend_setting() -> str:
    value = os.environ.get("GRPO_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"GRPO_FAST_BACKEND={value!r}: expected one of {', '.join(_CHOICES)}")
    return value


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(tensor) -> bool:
    """True when the op on `tensor` should run the Triton kernels."""
    setting = backend_setting()
    if setting == "torch":
        return False
    if setting == "triton":
        if not triton_available():
            raise RuntimeError("GRPO_FAST_BACKEND=triton but triton is not importable")
        return True
    return tensor.is_cuda and triton_available()
