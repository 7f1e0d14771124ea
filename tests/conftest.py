import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. This must be set
# before triton is first imported, which no test module does at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def devices():
    """The devices the thin per-device test wrappers run on."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Every test starts from the same global RNG state, so what a test draws without its own
    generator does not depend on which tests ran before it (no order-dependent flakes)."""
    torch.manual_seed(1234)
    yield
