"""The policy's forward passes as the algorithms use them.

Position convention (every trainer, the critic and the reference): entry t of a completion's
logits / hidden states / values belongs to the state before completion token t, i.e. the
position that predicts token t. Only those positions are computed: the prompt's logits are
never made.

`Policy` is the one place where a forward becomes log-probs or a loss: through the fused LM head
(hidden states, no logits) when the model allows it (model/fused_head.py), else from the logits,
whose gradient is then written into the logits tensor itself. The reference model (the KL
penalty) goes through the same plumbing.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..ops import policy_loss, policy_loss_from_hidden, selective_log_softmax, selective_log_softmax_from_hidden
from ..ops.options import LossOptions
from .fused_head import FusedHead
from .policy import is_peft, unwrap
from .precision import Precision

__all__ = ["Policy", "forward_hidden", "forward_logits"]


def forward_logits(model, batch, rows=slice(None), *, index_logits_to_keep: Optional[bool] = True) -> torch.Tensor:
    """Logits of the completion tokens only: (n, T, V); the prompt's logits are never made.

    index_logits_to_keep: accepts_index_logits_to_keep(model), decided once at set-up.
    """
    input_ids, attention_mask, position_ids = batch.model_inputs(rows)        # (n, P + T) each
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if index_logits_to_keep:
        # the positions P-1 .. P+T-2, the ones that predict the completion: the same numbers as
        # TRL's "T + 1, drop the last", but no wasted row, and the logits come out contiguous
        keep = torch.arange(P - 1, P + T - 1, device=input_ids.device)
        return model(**kw, logits_to_keep=keep).logits                        # (n, T, V)
    if index_logits_to_keep is False:
        return model(**kw, logits_to_keep=T + 1).logits[:, :-1]                # (n, T, V)
    return model(**kw).logits[:, P - 1:P + T - 1]                              # (n, T, V)


def forward_hidden(model, batch, rows=slice(None), *, logits: bool = True):
    """(logits (n, T, V) or None, last hidden states (n, T, H)) of the completion positions, one forward."""
    input_ids, attention_mask, position_ids = batch.model_inputs(rows)
    T = batch.completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=T + 1, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -(T + 1):-1]                             # (n, T, H)
    return (out.logits[:, :-1] if logits else None), hidden


class Policy:
    """The policy module, its tokenizer, the module gradient-carrying forwards go through (`wrapped`:
    DDP / FSDP2, set by the algorithm), its fused head, and the reference model.

    `module` arguments below are the policy (or its wrapper) or the reference model.
    """

    def __init__(self, model, tokenizer, *, temperature: float, fused_head: Optional[FusedHead] = None,
                 index_logits_to_keep: Optional[bool] = True, precision: Optional[Precision] = None):
        self.model, self.tokenizer = model, tokenizer
        self.precision = precision or Precision()   # bf16 / fp16: autocast of every trainer forward
        self.wrapped = model
        self.temperature = float(temperature)
        self.fused_head = fused_head
        self.index_logits_to_keep = index_logits_to_keep
        self.ref_model = None            # a separate frozen reference, when there is one
        self.ref_fused_head: Optional[FusedHead] = None

    def autocast(self):
        """The mixed-precision context of the trainer's forwards (model/precision.py): the loop
        enters it around the algorithm's prepare and update, so the policy, the reference, the
        critic and TRPO's forwards all run under it."""
        return self.precision.autocast()

    # ------------------------------------------------------------------ which head
    def head_for(self, module) -> Optional[FusedHead]:
        """The FusedHead of `module` (the policy, its wrapper, or the reference), or None."""
        if self.fused_head is not None and unwrap(module) is unwrap(self.model):
            return self.fused_head
        if self.ref_fused_head is not None and module is self.ref_model:
            return self.ref_fused_head
        return None

    # ------------------------------------------------------------------ forwards
    def logits(self, module, batch, rows=slice(None)) -> torch.Tensor:
        """(n, T, V) logits of the completion positions."""
        return forward_logits(module, batch, rows, index_logits_to_keep=self.index_logits_to_keep)

    def features(self, module, batch, rows=slice(None)) -> torch.Tensor:
        """What `module`'s loss starts from: the last hidden states (n, T, H) with a fused head,
        else the completion logits (n, T, V)."""
        head = self.head_for(module)
        return head.hidden(module, batch, rows) if head is not None else self.logits(module, batch, rows)

    def logps_from(self, module, features: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """(n, T) float32 log-probs at the sampling temperature from features(module, ...)."""
        head = self.head_for(module)
        with self.precision.outside():
            if head is not None:
                hidden, args = self.precision.for_loss(features, head.head_args(module))
                return selective_log_softmax_from_hidden(hidden, token_ids=token_ids, temperature=self.temperature,
                                                         **args)
            return selective_log_softmax(features, token_ids, self.temperature)

    def token_logps(self, module, batch, rows=slice(None)) -> torch.Tensor:
        """(n, T) float32 log-probs of the completion tokens under `module`."""
        return self.logps_from(module, self.features(module, batch, rows), batch.completion_ids[rows])

    def loss(self, module, batch, rows, advantages, mask, options: LossOptions, *, old_logps=None, ref_logps=None,
             features: Optional[torch.Tensor] = None):
        """grpo_fast.ops.policy_loss of `module` on rows of the batch (`features` when the caller
        has them already); the logits path writes the gradient into the logits (inplace_grad)."""
        ids = batch.completion_ids[rows]
        if features is None:
            features = self.features(module, batch, rows)                      # (n, T, H) or (n, T, V)
        head = self.head_for(module)
        kw = dict(advantages=advantages, mask=mask, old_logps=old_logps, ref_logps=ref_logps, options=options)
        with self.precision.outside():
            if head is not None:
                hidden, args = self.precision.for_loss(features, head.head_args(module))
                return policy_loss_from_hidden(hidden, token_ids=ids, **args, **kw)
            return policy_loss(features, ids, inplace_grad=True, **kw)

    # ------------------------------------------------------------------ rollout-time log-probs
    @torch.no_grad()
    def rollout_logps(self, module, batch, micro_batch: int) -> torch.Tensor:
        """(N, T) log-probs of the whole batch under `module` in eval mode, micro-batched."""
        was = module.training
        module.eval()
        try:
            return torch.cat([self.token_logps(module, batch, slice(s, s + micro_batch))
                              for s in range(0, len(batch), micro_batch)])
        finally:
            module.train(was)

    def reference_context(self):
        """Where the policy module acts as the reference: a PEFT policy with its adapter disabled."""
        if self.ref_model is None and is_peft(self.model):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def reference_logps(self, batch, micro_batch: int) -> torch.Tensor:
        """(N, T) log-probs under the reference (the frozen copy, or the PEFT base model)."""
        with self.reference_context():
            return self.rollout_logps(self.ref_model if self.ref_model is not None else self.model, batch,
                                      micro_batch)
