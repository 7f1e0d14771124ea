"""Asynchronous rollouts: the producer generates the next steps' rollouts while the trainer updates.

    batch_source(...)    BatchSource when max_staleness is 0 (the synchronous loop, unchanged),
                         AsyncBatchSource otherwise; the trainer calls next(step) on either
    AsyncBatchSource     BatchSource's next(step), fed by producer threads (one per round in flight)

Versions. The trainer's weights after k steps are version k; step k trains with version k - 1 and
then syncs version k into the engine. Every sampled token carries the version that sampled it
(Rollout.policy_versions, in this numbering): the engine reports it (Generation.policy_versions,
counted in its sync_weights calls), or, for an engine that cannot generate beside the trainer
(max_staleness 0 only), it is the version when the generation started. A sample's version is the
oldest of its tokens' (an engine that loads new weights mid-request samples the rest with them).

The bound. Step k trains a sample of version v only if (k - 1) - v <= max_staleness. The producer
works in rounds, one step's prompts each (every rank its own share, as in the synchronous loop);
it starts round r only while r <= (rounds the trainer has taken or waits for) + window, window =
max_staleness rounds (max_inflight_tasks completions, in whole steps, when set), and up to window
rounds are generated at once. With the default window, one round per step and nothing dropped no
sample can be too old; groups older than the bound (a longer window, an engine that loads weights
late, a round split over two steps after a drop) are dropped whole, counted, and replaced by the
next groups of the stream. max_staleness 0 with this class is the synchronous loop through a
thread: the producer starts a round only when the trainer asks for it.

The rounds are scored by the trainer's thread when a step takes them (reward functions see the
step that trains on them, and never run beside the update); dynamic sampling takes rounds from
the stream as it takes them from the synchronous producer.

Checkpoints. The producer has drawn prompts and sampling seeds ahead of the trainer; a checkpoint
stores, for every rank, the prompt sampler's and the engine's state before the first round not
fully trained, and how many of its groups were. A resumed run regenerates those rounds (with the
resumed weights: the same prompts, new samples), skips the groups already trained, and says so.
The synchronous loop resumes such a checkpoint the same way.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional

import torch

from ..config import ConfigError
from ..rollout import Rollout, concat_rollouts
from .batches import BatchSource, say_resumed
from .data import local_slice

__all__ = ["AsyncBatchSource", "ProducerError", "batch_source"]


class ProducerError(RuntimeError):
    """The background producer failed, hung, or produced nothing the trainer may train on."""


def batch_source(producer, rewards, sampler, dataset, config, dist, engine):
    """The batch source the config asks for: the synchronous loop at max_staleness 0."""
    if config.max_staleness == 0:
        return BatchSource(producer, rewards, sampler, dataset, config, dist, engine)
    return AsyncBatchSource(producer, rewards, sampler, dataset, config, dist, engine)


@dataclass
class _Round:
    """One round the producer generated: one step's prompts (this rank's share), not yet scored."""

    index: int                 # 1, 2, ... in the order the producer drew them
    batch: Rollout
    mark: Dict[str, Any]       # the sampler's and the engine's state before the round was drawn
    oldest: torch.Tensor       # (groups,) the oldest version of each group's sampled tokens
    seconds: float             # generation time
    cursor: int = 0            # groups already taken (trained or dropped)


class AsyncBatchSource(BatchSource):
    """next(step) as BatchSource, fed by producer threads that run up to `window` rounds ahead."""

    def __init__(self, producer, rewards, sampler, dataset, config, dist, engine, say=print):
        super().__init__(producer, rewards, sampler, dataset, config, dist, engine)
        self.say = say
        self.max_staleness = int(config.max_staleness)
        if config.max_inflight_tasks == -1:
            self.window = self.max_staleness
        else:
            self.window = max(1, config.max_inflight_tasks // config.completions_per_step)
        if self.max_staleness > 0 and not engine.supports_async:
            raise ConfigError(f"max_staleness={self.max_staleness}: engine {engine.name!r} cannot generate while the "
                              "trainer updates the policy (its supports_async is False); use the HF engine, vLLM "
                              "(colocate or server), or an engine that does (rollout/engine.py)")
        if self.max_staleness > 0 and engine.name != "vllm-server" and dist.is_main:
            say(f"[grpo_fast] max_staleness={self.max_staleness} with engine {engine.name!r}: the producer is a "
                "thread of the trainer's process; it overlaps the update only where generation releases the GIL "
                "(on CPU with small models it measured slower than the synchronous loop; a vLLM server process "
                "overlaps for real: docs/async.md)")
        self.timeout = float(config.heartbeat_stale_after_s)
        self._cv = threading.Condition()
        self._ready: "collections.deque[_Round]" = collections.deque()   # generated, in order
        self._done: Dict[int, _Round] = {}        # generated before an earlier round
        self._current: Optional[_Round] = None    # the round the stream is in (partly taken)
        self._marks: Dict[int, Dict[str, Any]] = {}   # every round started and not fully taken
        self._requested = 0        # rounds the trainer has taken or is waiting for
        self._started = 0          # rounds the producer has started
        self._next = 1             # the next round to queue
        self._last_step = False    # the trainer is on its last step: nothing more to produce
        self._threads: list = []   # one per round that may be in flight (window, at least 1)
        self._error: Optional[BaseException] = None
        self._closed = False
        self._offset: Optional[int] = None   # trainer version - engine.weights_version
        self.version = 0           # the trainer's weights version (steps done)
        self._skip = 0             # groups of the first round already trained before a resume
        self._idle_producer = 0.0  # seconds the producer waited for the window since the last step
        self.dropped_total = 0     # samples dropped as too old, over the run
        self._stats: Dict[str, float] = {}

    # ------------------------------------------------------------------ the producer thread
    def _trainer_version(self) -> int:
        """The version the engine samples with now, in the trainer's numbering."""
        if self.engine.supports_async:
            return self.engine.weights_version + self._offset
        return self.version

    def _work(self) -> None:
        """One producer thread: claims the next round, generates it, queues it in round order. With
        a window of w rounds, w threads keep up to w rounds in flight (an engine that batches
        concurrent requests, the vLLM server or loop, fills its batches with the next round while
        the last completions of this one finish)."""
        cfg, dist = self.config, self.dist
        G = cfg.num_generations
        try:
            while True:
                with self._cv:
                    t0 = time.monotonic()
                    while not self._closed and self._error is None and (
                            self._started >= self._requested + self.window
                            or (self._last_step and self._started >= self._requested)):
                        self._cv.wait()
                    self._idle_producer += time.monotonic() - t0
                    if self._closed or self._error is not None:
                        return
                    self._started += 1
                    index = self._started
                    self._marks[index] = {"sampler": self.sampler.state_dict(), "engine": self.engine.state_dict()}
                    indices = local_slice(self.sampler.take(cfg.prompts_per_step * dist.world_size), dist.rank, dist.world_size)
                    start = self._trainer_version()
                t0 = time.perf_counter()
                batch = self.producer.produce([self.dataset[i] for i in indices], indices, self.settings, G)
                seconds = time.perf_counter() - t0
                batch, oldest = self._versioned(batch, start)
                with self._cv:
                    self._done[index] = _Round(index, batch, self._marks[index], oldest, seconds)
                    while self._next in self._done:      # in round order, whatever order they finished in
                        self._ready.append(self._done.pop(self._next))
                        self._next += 1
                    self._cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - the trainer raises it (next())
            with self._cv:
                if self._error is None:
                    self._error = e
                self._cv.notify_all()

    def _versioned(self, batch: Rollout, start: int):
        """The rollout with policy_versions in the trainer's numbering, and each group's oldest."""
        sampled = batch.sampled_mask != 0
        if batch.policy_versions is not None:
            versions = torch.where(sampled, batch.policy_versions + self._offset, -1)
        else:
            versions = torch.where(sampled, start, -1).long()
        batch = replace(batch, policy_versions=versions)
        big = torch.iinfo(torch.long).max
        per_sample = torch.where(sampled, versions, big).amin(1)                        # (N,)
        per_sample = torch.where(per_sample == big, start, per_sample)                  # nothing sampled
        return batch, per_sample.view(-1, batch.group_size).amin(1).cpu()               # (groups,)

    # ------------------------------------------------------------------ the trainer's side
    def _begin(self, step: int) -> None:
        with self._cv:
            if self._offset is None:   # the first step of this run (fresh or resumed)
                self._offset = (step - 1) - self.engine.weights_version
            self.version = step - 1
            self._last_step = step >= self.config.max_steps
            self._stats = {"wait": 0.0, "dropped": 0.0, "generation": 0.0, "queue": float(self._queued()),
                           "idle": self._idle_producer / max(1, len(self._threads))}   # per producer thread
            self._idle_producer = 0.0
            if not self._threads:
                self._threads = [threading.Thread(target=self._work, name="grpo-fast-producer", daemon=True)
                                 for _ in range(max(1, self.window))]
                for t in self._threads:
                    t.start()

    def _queued(self) -> int:
        """Samples generated and not yet taken."""
        n = sum(len(r.batch) for r in self._ready) + sum(len(r.batch) for r in self._done.values())
        if self._current is not None:
            n += len(self._current.batch) - self._current.cursor * self._current.batch.group_size
        return n

    def _take_round(self) -> _Round:
        """The next round of the stream (waits for the producer, at most heartbeat_stale_after_s)."""
        if self._current is not None:
            return self._current
        with self._cv:
            self._requested += 1
            self._cv.notify_all()
            t0 = time.monotonic()
            while not self._ready:
                if self._error is not None:
                    raise ProducerError(f"the rollout producer failed: {type(self._error).__name__}: {self._error} "
                                        "(the last checkpoint resumes: resume_from_checkpoint='latest')") \
                        from self._error
                waited = time.monotonic() - t0
                if waited >= self.timeout:
                    raise ProducerError(f"the rollout producer has produced nothing for {waited:.0f} s "
                                        f"(heartbeat_stale_after_s={self.timeout:g}): it is hung or far too slow")
                self._cv.wait(min(self.timeout - waited, 1.0))
            self._stats["wait"] += time.monotonic() - t0
            rnd = self._ready.popleft()
        if self._skip:   # resumed: the first groups of this round were trained before the checkpoint
            rnd.cursor, self._skip = min(self._skip, len(rnd.oldest)), 0
        self._current = rnd
        self._stats["generation"] += rnd.seconds
        return rnd

    def _fresh(self, rnd: _Round, g: int, step: int) -> bool:
        if (step - 1) - int(rnd.oldest[g]) <= self.max_staleness:
            return True
        self._stats["dropped"] += rnd.batch.group_size
        return False

    def _take(self, step: int, need: Optional[int]):
        """Rows of fresh groups from the stream: `need` groups (None: the fresh ones of one round),
        as a list of rollouts; rounds whose every group is too old are skipped (bounded)."""
        parts, stale_rounds = [], 0
        while need is None or need > 0:
            rnd = self._take_round()
            G, groups = rnd.batch.group_size, len(rnd.oldest)
            rows, before = [], rnd.cursor
            while rnd.cursor < groups and (need is None or need > 0):
                g = rnd.cursor
                rnd.cursor += 1
                if self._fresh(rnd, g, step):
                    rows.extend(range(g * G, (g + 1) * G))
                    need = None if need is None else need - 1
            if rnd.cursor >= groups:
                self._current = None
                with self._cv:
                    self._marks.pop(rnd.index, None)
            if rows:
                whole = before == 0 and len(rows) == len(rnd.batch)
                parts.append(rnd.batch if whole else rnd.batch.select(rows))
                stale_rounds = 0
                if need is None:
                    break
            elif rnd.cursor >= groups:
                stale_rounds += 1
                if stale_rounds > self.window + 2:
                    raise ProducerError(
                        f"step {step}: the last {stale_rounds} rounds were all older than max_staleness="
                        f"{self.max_staleness} (newest version {int(rnd.oldest.max())}, the trainer's {step - 1}): "
                        f"engine {self.engine.name!r} does not sample with the weights the trainer syncs")
        return parts

    def _round(self, step: int, first_group_id: int):
        """One round's fresh groups, scored (dynamic sampling's unit)."""
        t0 = self._stats["wait"]
        part = self._join(self._take(step, None))
        return self.rewards.score(part, step), self._stats["wait"] - t0

    def _join(self, parts):
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, self.producer.tokenizer.pad_token_id)

    def next(self, step: int):
        """(the step's rollout with rewards and loss_mask, seconds the trainer waited for it, metrics)."""
        cfg = self.config
        self._begin(step)
        if cfg.dynamic_sampling:
            batch, _, metrics = self._dynamic(step)
        else:
            per_rank = cfg.prompts_per_step      # per process, as TRL's per-device batch
            batch, metrics = self.rewards.score(self._join(self._take(step, per_rank)), step), {}
        metrics.update(self._metrics(batch, step))
        return batch.with_loss_mask(cfg.mask_truncated_completions), self._stats["wait"], metrics

    def _metrics(self, batch: Rollout, step: int) -> Dict[str, float]:
        """TRL's names (AsyncGRPOTrainer), over every rank."""
        sampled = batch.sampled_mask != 0
        big = torch.iinfo(torch.long).max
        oldest = torch.where(sampled, batch.policy_versions, big).amin(1)
        ok = oldest != big
        staleness = ((step - 1) - oldest[ok]).double()
        s = self._stats
        sums = self.dist.sum_floats([float(staleness.sum()), float(staleness.numel()), s["dropped"], s["queue"]])
        peaks = self.dist.all_reduce(torch.tensor([float(staleness.max()) if staleness.numel() else 0.0, s["wait"],
                                                   s["idle"], s["generation"]], dtype=torch.float64), "max").tolist()
        self.dropped_total += int(sums[2])
        return {"sample/staleness_mean": sums[0] / sums[1] if sums[1] else 0.0, "sample/staleness_max": peaks[0],
                "sample/dropped_stale": sums[2], "sample/dropped_stale_total": float(self.dropped_total),
                "sample/rollout_queue_size": sums[3], "perf/rollout_wait_s": peaks[1],
                "rollout/backpressure_s": peaks[2], "rollout/generation_s": peaks[3]}

    # ------------------------------------------------------------------ checkpoints and resources
    def state_dict(self) -> Dict[str, Any]:
        """Where this rank's stream stands: the state before the first round not fully trained."""
        with self._cv:
            if self._marks:
                first = min(self._marks)
                mark = self._marks[first]
                skip = self._current.cursor if self._current is not None and self._current.index == first else 0
            else:
                mark, skip = {"sampler": self.sampler.state_dict(), "engine": self.engine.state_dict()}, self._skip
            in_flight = len(self._marks)
        return {"sampler": mark["sampler"], "engine": mark["engine"], "skip_groups": int(skip),
                "rounds_in_flight": int(in_flight), "max_staleness": self.max_staleness,
                "dropped_total": int(self.dropped_total)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self._threads:
            raise RuntimeError("AsyncBatchSource.load_state_dict after the producer started")
        self._skip = say_resumed(self.sampler, self.engine, state, self.say if self.dist.is_main else None)
        self.dropped_total = int(state.get("dropped_total", 0))

    def close(self, timeout: float = 60.0) -> None:
        """Stop the producer threads (a round in progress ends first: at most one generate call)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            self.say(f"[grpo_fast] the rollout producer did not stop within {timeout:g} s (a generate call still "
                     "waiting); it ends with it")
