"""Triton kernels of grpo_fast (installed as grpo_fast.kernels): pure functions
over tensors, no autograd, no policy.

    token_logprobs_forward(logits, token_ids, temperature, with_entropy) -> (logp, lse, entropy)
    token_logprobs_backward(logits, token_ids, lse, entropy, grad_logp, grad_entropy,
                            temperature, out) -> out
    linear_logprobs_forward(hidden, weight, bias, token_ids, temperature, logit_scale,
                            softcap, with_entropy) -> (logp, lse, entropy)   fused LM head
    linear_logprobs_backward(hidden, weight, bias, token_ids, lse, entropy, grad_logp,
                             grad_entropy, temperature, logit_scale, softcap, need_hidden,
                             need_weight, need_bias) -> (grad_hidden, grad_weight, grad_bias)

Importing this package imports triton and defines the kernels; it queries no
device and compiles nothing (compilation happens on the first launch). On CPU
tensors the kernels run only under TRITON_INTERPRET=1, set before triton is
first imported.
"""
from ._common import LaunchConfig, LinearLaunchConfig, launch_config, linear_launch_config
from .linear_logprobs import linear_logprobs_backward, linear_logprobs_forward
from .token_logprobs import token_logprobs_backward, token_logprobs_forward

__all__ = ["token_logprobs_forward", "token_logprobs_backward", "linear_logprobs_forward",
           "linear_logprobs_backward", "launch_config", "LaunchConfig", "linear_launch_config",
           "LinearLaunchConfig"]
