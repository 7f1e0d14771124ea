"""The ops layer: logits (or hidden states) -> per-token log-probs and policy losses, and the
C++ advantage estimators. Pure functions over tensors; nothing here knows about models,
rollouts or trainers.

    functional.py   selective_log_softmax, policy_loss (validation, then the two phases)
    _ops.py         the torch custom ops (grpo_fast::token_logprobs and its backward) and autograd
    _torch_path.py  the pure-PyTorch implementation of phase 1 (CPU, and the oracle in tests)
    fused_head.py   selective_log_softmax_from_hidden, policy_loss_from_hidden (the fused LM head:
                    hidden states -> log-probs / loss with no logits); ops in _fused_ops.py,
                    PyTorch tile path in _torch_fused.py
    _backend.py     which implementation runs: Triton kernels or the PyTorch path
    options.py      LossOptions, the non-tensor options of policy_loss, validated once
    advantages.py   group_advantages and gae over the C++ core (grpo_fast._C)

Below it: grpo_fast.kernels (Triton) and grpo_fast._C (C++). Above it: grpo_fast.rl (tensor-only
RL maths) and grpo_fast.trainer.
"""
from .advantages import gae, group_advantages
from .functional import PolicyLossOutput, policy_loss, selective_log_softmax
from .fused_head import policy_loss_from_hidden, selective_log_softmax_from_hidden
from .options import LossOptions

__all__ = ["LossOptions", "PolicyLossOutput", "gae", "group_advantages", "policy_loss", "policy_loss_from_hidden",
           "selective_log_softmax", "selective_log_softmax_from_hidden"]
