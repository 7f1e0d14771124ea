"""EngineLoop: one thread drives an in-process `vllm.LLM` step by step, for callers in any thread.

    loop = EngineLoop(llm)
    gen = loop.generate(prompt_ids, settings, seeds, min_version=3)   # any thread; blocks until done
    loop.call(reload, version=4)                                      # between two engine steps

`vllm.LLM.generate` runs one batch to the end and cannot be entered twice at once. The loop instead
adds every caller's requests to the same engine as they arrive (continuous batching: requests
of two trainer ranks, or of the next step while this one finishes, share the engine's batches),
calls `LLMEngine.step()` while anything is unfinished, and hands each caller its completions.

Weight updates never drain it. `call(fn, version=v)` runs `fn(llm)` (a weight reload) between two
engine steps, then resets the prefix cache *with* the running requests: vLLM preempts them and
recomputes their KV blocks with the new weights, so every token sampled after the update is
sampled from the new weights given its whole prefix. The loop labels the weights with vLLM 0.32's
own version tracking (`LLMEngine.set_weight_version`), and vLLM reports, per completion, the spans of
tokens each label sampled (`CompletionOutput.weight_versions`): these become
`Generation.policy_versions`. A request may ask for `min_version`: it waits until the weights are
at least that version (another trainer rank's update has arrived) before it enters the engine.

A failure inside the loop (vLLM raised) fails every pending call with that error and every later
one at once; `close()` stops the thread and fails what is pending.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .engine import Generation, SamplingSettings
from .vllm_common import _TORCH_SET_NUM_THREADS, generation_from_outputs, sampling_params

__all__ = ["EngineLoop", "EngineLoopError"]


class EngineLoopError(RuntimeError):
    """The engine loop stopped (vLLM raised in it, or it was closed)."""


class _Call:
    """A caller's request (generate or call), done when `event` is set."""

    def __init__(self):
        self.event = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.cancelled = False

    def finish(self, result=None, error: Optional[BaseException] = None) -> None:
        self.result, self.error = result, error
        self.event.set()

    def wait(self, timeout: Optional[float], what: str):
        if not self.event.wait(timeout):
            self.cancelled = True
            raise TimeoutError(f"vLLM engine loop: {what} not done after {timeout:g} s")
        if self.error is not None:
            raise self.error
        return self.result


class _Job(_Call):
    def __init__(self, prompts, params, min_version: int, session: Optional[str]):
        super().__init__()
        self.prompts, self.params = prompts, params
        self.min_version, self.session = min_version, session
        self.outputs: List[Any] = [None] * len(prompts)
        self.left = len(prompts)
        self.request_ids: List[str] = []


class _Update(_Call):
    def __init__(self, fn: Callable, version: Optional[int], session: Optional[str]):
        super().__init__()
        self.fn, self.version, self.session = fn, version, session


