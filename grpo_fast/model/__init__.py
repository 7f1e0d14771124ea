"""The models a run trains and consults.

    policy.py      loading the policy (a module, a local path or a hub id), its dtype, PEFT, dropout, wrappers
    hub.py         models and tokenizers by name, as transformers loads them (its cache, HF_HUB_OFFLINE)
    precision.py   mixed precision (bf16 / fp16 autocast) and the dtype an engine runs in
    forward.py     Policy: forwards, log-probs and the loss, through the fused head or the logits
    fused_head.py  the fused LM head and the check that it reproduces the model's logits
    reference.py   the frozen reference model of the KL penalty
    critic.py      the value model PPO and TRPO share, and its files
"""
from .critic import Critic, ValueHead, ValueModel
from .forward import Policy, forward_hidden, forward_logits
from .fused_head import FusedHead, fused_head_for
from .policy import accepts_index_logits_to_keep, is_peft, load_policy, prepare_policy, set_dropout_zero, unwrap
from .precision import Precision, autocast_dtype, engine_dtype
from .reference import attach_reference, checked_fused_head

__all__ = ["Critic", "FusedHead", "Policy", "Precision", "ValueHead", "ValueModel", "accepts_index_logits_to_keep",
           "attach_reference", "autocast_dtype", "checked_fused_head", "engine_dtype", "forward_hidden",
           "forward_logits", "fused_head_for", "is_peft", "load_policy", "prepare_policy", "set_dropout_zero", "unwrap"]
