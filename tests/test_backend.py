"""Backend choice: a triton that is installed but whose kernels fail to import is reported (a warning
once, naming the import error, on CUDA tensors; an error under GRPO_FAST_BACKEND=triton), never a
silent fall-back to the slow PyTorch path; triton not installed at all stays quiet."""
import sys
import types
import warnings

import pytest

from grpo_fast.ops import _backend

CUDA_TENSOR = types.SimpleNamespace(is_cuda=True)     # use_triton reads only .is_cuda
CPU_TENSOR = types.SimpleNamespace(is_cuda=False)


@pytest.fixture
def fresh(monkeypatch):
    """The backend's cached answers cleared before and after (they are computed once per process)."""
    cached = (_backend.triton_installed, _backend.kernels_import_error, _backend._warn_fallback_once)

    def clear():
        for f in cached:
            f.cache_clear()
    clear()
    monkeypatch.setenv("GRPO_FAST_BACKEND", "auto")
    yield monkeypatch
    clear()


def test_broken_kernels_warn_once_naming_the_error(fresh):
    fresh.setitem(sys.modules, "grpo_fast.kernels", None)          # importing it now raises ImportError
    fresh.setattr(_backend, "triton_installed", lambda: True)
    with pytest.warns(RuntimeWarning, match=r"Triton kernels failed to import \((ModuleNotFound|Import)Error: "
                                            r".*grpo_fast.kernels.*slower PyTorch path"):
        assert _backend.use_triton(CUDA_TENSOR) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_triton(CUDA_TENSOR) is False          # once, not on every op
        assert _backend.use_triton(CPU_TENSOR) is False
    fresh.setenv("GRPO_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"GRPO_FAST_BACKEND=triton but the Triton kernels do not import "
                                           r"\((ModuleNotFound|Import)Error"):
        _backend.use_triton(CPU_TENSOR)


def test_triton_not_installed_is_quiet(fresh):
    fresh.setitem(sys.modules, "grpo_fast.kernels", None)
    fresh.setattr(_backend, "triton_installed", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_triton(CUDA_TENSOR) is False


def test_working_kernels_are_used_on_cuda(fresh):
    if not _backend.triton_installed():
        pytest.skip("triton is not installed")
    assert _backend.kernels_import_error() is None                  # installed: the kernels must import
    assert _backend.use_triton(CUDA_TENSOR) is True and _backend.use_triton(CPU_TENSOR) is False
