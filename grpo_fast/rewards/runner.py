"""RewardRunner: calls the reward functions of a step as TRL calls them, checks what they return,
and says which function failed on which sample.

Each function is called with keywords only: prompts, completions, completion_ids, every dataset
column, trainer_state, log_extra and log_metric. `async def` functions are awaited concurrently
on a private event loop (in a worker thread when this thread already runs a loop). A function
returns one value per completion: a number, or None / NaN for "no reward"; +-inf is an error.
The total is the reward_weights-weighted sum over the functions that gave a reward (NaN where
none did).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["RewardFunctionError", "RewardRunner"]


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable; names the function and the sample."""


class _AsyncRunner:
    """Awaits reward coroutines concurrently (asyncio.gather) on a private event loop: in this
    thread, or in a worker thread when this thread already runs a loop (Jupyter, async apps),
    where run_until_complete would fail. The loop lives as long as the runner, so clients bound
    to it (an httpx.AsyncClient made inside a reward function) keep working from step to step."""

    def __init__(self):
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def gather(self, awaitables: List[Any]) -> List[Any]:
        """Results (or the exception each raised), in order."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()

        async def _all():
            return await asyncio.gather(*awaitables, return_exceptions=True)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._loop.run_until_complete(_all())
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grpo_fast-rewards")
        return self._pool.submit(self._loop.run_until_complete, _all()).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _describe(batch, i: int) -> str:
    p = batch.prompts[i]
    text = p if isinstance(p, str) else repr(p)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"sample {i} of the step (dataset index {batch.dataset_index[i]}, prompt {text!r})"


class RewardRunner:
    """Scores rollouts with `funcs` (named `names`, weighted `weights`)."""

    def __init__(self, funcs: Sequence[Callable], names: Sequence[str], weights: Optional[Sequence[float]] = None,
                 *, trainer_state=None):
        if not funcs:
            raise ValueError("reward_funcs: give at least one reward function or reward model")
        weights = [1.0] * len(funcs) if weights is None else list(weights)
        if len(weights) != len(funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(funcs)} reward functions")
        self.funcs, self.names = list(funcs), list(names)
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.trainer_state = trainer_state       # TRL's TrainerState, handed to every function
        self._async = _AsyncRunner()
        self.metrics: Dict[str, List[float]] = {}   # log_metric(name, value) of this step
        self.extra: Dict[str, List[Any]] = {}       # log_extra(column, values) of this step

    def begin_step(self) -> None:
        """Forget what the functions logged during the previous step."""
        self.metrics, self.extra = {}, {}

    def step_metrics(self) -> Dict[str, float]:
        """The step's log_metric values, averaged per name."""
        return {name: sum(v) / len(v) for name, v in sorted(self.metrics.items())}

    def close(self) -> None:
        self._async.close()

    # ------------------------------------------------------------------ scoring
    def score(self, batch, step: int, *, record: bool = True):
        """A new Rollout with rewards (N,) and rewards_per_func (N, F); `record`: what the functions
        log goes into this step's metrics and batch.extras["log_extra"] (False for evaluation)."""
        outputs: List[Any] = [None] * len(self.funcs)
        pending = []                                                             # (j, awaitable)
        for j, f in enumerate(self.funcs):
            try:
                out = self._call(f, batch, record=record)
            except Exception as e:
                raise self._locate_failure(j, batch, step, e) from e
            if inspect.isawaitable(out):
                pending.append((j, out))
            else:
                outputs[j] = out
        if pending:
            for (j, _), res in zip(pending, self._async.gather([a for _, a in pending])):
                if isinstance(res, BaseException):
                    if not isinstance(res, Exception):
                        raise res
                    raise self._locate_failure(j, batch, step, res) from res
                outputs[j] = res
        columns = [self._values(name, out, batch, step) for name, out in zip(self.names, outputs)]
        if record and self.extra:
            batch.extras["log_extra"] = dict(self.extra)
        per_func = torch.tensor(columns, dtype=torch.float32).T.contiguous()      # (N, F)
        total = torch.nansum(per_func * self.weights, dim=1)
        total[torch.isnan(per_func).all(dim=1)] = float("nan")
        return batch.with_fields(rewards=total, rewards_per_func=per_func)

    def _call(self, f, batch, *, record: bool, sel: Optional[List[int]] = None):
        pick = (lambda xs: xs) if sel is None else (lambda xs: [xs[i] for i in sel])
        kwargs = {k: pick(v) for k, v in batch.columns.items()}
        if record and sel is None:
            kwargs.update(log_extra=self._log_extra, log_metric=self._log_metric)
        else:  # evaluation, or locating a failure: what the function logs then is not the step's
            kwargs.update(log_extra=lambda column, values: None, log_metric=lambda name, value: None)
        return f(prompts=pick(batch.prompts), completions=pick(batch.completions),
                 completion_ids=pick(batch.completion_ids_list), trainer_state=self.trainer_state, **kwargs)

    def _log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))

    def _log_extra(self, column: str, values: Sequence[Any]) -> None:
        self.extra.setdefault(str(column), []).extend(list(values))

    def _values(self, name: str, values, batch, step: int) -> List[float]:
        """A function's output -> floats. None and NaN mean no reward (NaN); +-inf is an error."""
        N = len(batch)
        if values is None or not hasattr(values, "__len__") or len(values) != N:
            got = "None" if values is None else (f"{len(values)} values" if hasattr(values, "__len__")
                                                 else type(values).__name__)
            raise RewardFunctionError(f"reward function {name!r} returned {got} for {N} completions at step {step}")
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        try:
            col = [math.nan if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            i = next(i for i, v in enumerate(values) if v is not None and not _is_number(v))
            raise RewardFunctionError(f"reward function {name!r} returned {values[i]!r} (not a number or None) "
                                      f"for {_describe(batch, i)} at step {step}") from None
        for i, v in enumerate(col):
            if math.isinf(v):
                raise RewardFunctionError(f"reward function {name!r} returned {v} for {_describe(batch, i)} "
                                          f"at step {step}: rewards must be finite (None or NaN = no reward)")
        return col

    def _locate_failure(self, j: int, batch, step: int, error: BaseException) -> RewardFunctionError:
        """Call the function one sample at a time to find which one breaks it."""
        f, name = self.funcs[j], self.names[j]
        for i in range(len(batch)):
            try:
                out = self._call(f, batch, record=False, sel=[i])
                if inspect.isawaitable(out):
                    res = self._async.gather([out])[0]
                    if isinstance(res, Exception):
                        raise res
            except Exception as e:
                return RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e} on "
                                           f"{_describe(batch, i)} at step {step}")
        return RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error} on the batch "
                                   f"of {len(batch)} completions at step {step} (first: {_describe(batch, 0)}); "
                                   "each sample alone succeeded")
