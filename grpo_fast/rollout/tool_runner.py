"""Running tool calls: every call of a turn at once, each under a timeout, never raising.

`ToolRunner.run(jobs)` takes (function or None, arguments, error) per call and gives back, in
order, what the tool returned or an error message for the model, whether it failed, and how long
it took. Async tools (`async def`, environment methods included) run on one private event loop in
a worker thread (`grpo_fast-tools`); sync tools run in a thread pool from that loop; every call is
wrapped in `asyncio.wait_for(timeout)`. An exception, a timeout, an unknown tool or arguments
the function does not take become `{"error": "..."}` (TRL's form), so a rollout never fails on a
tool. A timed-out async call is cancelled; a timed-out sync call cannot be stopped (Python has no
way to kill a thread): its worker thread finishes on its own and the result is dropped.

`close()` stops the loop and the pool without waiting for such stragglers.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["ToolJob", "ToolResult", "ToolRunner"]


@dataclass
class ToolJob:
    name: str
    function: Optional[Callable]        # None: no tool of that name (or the call was malformed)
    arguments: Dict[str, Any]
    error: Optional[str] = None         # set: nothing runs, this is the answer


@dataclass
class ToolResult:
    content: Any                        # what the tool message carries
    failed: bool
    seconds: float


def _error(text: str) -> Dict[str, str]:
    return {"error": text}


class ToolRunner:
    """Executes tool calls concurrently (module docstring). `timeout`: seconds per call, None = none."""

    def __init__(self, timeout: Optional[float] = 60.0, max_workers: int = 32):
        self.timeout = timeout
        self.max_workers = max_workers
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # ------------------------------------------------------------------ the loop
    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve():
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._pool = concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="grpo_fast-tool")
            self._thread = threading.Thread(target=serve, name="grpo_fast-tools", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        return self._loop

    def await_all(self, awaitables: Sequence[Any]) -> List[Any]:
        """Results (or the exception each raised) of awaitables, on the tools' loop (e.g. an
        environment's async get_reward, so all of an environment's coroutines share one loop)."""
        loop = self._start()

        async def _all():
            return await asyncio.gather(*awaitables, return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(_all(), loop).result()

    # ------------------------------------------------------------------ calls
    async def _one(self, job: ToolJob) -> ToolResult:
        t0 = time.perf_counter()
        if job.error is not None:
            return ToolResult(_error(job.error), True, 0.0)
        if job.function is None:
            return ToolResult(_error(f"Tool {job.name} not found."), True, 0.0)
        try:
            if inspect.iscoroutinefunction(job.function):
                pending = job.function(**job.arguments)
            else:
                pending = asyncio.get_running_loop().run_in_executor(
                    self._pool, functools.partial(job.function, **job.arguments))
            out = await asyncio.wait_for(pending, self.timeout)
            if inspect.isawaitable(out):  # a sync callable that returned a coroutine
                out = await asyncio.wait_for(out, self.timeout)
            return ToolResult(out, False, time.perf_counter() - t0)
        except asyncio.TimeoutError:
            return ToolResult(_error(f"Tool {job.name} timed out after {self.timeout:g} s."), True,
                              time.perf_counter() - t0)
        except Exception as e:  # the tool's own error (or arguments it does not take) goes to the model
            return ToolResult(_error(str(e) or type(e).__name__), True, time.perf_counter() - t0)

    def run(self, jobs: Sequence[ToolJob]) -> List[ToolResult]:
        """Every job at once; results in order."""
        if not jobs:
            return []
        loop = self._start()

        async def _all():
            return await asyncio.gather(*(self._one(j) for j in jobs))

        return asyncio.run_coroutine_threadsafe(_all(), loop).result()

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            if not loop.is_running():
                loop.close()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
