"""Triton kernels of grpo_fast (installed as grpo_fast.kernels): pure functions
over tensors, no autograd, no policy.

    token_logprobs_forward(logits, token_ids, temperature, with_entropy) -> (logp, lse, entropy)
    token_logprobs_backward(logits, token_ids, lse, entropy, grad_logp, grad_entropy,
                            temperature, out) -> out

Importing this package imports triton and defines the kernels; it queries no
device and compiles nothing (compilation happens on the first launch). On CPU
tensors the kernels run only under TRITON_INTERPRET=1, set before triton is
first imported.
"""
from ._common import LaunchConfig, launch_config
from .token_logprobs import token_logprobs_backward, token_logprobs_forward

__all__ = ["token_logprobs_forward", "token_logprobs_backward", "launch_config", "LaunchConfig"]
