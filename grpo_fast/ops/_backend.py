"""Which implementation runs an op: Triton kernels, or the pure-PyTorch path.

GRPO_FAST_BACKEND = auto (default) | torch | triton
  auto:   Triton kernels for CUDA tensors when they import, else PyTorch.
  torch:  the PyTorch path everywhere.
  triton: the Triton kernels even for CPU tensors (runs only under
          TRITON_INTERPRET=1: that is how CI tests the kernels).
Read on every call (cheap), so tests can switch it with monkeypatch.

Triton not installed is quiet (CPU machines, the PyTorch path is the plan). Triton installed but
the kernels failing to import (a version mismatch, a broken install) is not: on CUDA tensors the
first op warns once naming the import error before it takes the slow PyTorch path, and
GRPO_FAST_BACKEND=triton raises it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from typing import Optional

_CHOICES = ("auto", "torch", "triton")


def backend_setting() -> str:
    value = os.environ.get("GRPO_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"GRPO_FAST_BACKEND={value!r}: expected one of {', '.join(_CHOICES)}")
    return value


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def kernels_import_error() -> Optional[BaseException]:
    """None when grpo_fast.kernels (and so triton) imports, else the exception it raised."""
    try:
        importlib.import_module("grpo_fast.kernels")
    except Exception as e:  # noqa: BLE001 - any failure of an installed triton is reported, not hidden
        return e
    return None


def triton_available() -> bool:
    return kernels_import_error() is None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@functools.lru_cache(maxsize=None)
def _warn_fallback_once() -> None:
    warnings.warn("triton is installed but grpo_fast's Triton kernels failed to import "
                  f"({_describe(kernels_import_error())}); CUDA tensors take the much slower PyTorch path "
                  "(GRPO_FAST_BACKEND=torch silences this, a working triton removes it)", RuntimeWarning, stacklevel=4)


def use_triton(tensor) -> bool:
    """True when the op on `tensor` should run the Triton kernels."""
    setting = backend_setting()
    if setting == "torch":
        return False
    if setting == "triton":
        if not triton_available():
            err = kernels_import_error()
            raise RuntimeError(f"GRPO_FAST_BACKEND=triton but the Triton kernels do not import ({_describe(err)})") \
                from err
        return True
    if not tensor.is_cuda:
        return False
    if triton_available():
        return True
    if triton_installed():
        _warn_fallback_once()
    return False