class EngineLoop:
    """Continuous batching and weight updates between steps over one in-process `vllm.LLM`."""

    def __init__(self, llm, *, name: str = "grpo-fast-vllm-loop"):
        self.llm = llm
        self.engine = llm.llm_engine
        self.version = 0                  # the weights version the engine samples with
        self.session: Optional[str] = None  # who set it (the trainer run), when several could
        self.engine.set_weight_version("0")
        self._cv = threading.Condition()
        self._waiting: List[_Job] = []    # not in the engine yet (min_version not reached)
        self._running: Dict[str, tuple] = {}   # request id -> (job, index)
        self._updates: List[_Update] = []
        self._ids = itertools.count()
        self._closed = False
        self._error: Optional[BaseException] = None
        self.steps = 0
        # OpenMP's thread count is per thread: the loop thread takes its creator's (vLLM's CPU
        # attention checks that its metadata and its kernel agree on it)
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers (any thread)
    def generate(self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, seeds: Sequence[int], *,
                 min_version: int = 0, session: Optional[str] = None,
                 timeout: Optional[float] = None) -> Generation:
        """One completion per prompt (in order), each token with the version that sampled it."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = sampling_params(settings, seeds)
        for p in params:
            p.output_kind = RequestOutputKind.FINAL_ONLY
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        job = _Job(prompts, params, int(min_version), session)
        if not prompts:
            return Generation(completion_ids=[], finish_reasons=[], logprobs=[], stop_reasons=[], policy_versions=[])
        self._submit(job, self._waiting)
        return job.wait(timeout, f"a generate call of {len(prompts)} prompts (min_version={min_version})")

    def call(self, fn: Callable[[Any], Any], *, version: Optional[int] = None, session: Optional[str] = None,
             timeout: Optional[float] = None) -> float:
        """Run fn(llm) between two engine steps; with `version`, the weights changed: the prefix cache
        is reset (running requests recomputed) and later tokens carry `version`. Returns seconds taken."""
        upd = _Update(fn, version, session)
        self._submit(upd, self._updates)
        return upd.wait(timeout, "a weight update" if version is not None else "a call")

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def _submit(self, item: _Call, queue: list) -> None:
        with self._cv:
            if self._error is not None:
                raise EngineLoopError(f"the vLLM engine loop stopped: {type(self._error).__name__}: "
                                      f"{self._error}") from self._error
            if self._closed:
                raise EngineLoopError("the vLLM engine loop is closed")
            queue.append(item)
            self._cv.notify_all()

    # ------------------------------------------------------------------ the loop thread
    def _ready(self, job: _Job) -> bool:
        if job.min_version <= 0:   # any weights will do
            return True
        return (job.session is None or job.session == self.session) and self.version >= job.min_version

    def _has_work(self) -> bool:
        return bool(self._updates) or any(self._ready(j) for j in self._waiting) or bool(self._running)

    def _run(self) -> None:
        try:
            _TORCH_SET_NUM_THREADS(self._threads)
            while True:
                with self._cv:
                    while not self._closed and not self._has_work():
                        self._cv.wait()
                    if self._closed:
                        break
                    updates, self._updates = self._updates, []
                for upd in updates:       # between two engine steps
                    self._apply(upd)
                with self._cv:
                    ready = [j for j in self._waiting if self._ready(j) and not j.cancelled]
                    self._waiting = [j for j in self._waiting if not self._ready(j) and not j.cancelled]
                for job in ready:
                    for i, (prompt, params) in enumerate(zip(job.prompts, job.params)):
                        rid = str(next(self._ids))
                        self.engine.add_request(rid, prompt, params)
                        self._running[rid] = (job, i)
                        job.request_ids.append(rid)
                self._abort_cancelled()
                if self._running:
                    self._step()
        except BaseException as e:  # noqa: BLE001 - every caller sees it
            with self._cv:
                self._error = e
        finally:
            self._fail_pending()

    def _apply(self, upd: _Update) -> None:
        t0 = time.perf_counter()
        try:
            upd.fn(self.llm)
            if upd.version is not None:
                # running requests are preempted and recomputed with the new weights (their KV blocks
                # and every cached prefix were computed with the old ones)
                self.llm.reset_prefix_cache(reset_running_requests=True)
                self.version = int(upd.version)
                self.session = upd.session
                self.engine.set_weight_version(str(self.version))
        except Exception as e:  # the caller's error; the engine goes on
            upd.finish(error=e)
            return
        upd.finish(time.perf_counter() - t0)

    def _step(self) -> None:
        for out in self.engine.step():
            if not out.finished:
                continue
            entry = self._running.pop(out.request_id, None)
            if entry is None:
                continue
            job, i = entry
            job.outputs[i] = out
            job.left -= 1
            if job.left == 0:
                try:
                    job.finish(generation_from_outputs(job.outputs, versions=True))
                except Exception as e:  # noqa: BLE001
                    job.finish(error=e)
        self.steps += 1

    def _abort_cancelled(self) -> None:
        dead = [rid for rid, (job, _) in self._running.items() if job.cancelled]
        if dead:
            self.engine.abort_request(dead)
            for rid in dead:
                self._running.pop(rid, None)

    def _fail_pending(self) -> None:
        with self._cv:
            cause = self._error
            error = EngineLoopError("the vLLM engine loop stopped" + (
                f": {type(cause).__name__}: {cause}" if cause is not None else " (closed)"))
            if cause is not None:
                error.__cause__ = cause
            pending: List[_Call] = list(self._waiting) + list(self._updates)
            pending += list({id(job): job for job, _ in self._running.values()}.values())
            self._waiting, self._updates, self._running = [], [], {}
        for item in pending:
            if not item.event.is_set():
                item.finish(error=error)
