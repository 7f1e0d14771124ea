"""The training data: which prompts a step samples (PromptSampler) and the check every row gets
at the start (check_dataset)."""
from __future__ import annotations

from typing import Any, Dict, List

import torch

__all__ = ["PromptSampler", "check_dataset", "local_slice"]


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


def local_slice(indices: List[int], rank: int, world_size: int) -> List[int]:
    """This rank's contiguous slice of a step's global prompts (whole groups per rank)."""
    k = len(indices) // world_size
    return indices[rank * k:(rank + 1) * k]
