"""Rollout engines by name: the config's `engine` field (and `--engine` on the command line) picks
one without the trainer knowing which.

    @register_engine("my-engine")
    def build(spec: EngineSpec) -> RolloutEngine:
        return MyEngine(spec.model, spec.tokenizer, ...)

Built in: "hf" (transformers generate), "vllm-colocate" and "vllm-server". A name of the form
"package.module:factory" is imported and called the same way, so an engine can live outside
this package. With `engine` unset the name follows TRL's fields: use_vllm and vllm_mode.
"""
from __future__ import annotations

import importlib
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch

from ..config import ConfigError
from ..model.precision import Precision, engine_dtype
from .engine import HFCopyEngine, HFEngine, RolloutEngine
from .vllm_client import VLLMServerEngine
from .vllm_colocate import VLLMColocateEngine
from .vllm_common import VLLMOptions

__all__ = ["ENGINES", "EngineSpec", "build_engine", "engine_name", "register_engine"]


@dataclass
class EngineSpec:
    """What a factory may use to build an engine."""

    model: torch.nn.Module        # the policy (unwrapped; a PEFT model as it is)
    tokenizer: Any
    config: Any                   # the trainer's config (RLConfig)
    device: torch.device
    rank: int = 0
    world_size: int = 1
    fsdp2: bool = False           # the policy will be sharded with FSDP2 (every forward a collective)

    @property
    def seed(self) -> int:
        """The engine's sampling seed: the config's, different on every rank."""
        return self.config.seed + 7919 * self.rank


Factory = Callable[[EngineSpec], RolloutEngine]
ENGINES: Dict[str, Factory] = {}


def register_engine(name: str, factory: Factory = None):
    """Register `factory(spec) -> RolloutEngine` under `name` (usable as a decorator)."""
    def add(f):
        ENGINES[name] = f
        return f
    return add if factory is None else add(factory)


def engine_name(config) -> str:
    """config.engine, or the name TRL's use_vllm / vllm_mode ask for."""
    implied = f"vllm-{config.vllm_mode}" if config.use_vllm else "hf"
    if config.engine is None:
        return implied
    if config.use_vllm and config.engine != implied:
        raise ConfigError(f"engine={config.engine!r} and use_vllm=True (vllm_mode={config.vllm_mode!r}, engine "
                          f"{implied!r}) ask for different engines: set one of them")
    return config.engine


def _factory(name: str) -> Factory:
    if name in ENGINES:
        return ENGINES[name]
    if ":" in name:
        module, attr = name.split(":", 1)
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"engine={name!r}: cannot import {attr} from {module} ({e})") from None
    raise ConfigError(f"engine={name!r}: expected one of {', '.join(map(repr, ENGINES))} or 'module:factory' "
                      "(grpo_fast.rollout.register_engine adds a name)")


def build_engine(spec: EngineSpec) -> RolloutEngine:
    """The engine the config names, built from `spec`."""
    name = engine_name(spec.config)
    engine = _factory(name)(spec)
    if not isinstance(engine, RolloutEngine):
        raise TypeError(f"engine={name!r}: the factory returned a {type(engine).__name__}, not a "
                        "grpo_fast.rollout.RolloutEngine")
    return engine


def _asynchronous(spec: EngineSpec) -> bool:
    """The producer will generate beside the trainer (max_staleness > 0: train/async_batches.py)."""
    return getattr(spec.config, "max_staleness", 0) > 0


@register_engine("hf")
def _hf(spec: EngineSpec) -> RolloutEngine:
    kw = dict(eos_token_id=spec.tokenizer.eos_token_id, pad_token_id=spec.tokenizer.pad_token_id, device=spec.device,
              tokenizer=spec.tokenizer, autocast=Precision.from_config(spec.config, spec.device).autocast)
    if _asynchronous(spec):
        if spec.world_size > 1 and spec.fsdp2:
            raise ConfigError("max_staleness > 0 with the HF engine and distributed=fsdp2 is not supported (the "
                              "producer samples from a full copy of the policy); use distributed=ddp")
        return HFCopyEngine(spec.model, **kw)
    return HFEngine(spec.model, synced_gpus=spec.world_size > 1 and spec.fsdp2, **kw)


def _no_fsdp2(spec: EngineSpec) -> None:
    if spec.world_size > 1 and spec.fsdp2:
        raise ConfigError("use_vllm with distributed=fsdp2 is not supported (the engine needs the full weights on "
                          "every rank); use distributed=ddp")


@register_engine("vllm-colocate")
def _vllm_colocate(spec: EngineSpec) -> RolloutEngine:
    _no_fsdp2(spec)
    cfg = spec.config
    # the engine computes in the trainer's precision (bf16 / fp16 autocast, else the parameters' dtype), so its
    # log-probs are the trainer's (exactly, in fp32)
    dtype = str(engine_dtype(spec.model, cfg)).replace("torch.", "")
    options = VLLMOptions(dtype=dtype, max_model_len=cfg.vllm_max_model_length,
                          gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, kv_cache_gib=cfg.vllm_kv_cache_gib,
                          enable_sleep_mode=cfg.vllm_enable_sleep_mode, seed=spec.seed,
                          max_num_seqs=max(cfg.completions_per_step, 1))
    if _asynchronous(spec) and cfg.vllm_enable_sleep_mode:
        raise ConfigError("vllm_enable_sleep_mode frees vLLM's memory while the trainer updates: with max_staleness "
                          "> 0 the engine generates then; set one of them")
    return VLLMColocateEngine(spec.model, spec.tokenizer, options, concurrent=_asynchronous(spec))


def _run_session(spec: EngineSpec) -> str:
    """A label every rank of this run shares (rank 0's, broadcast): the server's weights are this
    run's only once rank 0 has uploaded them under it."""
    session = [uuid.uuid4().hex]
    if spec.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(session, src=0)
    return session[0]


@register_engine("vllm-server")
def _vllm_server(spec: EngineSpec) -> RolloutEngine:
    _no_fsdp2(spec)
    cfg = spec.config
    weights_bytes = sum(t.numel() * t.element_size() for t in spec.model.state_dict().values())
    engine = VLLMServerEngine(cfg.vllm_server_host, cfg.vllm_server_port, base_url=cfg.vllm_server_base_url,
                              server_timeout=cfg.vllm_server_timeout, request_timeout=cfg.request_timeout,
                              seed=spec.seed, rank=spec.rank, session=_run_session(spec),
                              weights_bytes=weights_bytes)
    try:
        engine.sync_weights(spec.model)  # the server may have started from other weights
    except BaseException:
        engine.close()
        raise
    return engine
