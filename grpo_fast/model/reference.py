"""The reference model of the KL penalty, and the fused head of each model that has one.

The reference is a frozen copy of the policy (or the user's reference: a model, a local path or a hub id);
with a PEFT policy there is no copy: the reference is the base model with the adapter disabled
(Policy.reference_context).
"""
from __future__ import annotations

import copy
import os
from typing import Optional

from .forward import Policy
from .fused_head import FusedHead, fused_head_for
from .policy import is_peft, load_policy

__all__ = ["attach_reference", "checked_fused_head"]


def checked_fused_head(model, *, name: str, dist, index_logits_to_keep, check_ids, say=print) -> Optional[FusedHead]:
    """The model's FusedHead when it reproduces the model's logits on `check_ids`, else None after
    saying why (on the main process) through `say`."""
    head, why = fused_head_for(model, dist=dist, index_logits_to_keep=index_logits_to_keep, check_ids=check_ids)
    if head is None and dist.is_main:
        say(f"[grpo_fast] fused_lm_head: the {name} computes logits instead: {why}")
    return head


def attach_reference(policy: Policy, ref_model=None, *, dtype: str, device, fused: bool, dist, check_ids) -> None:
    """Give `policy` its reference (policy.ref_model, and its fused head when `fused`); nothing
    under PEFT, where the base model with the adapter disabled is the reference."""
    if is_peft(policy.model):
        return
    ref = ref_model if ref_model is not None else copy.deepcopy(policy.model)
    if isinstance(ref, (str, os.PathLike)):
        ref, _ = load_policy(ref, policy.tokenizer, dtype=dtype)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    policy.ref_model = ref.to(device)
    if fused:
        policy.ref_fused_head = checked_fused_head(policy.ref_model, name="reference model", dist=dist,
                                                   index_logits_to_keep=policy.index_logits_to_keep,
                                                   check_ids=check_ids)
