"""Callbacks: transformers.TrainerCallback objects, called as the HF Trainer calls them, and plain
callables cb(trainer, metrics) -> bool after every step (True stops training)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from transformers import TrainerCallback, TrainerControl, TrainerState

__all__ = ["Callbacks"]


class Callbacks:
    """The run's callbacks and the TrainerState / TrainerControl that TRL hands reward functions
    (trainer_state) and TrainerCallbacks (state, control)."""

    def __init__(self, callbacks: Optional[Sequence[Any]], config, *, is_main: bool):
        self.items: List[Any] = list(callbacks or [])
        for cb in self.items:
            if isinstance(cb, type) and issubclass(cb, TrainerCallback):
                raise TypeError(f"callbacks: {cb.__name__} is a class; pass an instance, {cb.__name__}()")
            if not (isinstance(cb, TrainerCallback) or callable(cb)):
                raise TypeError(f"callbacks: {cb!r} is neither a transformers.TrainerCallback nor a callable "
                                "cb(trainer, metrics) -> bool")
        self.config = config
        self.state = TrainerState(max_steps=config.max_steps, logging_steps=config.logging_steps,
                                  save_steps=config.save_steps, is_world_process_zero=is_main)
        self.control = TrainerControl()

    def append(self, cb: Callable) -> None:
        self.items.append(cb)

    def __iter__(self):
        return iter(self.items)

    def run(self, event: str, trainer, metrics: Optional[Dict[str, Any]] = None) -> bool:
        """Call `event` on every callback; True when one asked to stop (control.should_training_stop
        or a True return of a plain callable, which run at on_step_end)."""
        stop = False
        for cb in self.items:
            if isinstance(cb, TrainerCallback):
                kwargs = {"logs": metrics} if event == "on_log" else {}
                out = getattr(cb, event)(self.config, self.state, self.control, model=trainer.model,
                                         processing_class=trainer.tokenizer, optimizer=trainer.optimizer,
                                         lr_scheduler=trainer.scheduler, **kwargs)
                if isinstance(out, TrainerControl):
                    self.control = out
            elif event == "on_step_end":
                stop = bool(cb(trainer, metrics)) or stop
        return stop or bool(self.control.should_training_stop)

    def step_end(self, trainer, metrics: Dict[str, Any], *, logged: bool, step: int, epoch: float,
                 num_tokens: int) -> bool:
        """on_log (when the step was logged) and on_step_end, with the state TRL's callbacks read."""
        self.state.global_step = step
        self.state.epoch = epoch
        self.state.num_input_tokens_seen = num_tokens
        if logged:
            self.state.log_history.append(dict(metrics))
            self.run("on_log", trainer, metrics)
        return self.run("on_step_end", trainer, metrics)
