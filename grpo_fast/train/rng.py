"""TrainerRNG: the trainer's own random state, saved in every checkpoint."""
from __future__ import annotations

import contextlib
from typing import Any, Dict

import torch

__all__ = ["TrainerRNG"]


class TrainerRNG:
    """The trainer's own random state; the process's global generators are left as they were.

    - `generator`: a torch.Generator for data order and minibatch shuffles.
    - The state the global torch generator has while the trainer samples completions and runs
      dropout (HF `generate` and dropout draw only from the global generator): `scope()` swaps it
      in for the duration of a step and swaps the process's own state back afterwards, so user code
      between steps neither changes training nor is changed by it.
    Both are in every checkpoint, so a resumed run continues the same random streams.
    """

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.reseed(seed)

    def _devices(self):
        return [self.device] if self.device.type == "cuda" else []

    def reseed(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(seed)
            self._cpu = torch.get_rng_state()
            self._cuda = torch.cuda.get_rng_state(self.device) if self._devices() else None

    @contextlib.contextmanager
    def scope(self):
        with torch.random.fork_rng(devices=self._devices()):
            torch.set_rng_state(self._cpu)
            if self._cuda is not None:
                torch.cuda.set_rng_state(self._cuda, self.device)
            try:
                yield
            finally:
                self._cpu = torch.get_rng_state()
                if self._cuda is not None:
                    self._cuda = torch.cuda.get_rng_state(self.device)

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state(), "torch": self._cpu, "cuda": self._cuda}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self._cpu = state["torch"]
        if state.get("cuda") is not None and self._devices():
            cuda = state["cuda"]
            # checkpoints before 0.2 held every device's state (a list); ours holds the trainer's device's
            self._cuda = cuda[self.device.index or 0] if isinstance(cuda, (list, tuple)) else cuda

    @contextlib.contextmanager
    def forked(self, seed: int):
        """A global random state seeded with `seed` for the duration, outside the trainer's streams
        (evaluation: training's random numbers are the same with or without it)."""
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(seed)
            yield
