import importlib.util
import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. This must be set
# before triton is first imported, which no test module does at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def devices():
    """The devices the thin per-device test wrappers run on."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# The Triton backend runs wherever triton is installed. Whether the kernels import is not asked here:
# on a machine with triton, kernels that fail to import must fail their tests, not skip them.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def backends():
    """The loss backends the backend-parametrised tests run: torch, and triton when installed."""
    return ["torch"] + (["triton"] if TRITON_INSTALLED else [])


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Every test starts from the same global RNG state, so what a test draws without its own
    generator does not depend on which tests ran before it (no order-dependent flakes)."""
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread for the whole session: the models and tensors here are tiny, and on a
    shared 2-core machine two spinning OpenMP threads per process make the trainer tests ~10x
    slower (building the demo model: 5.5 s with one thread, 59 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_parts():
    """The built-in task's tokenizer, warmed-up tiny Llama and data, built once per session.
    Tests must not change them: take copy.deepcopy(parts["model"])."""
    from grpo_fast import demo

    return demo.build_demo(0, verbose=False)
