"""The rollout data model: what one step observed.

A sample is a token sequence: its prompt, then everything after it, which is one span the policy
sampled (single turn) or several, with tokens the policy did not sample in between (tool or
environment output, in a multi-turn rollout). Per token after the prompt:

    completion_ids         the token
    completion_attention   1 on every real token, 0 on padding (the attention / padding layout)
    sampled_mask           1 where the policy sampled the token
    sampling_logps         the engine's log-prob where the policy sampled it, NaN elsewhere
    policy_versions        the weights version that sampled the token, -1 elsewhere (asynchronous rollouts)
    loss_mask              1 on the sampled tokens the loss trains on (set once rewards are known)

and per sample: the prompt and completion (text or messages), the dataset row, its columns, the
group id (samples with one id share a prompt draw), the finish reason, the rewards.

The layout here is the padded one: prompts left-padded to P columns, completions right-padded to
T, so column P + t of every row predicts completion token t. It is a layout decision, not a
property of the data: the masks say which tokens are real, which were sampled and which train.
Nothing assumes one contiguous sampled span: the reward sits at the last token with loss_mask 1,
and the importance-sampling correction covers sampled tokens only.

A Rollout is written in stages and never changed afterwards (`with_fields` makes a new one): the
samples, then the rewards and the loss mask, then what the algorithm derives (advantages, old /
reference log-probs, importance weights). Metrics read the sampled fields, so they describe what
was sampled, not what the loss kept.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .engine import left_pad, right_pad

__all__ = ["Rollout", "Sample", "collate", "concat_rollouts"]


@dataclass
class Sample:
    """One sample as a producer builds it, on the host, before collation."""

    prompt_ids: List[int]
    completion_ids: List[int]                 # every token after the prompt, in order
    sampled: List[int]                        # 1 where the policy sampled the token
    logprobs: Optional[List[float]] = None    # the engine's log-prob per completion token, NaN where not sampled
    policy_versions: Optional[List[int]] = None  # the weights version per completion token, -1 where not sampled
    finish_reason: str = "stop"               # "stop" | "length" (the last engine call's)
    completion: Any = None                    # the decoded completion: text, or the messages after the prompt


@dataclass(frozen=True)
class Rollout:
    """One step's samples in the padded layout. N samples, P prompt columns, T completion columns."""

    prompts: List[Any]                 # (N,) raw prompts (text or chat messages), each repeated per sample
    completions: List[Any]             # (N,) decoded completions (text, or the messages after the prompt)
    dataset_index: List[int]           # (N,) row of the dataset each sample came from
    columns: Dict[str, List[Any]]      # other dataset columns, aligned with the samples
    prompt_ids: torch.Tensor           # (N, P) left-padded
    prompt_attention: torch.Tensor     # (N, P) 1 on prompt tokens
    completion_ids: torch.Tensor       # (N, T) right-padded
    completion_attention: torch.Tensor  # (N, T) 1 on every real token after the prompt
    sampled_mask: torch.Tensor         # (N, T) 1 where the policy sampled the token
    finish_reasons: List[str]          # (N,) "stop" | "length"
    group_ids: torch.Tensor            # (N,) long: samples with one id share a prompt draw
    group_size: int = 1                # every group has this many samples, consecutive
    completion_ids_list: Optional[List[List[int]]] = None  # (N,) each sample's tokens after the prompt
    sampling_logps: Optional[torch.Tensor] = None     # (N, T) float32 engine log-probs, NaN where not sampled
    policy_versions: Optional[torch.Tensor] = None    # (N, T) long weights version per sampled token, -1 elsewhere
    rewards: Optional[torch.Tensor] = None            # (N,) float32, NaN = no reward
    rewards_per_func: Optional[torch.Tensor] = None   # (N, F)
    loss_mask: Optional[torch.Tensor] = None          # (N, T) sampled_mask of the samples that train
    advantages: Optional[torch.Tensor] = None         # (N,) or (N, T)
    old_logps: Optional[torch.Tensor] = None          # (N, T)
    importance_weights: Optional[torch.Tensor] = None  # (N, T) or (N, 1) engine-mismatch IS weights (vLLM)
    ref_logps: Optional[torch.Tensor] = None          # (N, T)
    sample_stats: Optional[Dict[str, List[float]]] = None  # per-sample counts a producer reports (multi-turn:
    #                                                    tool_calls, tool_failures, turns, tool_seconds)
    extras: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def truncated(self) -> torch.Tensor:
        """(N,) bool: the sample ended at the token budget, not at a stop."""
        return torch.tensor([r == "length" for r in self.finish_reasons], device=self.completion_ids.device)

    def with_fields(self, **changes) -> "Rollout":
        for k in changes:
            if getattr(self, k) is not None and k not in ("extras",):
                raise AttributeError(f"Rollout.{k} is already set: a rollout's fields are written once")
        return dataclasses.replace(self, **changes)

    def trained(self, mask_truncated_completions: bool = False) -> torch.Tensor:
        """(N,) bool: the samples the loss keeps. The one rule for every algorithm: a sample without
        a reward (None / NaN from every reward function) is out of the loss, the KL, the entropy and
        the normalisers; so is a truncated one when mask_truncated_completions asks for it."""
        keep = ~torch.isnan(self.rewards).to(self.completion_ids.device)
        if mask_truncated_completions:
            keep = keep & ~self.truncated
        return keep

    def with_loss_mask(self, mask_truncated_completions: bool = False) -> "Rollout":
        """A new Rollout whose loss_mask is sampled_mask on the trained samples (see trained)."""
        keep = self.trained(mask_truncated_completions).to(self.sampled_mask.dtype)
        return self.with_fields(loss_mask=self.sampled_mask * keep[:, None])

    def last_sampled(self) -> torch.Tensor:
        """(N,) long: the column of each sample's last token with loss_mask 1 (-1 when none), where
        a sequence reward sits."""
        m = self.loss_mask != 0
        T = m.shape[1]
        col = torch.arange(T, device=m.device).expand_as(m)
        return torch.where(m, col, -1).amax(1)

    def select(self, rows: List[int]) -> "Rollout":
        """A new Rollout of the given rows (in that order); every per-sample field follows them.
        Tensors keep their widths (P, T) and extras are dropped."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        changes: Dict[str, Any] = {"extras": {}}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("group_size", "extras") or v is None:
                continue
            if isinstance(v, torch.Tensor):
                changes[f.name] = v.index_select(0, idx.to(v.device))
            elif isinstance(v, dict):
                changes[f.name] = {k: [col[i] for i in rows] for k, col in v.items()}
            else:
                changes[f.name] = [v[i] for i in rows]
        return dataclasses.replace(self, **changes)

    def model_inputs(self, rows=slice(None)):
        """(input_ids, attention_mask, position_ids), each (n, P + T), of prompt + completion,
        with positions as generate() gives them under left padding."""
        input_ids = torch.cat([self.prompt_ids[rows], self.completion_ids[rows]], dim=1)
        attention_mask = torch.cat([self.prompt_attention[rows], self.completion_attention[rows]], dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return input_ids, attention_mask, position_ids


def collate(samples: Sequence[Sample], *, prompts: List[Any], dataset_index: List[int],
            columns: Dict[str, List[Any]], group_size: int, pad_token_id: int, device,
            first_group_id: int = 0, sample_stats: Optional[Dict[str, List[float]]] = None) -> Rollout:
    """The padded layout of `samples` (consecutive groups of `group_size`)."""
    p_ids, p_attn = left_pad([s.prompt_ids for s in samples], pad_token_id, device)      # (N, P)
    ids_list = [list(s.completion_ids) for s in samples]
    c_ids = right_pad(ids_list, pad_token_id, device=device)                             # (N, T)
    T = c_ids.shape[1]
    attention = right_pad([[1] * len(c) for c in ids_list], 0, dtype=p_attn.dtype, device=device, width=T)
    if all(all(s.sampled) for s in samples):  # single turn: every real token was sampled
        sampled = attention
    else:
        sampled = right_pad([s.sampled for s in samples], 0, dtype=p_attn.dtype, device=device, width=T)
    logps = None
    if samples and all(s.logprobs is not None for s in samples):
        logps = right_pad([s.logprobs for s in samples], math.nan, dtype=torch.float32, device=device, width=T)
    versions = None
    if samples and all(s.policy_versions is not None for s in samples):
        versions = right_pad([s.policy_versions for s in samples], -1, device=device, width=T)
    N = len(samples)
    group_ids = first_group_id + torch.arange(N, device=device) // group_size
    return Rollout(prompts=prompts, completions=[s.completion for s in samples], dataset_index=dataset_index,
                   columns=columns, prompt_ids=p_ids, prompt_attention=p_attn, completion_ids=c_ids,
                   completion_attention=attention, sampled_mask=sampled,
                   finish_reasons=[s.finish_reason for s in samples], group_ids=group_ids, group_size=group_size,
                   completion_ids_list=ids_list, sampling_logps=logps, policy_versions=versions,
                   sample_stats=sample_stats)


# how each (N, W) tensor field is padded to a common width when rollouts are concatenated:
# prompts on the left (left-padded), completions on the right; log-probs with NaN and versions
# with -1 (not sampled)
_LEFT = {"prompt_ids", "prompt_attention"}
_PAD_ID = {"prompt_ids", "completion_ids"}
_NAN = {"sampling_logps"}
_MINUS_ONE = {"policy_versions"}


def concat_rollouts(parts: List[Rollout], pad_token_id: int) -> Rollout:
    """One Rollout of the rows of `parts`, in order (e.g. the rounds of dynamic sampling).

    Prompt tensors are left-padded and completion tensors right-padded to the widest part (ids
    with pad_token_id, masks with 0, engine log-probs with NaN), so model_inputs gives each row
    the same tokens and positions as before; group ids stay distinct. Every part must have the
    same group_size and the same set of fields; extras are dropped.
    """
    if not parts:
        raise ValueError("concat_rollouts: no rollouts")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if any(p.group_size != first.group_size for p in parts):
        raise ValueError(f"concat_rollouts: group sizes differ: {[p.group_size for p in parts]}")
    changes: Dict[str, Any] = {"extras": {}}
    for f in dataclasses.fields(first):
        if f.name in ("group_size", "extras"):
            continue
        vals = [getattr(p, f.name) for p in parts]
        if all(v is None for v in vals):
            continue
        if any(v is None for v in vals):
            raise ValueError(f"concat_rollouts: Rollout.{f.name} is set in some parts only")
        if f.name == "group_ids":  # keep the parts' groups apart
            offset, shifted = 0, []
            for v in vals:
                shifted.append(v - v.min() + offset if v.numel() else v)
                offset += int(v.max() - v.min()) + 1 if v.numel() else 0
            vals = shifted
        if isinstance(vals[0], torch.Tensor):
            if vals[0].dim() >= 2:
                width = max(v.shape[1] for v in vals)
                fill = pad_token_id if f.name in _PAD_ID else (math.nan if f.name in _NAN else
                                                               -1 if f.name in _MINUS_ONE else 0)
                padded = []
                for v in vals:
                    extra = v.new_full((v.shape[0], width - v.shape[1]) + tuple(v.shape[2:]), fill)
                    padded.append(torch.cat([extra, v] if f.name in _LEFT else [v, extra], dim=1))
                vals = padded
            changes[f.name] = torch.cat(vals, dim=0)
        elif isinstance(vals[0], dict):
            if any(set(v) != set(vals[0]) for v in vals):
                raise ValueError(f"concat_rollouts: the parts' {f.name} have different keys")
            changes[f.name] = {k: [x for v in vals for x in v[k]] for k in vals[0]}
        else:
            changes[f.name] = [x for v in vals for x in v]
    return dataclasses.replace(first, **changes)
