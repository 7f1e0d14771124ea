"""VLLMColocateEngine: vLLM inside the trainer process (TRL's vllm_mode="colocate")."""
from __future__ import annotations

import contextlib
import gc
import shutil
import tempfile
import time
from typing import Any, Dict, Optional

import torch

from .engine import Generation, RolloutEngine, SamplingSettings
from .vllm_common import (VLLMOptions, build_llm, draw_seeds, is_cpu_platform, policy_weights, run_generate,
                          save_policy, torch_threads)
from .vllm_loop import EngineLoop

__all__ = ["VLLMColocateEngine"]


class VLLMColocateEngine(RolloutEngine):
    """An in-process `vllm.LLM` built from the policy's weights (saved to a temporary directory that
    is deleted as soon as the engine has loaded it).

    sync_weights(model) pushes the current weights in memory (`reload_weights` with a weights
    iterator: merged weights for a PEFT policy) and resets the prefix cache, which is required:
    cached blocks of the old weights would otherwise be reused. Sampling is reproducible: each
    call draws one seed per request from a generator seeded with `options.seed` (or from `seed=`).
    Under torchrun every rank builds its own engine (tensor parallel 1).

    concurrent=True (asynchronous rollouts): one thread drives the engine (rollout/vllm_loop.py), so a
    producer thread generates while the trainer's thread syncs weights: sync_weights hands the
    weights to that thread, which loads them between two engine steps (the requests in flight go on,
    recomputed with them) and returns once they are in; every token reports the version that
    sampled it.
    """

    name = "vllm-colocate"

    def __init__(self, model: torch.nn.Module, tokenizer, options: Optional[VLLMOptions] = None, *,
                 concurrent: bool = False, **overrides):
        self.options = options or VLLMOptions()
        if overrides:
            self.options = VLLMOptions(**{**self.options.as_dict(), **overrides})
        folder = tempfile.mkdtemp(prefix="grpo_fast_vllm_")
        dist_was_up = torch.distributed.is_available() and torch.distributed.is_initialized()
        extra = {}
        if dist_was_up and torch.distributed.get_world_size() > 1:
            extra["distributed_executor_backend"] = "external_launcher"  # one engine per rank (as TRL)
        t0 = time.perf_counter()
        try:
            save_policy(model, tokenizer, folder)
            self.llm = build_llm(folder, self.options, **extra)
        finally:  # vLLM holds the weights now (later syncs go in memory): no copy stays on disk
            shutil.rmtree(folder, ignore_errors=True)
        self.startup_seconds = time.perf_counter() - t0
        # vLLM's in-process worker joins a one-process torch.distributed group; close() leaves it
        self._owns_dist = not dist_was_up and torch.distributed.is_available() and torch.distributed.is_initialized()
        self._gen = torch.Generator().manual_seed(int(self.options.seed))
        self._asleep = False
        self.last_sync_seconds = 0.0
        self.loop = None
        if concurrent:
            if self.options.enable_sleep_mode:
                raise ValueError("vLLM's sleep mode frees the engine during the update: it cannot generate beside "
                                 "the trainer (concurrent=True)")
            self.loop = EngineLoop(self.llm)
            self.supports_async = True

    def generate(self, prompt_ids, settings: SamplingSettings, *, seed: Optional[int] = None) -> Generation:
        gen = self._gen if seed is None else torch.Generator().manual_seed(int(seed))
        seeds = draw_seeds(gen, len(prompt_ids))
        if self.loop is not None:
            return self.loop.generate(prompt_ids, settings, seeds)
        self._wake()
        with torch_threads(self.options.num_threads):
            out = run_generate(self.llm, prompt_ids, settings, seeds)
        if self.options.enable_sleep_mode and not is_cpu_platform():
            self.llm.sleep(level=1)   # free the KV cache and offload the weights during the update
            self._asleep = True
        return out

    def state_dict(self) -> Dict[str, Any]:
        """The sampling-seed generator, for checkpoints (a resumed run draws the same seeds)."""
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._gen.set_state(state["generator"])

    def _wake(self):
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sync_weights(self, model: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        if self.loop is not None:
            weights = policy_weights(model)   # live tensors: read while this thread waits below
            self.loop.call(lambda llm: llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights}),
                           version=self.weights_version + 1)
            self.weights_version += 1
            self.last_sync_seconds = time.perf_counter() - t0
            return
        self._wake()
        with torch.no_grad():
            weights = policy_weights(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - t0

    def close(self) -> None:
        loop, self.loop = getattr(self, "loop", None), None
        if loop is not None:
            loop.close()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            if self._owns_dist:
                with contextlib.suppress(Exception):
                    from vllm.distributed.parallel_state import destroy_distributed_environment, \
                        destroy_model_parallel
                    destroy_model_parallel()
                    destroy_distributed_environment()
                if torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
            gc.collect()
