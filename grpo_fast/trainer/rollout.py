"""Rollout data: which prompts a step samples (PromptSampler) and what a step observed (Rollout).

A Rollout is filled in three stages and never changed afterwards: the engine's samples, then
the rewards, then what the algorithm derives from them (advantages, old / reference log-probs,
the loss mask). Derived masks are new fields, so the metrics of a step describe what was
sampled, not what the loss kept.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

__all__ = ["PromptSampler", "Rollout", "check_dataset", "concat_rollouts", "is_conversational"]


class PromptSampler:
    """Yields dataset indices, epoch after epoch, in an order that depends only on (seed, epoch).

    Its whole state is (epoch, position), so a resumed run continues with the same prompts.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size == 0:
            raise ValueError("train_dataset is empty")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def take(self, n: int) -> List[int]:
        out = []
        while len(out) < n:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._make_order()
            k = min(n - len(out), self.size - self.position)
            out.extend(self._order[self.position : self.position + k])
            self.position += k
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._make_order()


def is_conversational(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], dict)


def check_dataset(dataset, name: str = "train_dataset") -> Any:
    """Check every row once, at start: a non-empty "prompt", and the same columns in every row.

    A list of dicts or a datasets.Dataset (indexable, rows are dicts). Errors name the row.
    """
    if isinstance(dataset, dict):
        raise TypeError(f"{name}: expected a datasets.Dataset or a list of dicts, got a dict "
                        "(a DatasetDict? pick a split, e.g. dataset['train'])")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    columns = None
    for i in range(len(dataset)):
        row = dataset[i]
        if not isinstance(row, dict):
            raise TypeError(f"{name}[{i}]: expected a dict with a 'prompt', got {type(row).__name__}")
        if "prompt" not in row:
            raise ValueError(f"{name}[{i}] has no 'prompt' field (rows need a prompt: text or a list of "
                             f"chat messages); its fields: {sorted(row)}")
        p = row["prompt"]
        if p is None or (isinstance(p, (str, list, tuple)) and len(p) == 0):
            raise ValueError(f"{name}[{i}]: the prompt is empty")
        if not isinstance(p, (str, list, tuple)):
            raise TypeError(f"{name}[{i}]: the prompt must be text or a list of chat messages, "
                            f"got {type(p).__name__}")
        keys = set(row)
        if columns is None:
            columns = keys
        elif keys != columns:
            raise ValueError(f"{name}[{i}] has the fields {sorted(keys)}, but row 0 has {sorted(columns)}: "
                             "every row needs the same fields")
    return dataset


@dataclass(frozen=True)
class Rollout:
    """One step's samples. N = prompts * G completions, P = longest prompt, T = longest completion.

    Frozen: stages add fields with `with_fields` (dataclasses.replace), never overwrite them.
    """

    prompts: List[Any]                 # (N,) raw prompts (text or chat messages), each repeated G times
    completions: List[Any]             # (N,) decoded completions (text, or [assistant message])
    dataset_index: List[int]           # (N,) row of the dataset each sample came from
    columns: Dict[str, List[Any]]      # other dataset columns, aligned with the completions
    prompt_ids: torch.Tensor           # (N, P) left-padded
    prompt_mask: torch.Tensor          # (N, P)
    completion_ids: torch.Tensor       # (N, T) right-padded
    completion_mask: torch.Tensor      # (N, T) 1 up to and including the first EOS (as sampled)
    truncated: torch.Tensor            # (N,) bool: no EOS within max_completion_length
    group_size: int = 1
    completion_ids_list: Optional[List[List[int]]] = None  # (N,) each completion's ids, up to and including EOS
    engine_logps: Optional[torch.Tensor] = None       # (N, T) the engine's log-probs of the samples, if it gives them
    rewards: Optional[torch.Tensor] = None            # (N,) float32, NaN = no reward
    rewards_per_func: Optional[torch.Tensor] = None   # (N, F)
    advantages: Optional[torch.Tensor] = None         # (N,) or (N, T)
    loss_mask: Optional[torch.Tensor] = None          # (N, T) the tokens the loss uses (completion_mask
                                                      # minus dropped samples); None: completion_mask
    old_logps: Optional[torch.Tensor] = None          # (N, T)
    importance_weights: Optional[torch.Tensor] = None  # (N, T) or (N, 1) engine-mismatch IS weights (vLLM)
    ref_logps: Optional[torch.Tensor] = None          # (N, T)
    extras: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def mask(self) -> torch.Tensor:
        """The mask the loss uses."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask

    def with_fields(self, **changes) -> "Rollout":
        for k in changes:
            if getattr(self, k) is not None and k not in ("extras",):
                raise AttributeError(f"Rollout.{k} is already set: a rollout's fields are written once")
        return dataclasses.replace(self, **changes)

    def dropped(self, mask_truncated_completions: bool = False) -> torch.Tensor:
        """(N,) bool: samples the loss leaves out (no reward, or truncated when asked to mask those)."""
        drop = torch.isnan(self.rewards).to(self.completion_mask.device)
        if mask_truncated_completions:
            drop = drop | self.truncated.to(drop.device)
        return drop

    def mask_without(self, drop: torch.Tensor) -> torch.Tensor:
        """completion_mask with the rows in `drop` zeroed: a new tensor for Rollout.loss_mask."""
        return self.completion_mask * (~drop).to(self.completion_mask.dtype)[:, None]

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
        attention_mask = torch.cat([self.prompt_mask[rows], self.completion_mask[rows]], dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return input_ids, attention_mask, position_ids


# how each (N, W) tensor field is padded to a common width when rollouts are concatenated:
# prompts on the left (left-padded), completions on the right
_LEFT = {"prompt_ids", "prompt_mask"}
_PAD_ID = {"prompt_ids", "completion_ids"}


def concat_rollouts(parts: List["Rollout"], pad_token_id: int) -> "Rollout":
    """One Rollout of the rows of `parts`, in order (e.g. the rounds of dynamic sampling).

    Prompt tensors are left-padded and completion tensors right-padded to the widest part (ids
    with pad_token_id, masks and log-probs with 0), so model_inputs gives each row the same
    tokens and positions as before. Every part must have the same group_size and the same set of
    fields; extras are dropped.
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
        if isinstance(vals[0], torch.Tensor):
            if vals[0].dim() >= 2:
                width = max(v.shape[1] for v in vals)
                fill = pad_token_id if f.name in _PAD_ID else 0
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
