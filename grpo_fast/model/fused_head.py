"""The fused LM head: the policy's head used by grpo_fast.ops' fused op instead of the model
computing logits. `fused_head_for(model)` decides once, at set-up, whether it can replace the
model's logits (a plain Linear head, a known logit transform, checked against the model's own
logits on a short input), and says why not when it cannot.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .policy import is_peft, unwrap

__all__ = ["FusedHead", "fused_head_for"]


# ----------------------------------------------------------------------------- the fused LM head
# config attribute -> how it turns the head's output into the logits the model returns
_SCALE_ATTRS = (("logit_scale", lambda v: float(v)),             # Cohere: logits * logit_scale
                ("logits_scaling", lambda v: 1.0 / float(v)),    # Granite: logits / logits_scaling
                ("lm_head_multiplier", lambda v: float(v)))      # Falcon-H1: logits * multiplier
_SOFTCAP_ATTRS = ("final_logit_softcapping",)                    # Gemma 2 / 3: c * tanh(logits / c)


def _text_config(model):
    cfg = getattr(unwrap(model), "config", None)
    return getattr(cfg, "text_config", None) or cfg


class FusedHead:
    """The policy's LM head, used by the fused op instead of the model computing logits.

    `hidden(model, batch, rows)` runs the model forward (through whatever wrapper it is given, so
    DDP's gradient hooks still see it) with a pre-hook on the head that captures its input, the
    completion positions' last hidden states (n, T, H), and hands the head an empty slice instead:
    the model computes no logits at all. `head_args(model)` gives the weight, bias, logit scale and
    soft-cap for grpo_fast.ops.policy_loss_from_hidden / selective_log_softmax_from_hidden.
    """

    def __init__(self, logit_scale: float = 1.0, softcap: Optional[float] = None,
                 index_logits_to_keep: Optional[bool] = True):
        self.logit_scale, self.softcap = logit_scale, softcap
        self.index_logits_to_keep = index_logits_to_keep

    @staticmethod
    def head_of(model) -> nn.Module:
        return unwrap(model).get_output_embeddings()

    def head_args(self, model) -> dict:
        head = self.head_of(model)
        return dict(weight=head.weight, bias=head.bias, logit_scale=self.logit_scale,
                    final_logit_softcapping=self.softcap)

    @contextlib.contextmanager
    def _capture(self, model, *, skip: bool = True):
        box = {}

        def pre_hook(module, args):
            box["hidden"] = args[0]
            if skip:  # the head computes on an empty slice: no logits are made
                return (args[0][..., :0, :],) + tuple(args[1:])
            return None

        handle = self.head_of(model).register_forward_pre_hook(pre_hook)
        try:
            yield box
        finally:
            handle.remove()

    def hidden(self, model, batch, rows=slice(None)) -> torch.Tensor:
        """The last hidden states (n, T, H) at the positions that predict the completion tokens."""
        input_ids, attention_mask, position_ids = batch.model_inputs(rows)
        P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        with self._capture(model) as box:
            if self.index_logits_to_keep:
                model(**kw, logits_to_keep=torch.arange(P - 1, P + T - 1, device=input_ids.device))
                return box["hidden"]                                           # (n, T, H)
            if self.index_logits_to_keep is False:
                model(**kw, logits_to_keep=T + 1)
                return box["hidden"][:, :-1]                                   # (n, T, H)
            model(**kw)
            return box["hidden"][:, P - 1:P + T - 1]                           # (n, T, H)

    @torch.no_grad()
    def reproduces_logits(self, model, input_ids: torch.Tensor) -> Optional[str]:
        """None when (h·Wᵀ + b)·scale, soft-capped, equals the model's own logits on `input_ids`
        (1, L); otherwise why not. Run once at set-up, in eval mode."""
        was = model.training
        model.eval()
        try:
            with self._capture(model, skip=False) as box:
                logits = model(input_ids=input_ids, use_cache=False).logits.float()
        finally:
            model.train(was)
        h = box.get("hidden")
        if h is None or h.shape[:-1] != logits.shape[:-1]:
            return "the head does not see the final hidden state of every position"
        args = self.head_args(model)
        z = torch.nn.functional.linear(h.float(), args["weight"].float(),
                                       None if args["bias"] is None else args["bias"].float()) * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        tol = (1e-4 if h.dtype == torch.float32 else 3e-2) * (1.0 + float(logits.abs().max()))
        err = float((z - logits).abs().max())
        if not err <= tol:
            return (f"its logits are not (hidden @ W.T + b) * scale, soft-capped (max difference {err:.3g} "
                    "on a check input): an unknown head transform")
        return None


def fused_head_for(model, *, dist=None, index_logits_to_keep: Optional[bool] = True,
                   check_ids: Optional[torch.Tensor] = None):
    """(FusedHead, None) when the fused LM head can replace the model's logits, else (None, why not)."""
    base = unwrap(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None, "the model has no output embeddings (get_output_embeddings() is None)"
    if is_peft(model) and type(head) is not nn.Linear:
        return None, "a PEFT adapter sits on lm_head"
    if type(head) is not nn.Linear:
        return None, f"its head is a {type(head).__name__}, not a plain nn.Linear"
    if dist is not None and dist.enabled and dist.mode == "fsdp2":
        return None, "FSDP2 shards the head (the fused op needs the whole weight)"
    cfg = _text_config(model)
    scale = 1.0
    for attr, to_scale in _SCALE_ATTRS:
        v = getattr(cfg, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            scale *= to_scale(v)
    softcap = None
    for attr in _SOFTCAP_ATTRS:
        v = getattr(cfg, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            softcap = float(v)
    fused = FusedHead(scale, softcap, index_logits_to_keep)
    if check_ids is not None:
        why = fused.reproduces_logits(model, check_ids)
        if why is not None:
            return None, why
    return fused, None
