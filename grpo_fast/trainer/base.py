"""RLTrainer: the loop and what every algorithm shares around it.

    prompts -> rollout (engine) -> rewards -> [compute_advantages] -> [update] -> metrics
            -> progress bar / metrics.jsonl / TensorBoard -> checkpoints -> final model + plots

Construction is two explicit phases, so nothing runs on a half-built object:
  1. RLTrainer.__init__ builds what every algorithm needs: the process group, the device, the
     trainer's random state, the policy and tokenizer, the data, the reward functions and the
     rollout engine. It calls no method a subclass overrides.
  2. The algorithm's __init__ then builds what it uses (reference model, critic, the DDP/FSDP2
     wrapper or a plain broadcast, optimiser, scheduler) with the helpers below.

An algorithm implements:
    compute_advantages(batch) -> Rollout   a new Rollout with advantages (and derived fields)
    update(batch) -> dict                  the optimisation on one rollout; returns its metrics
and, when it keeps more state than the policy and its optimiser:
    extra_state() / load_extra_state(state, path) / save_extra_files(dir)
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import functools
import inspect
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from transformers import AutoTokenizer, TrainerCallback, TrainerControl, TrainerState

from ..ops import policy_loss, policy_loss_from_hidden, selective_log_softmax, selective_log_softmax_from_hidden
from ..rewards import RewardModel
from ..rl import rollout_importance_weights, rollout_logp_mismatch
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import ConfigError, RLConfig
from .engine import HFEngine, RolloutEngine, SamplingSettings, left_pad, right_pad
from .vllm_engine import VLLMColocateEngine, VLLMOptions, VLLMServerEngine
from .plot import plot_run
from .policy import (accepts_index_logits_to_keep, forward_logits, fused_head_for, is_peft, load_policy,
                     set_dropout_zero, unwrap)
from .rollout import PromptSampler, Rollout, check_dataset, is_conversational
from .tracking import CompletionLog, MetricsTracker

__all__ = ["RLTrainer", "RewardFunctionError", "TrainerRNG", "resolve_alias"]


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable; names the function and the sample."""


class NonFiniteUpdateError(RuntimeError):
    """config.max_consecutive_nonfinite updates in a row had a non-finite loss or gradient norm."""


def is_async_callable(f) -> bool:
    """`async def` functions, partials of them, and objects whose __call__ is `async def`."""
    while isinstance(f, functools.partial):
        f = f.func
    return inspect.iscoroutinefunction(f) or inspect.iscoroutinefunction(getattr(f, "__call__", None))


class _AsyncRunner:
    """Awaits reward coroutines concurrently (asyncio.gather) on a private event loop: in this
    thread, or in a worker thread when this thread already runs a loop (Jupyter, async apps),
    where run_until_complete would fail. The loop lives as long as the trainer, so clients bound
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


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _func_name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def resolve_alias(name: str, value, alias: str, alias_value):
    """A constructor argument that TRL spells differently (config / args, tokenizer / processing_class)."""
    if value is not None and alias_value is not None and value is not alias_value:
        raise TypeError(f"give {name}= or {alias}= (TRL's name for it), not both")
    return value if value is not None else alias_value


class RLTrainer:
    """Base trainer. `config_class` is the dataclass of the algorithm's settings."""

    config_class = RLConfig
    algorithm = "base"
    # True when update() returns metrics already reduced over ranks (identical on every rank);
    # otherwise the base averages them over ranks
    update_metrics_reduced = False

    def __init__(self, model, reward_funcs=None, train_dataset=None, *, config: Optional[RLConfig] = None,
                 args: Optional[RLConfig] = None, tokenizer=None, processing_class=None, peft_config=None,
                 callbacks: Optional[Sequence[Callable]] = None, engine: Optional[RolloutEngine] = None,
                 eval_dataset=None):
        # TRL spells two of these differently: args (config) and processing_class (tokenizer)
        config = resolve_alias("config", config, "args", args)
        tokenizer = resolve_alias("tokenizer", tokenizer, "processing_class", processing_class)
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            kind = type(self.config)
            raise TypeError(f"config: expected grpo_fast's {self.config_class.__name__}, got {kind.__module__}."
                            f"{kind.__name__}" + (" (import the config from grpo_fast as well: from grpo_fast import "
                                                  f"{self.config_class.__name__})" if kind.__module__.startswith("trl")
                                                  else ""))
        cfg = self.config
        # a folder we cannot write to fails now, not after the model has loaded and a step has run
        ckpt.check_writable(cfg.output_dir)
        # torchrun with WORLD_SIZE > 1: join the process group (a plain run gets a world of one)
        self.dist = dist_utils.init_from_env(cfg.distributed, cfg.ddp_timeout)
        W = self.dist.world_size
        if cfg.prompts_per_step % W:
            raise ConfigError(f"{cfg.prompts_per_step} prompts per step (the global batch) cannot be split "
                              f"evenly over {W} processes: make it a multiple of the world size")
        self.device = self._pick_device(cfg.device)
        # the same seed on every rank until the policy is replicated: identical initialisation (LoRA...)
        self.rng = TrainerRNG(cfg.seed, self.device)

        self.model, self.tokenizer = load_policy(model, tokenizer, dtype=cfg.dtype,
                                                 model_init_kwargs=cfg.model_init_kwargs)
        if peft_config is not None:
            try:
                from peft import get_peft_model
            except ImportError as e:
                raise ImportError("peft_config was given but peft is not installed: pip install peft") from e
            with self.rng.scope():  # the adapter's initialisation draws from the trainer's seed
                self.model = get_peft_model(self.model, peft_config)
        self.is_peft = is_peft(self.model)
        if cfg.disable_dropout:
            set_dropout_zero(self.model)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            if hasattr(self.model, "config"):
                self.model.config.use_cache = False
        self.model.to(self.device)
        # decided once from the forward's signature (never by catching errors of a real forward)
        self.index_logits_to_keep = accepts_index_logits_to_keep(self.model)

        self.train_dataset = check_dataset(train_dataset)
        # held-out prompts evaluated every eval_steps (eval_strategy=steps), as TRL's eval_dataset
        self.eval_dataset = None if eval_dataset is None else check_dataset(eval_dataset, "eval_dataset")
        if cfg.eval_strategy != "no" and self.eval_dataset is None:
            raise ConfigError(f"eval_strategy={cfg.eval_strategy!r} needs an eval_dataset (the trainer's argument)")
        self.reward_funcs, self.reward_names = self._prepare_reward_funcs(reward_funcs)
        weights = cfg.reward_weights
        if weights is None:
            weights = [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.sampler = PromptSampler(len(self.train_dataset), cfg.seed, cfg.shuffle_dataset)
        # the fused LM head (log-probs and loss from hidden states, no logits), checked once on a short input
        self.fused_head = self._fused_head_of(self.model) if cfg.fused_lm_head else None
        self.ref_fused_head = None
        self.engine = engine if engine is not None else self._build_engine()
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if isinstance(cb, type) and issubclass(cb, TrainerCallback):
                raise TypeError(f"callbacks: {cb.__name__} is a class; pass an instance, {cb.__name__}()")
            if not (isinstance(cb, TrainerCallback) or callable(cb)):
                raise TypeError(f"callbacks: {cb!r} is neither a transformers.TrainerCallback nor a callable "
                                "cb(trainer, metrics) -> bool")
        # what TRL hands reward functions (trainer_state) and TrainerCallbacks (state, control)
        self.state = TrainerState(max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
                                  save_steps=cfg.save_steps, is_world_process_zero=self.dist.is_main)
        self.control = TrainerControl()
        self._async = _AsyncRunner()
        self._reward_metrics: Dict[str, List[float]] = {}
        self._reward_extra: Dict[str, List[Any]] = {}
        self._nonfinite_run = 0          # consecutive skipped updates
        self._skipped_in_step = 0
        self._last_no_signal_warning: Optional[int] = None

        # built by the algorithm (phase 2)
        self.ref_model = None
        self.wrapped_model = self.model
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None

        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self.num_tokens = 0
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.final_dir: Optional[str] = None
        self.last_batch: Optional[Rollout] = None
        self.plot_paths: List[str] = []
        self.last_checkpoint: Optional[str] = None

    def _build_engine(self) -> RolloutEngine:
        """HF generate, or vLLM (use_vllm): in-process (colocate; one engine per rank under torchrun)
        or a client of `grpo-fast vllm-serve` (server)."""
        cfg = self.config
        if not cfg.use_vllm:
            return HFEngine(self.model, eos_token_id=self.tokenizer.eos_token_id,
                            pad_token_id=self.tokenizer.pad_token_id, device=self.device,
                            synced_gpus=self.dist.enabled and self.dist.mode == "fsdp2")
        if self.dist.enabled and self.dist.mode == "fsdp2":
            raise ConfigError("use_vllm with distributed=fsdp2 is not supported (the engine needs the full "
                              "weights on every rank); use distributed=ddp")
        seed = cfg.seed + 7919 * self.dist.rank  # each rank samples its own completions
        if cfg.vllm_mode == "server":
            engine = VLLMServerEngine(cfg.vllm_server_host, cfg.vllm_server_port, base_url=cfg.vllm_server_base_url,
                                      server_timeout=cfg.vllm_server_timeout, seed=seed)
            engine.sync_weights(self.model)  # the server may have started from other weights
            return engine
        # the engine runs in the policy's dtype, so its log-probs are the trainer's (exactly, in fp32)
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        options = VLLMOptions(dtype=dtype, max_model_len=cfg.vllm_max_model_length,
                              gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                              kv_cache_gib=cfg.vllm_kv_cache_gib, enable_sleep_mode=cfg.vllm_enable_sleep_mode,
                              seed=seed, max_num_seqs=max(cfg.completions_per_step, 1))
        return VLLMColocateEngine(self.model, self.tokenizer, options)

    # ------------------------------------------------------------------ phase-2 helpers
    def build_reference_model(self, needed: bool, ref_model=None):
        """A frozen copy of the policy (or the user's reference, a model or a local path) when
        `needed`; None otherwise, and with PEFT, where the reference is the base model with the
        adapter disabled (see ref_context)."""
        if not needed or self.is_peft:
            return None
        ref = ref_model if ref_model is not None else copy.deepcopy(self.model)
        if isinstance(ref, (str, os.PathLike)):
            ref, _ = load_policy(ref, self.tokenizer, dtype=self.config.dtype)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        ref = ref.to(self.device)
        if self.config.fused_lm_head:
            self.ref_fused_head = self._fused_head_of(ref, name="reference model")
        return ref

    def ref_context(self):
        """Context in which self.model acts as the reference (PEFT: adapter disabled)."""
        if self.ref_model is None and self.is_peft:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _per_rank_randomness(self) -> None:
        if self.dist.enabled:  # from here on each rank samples its own completions
            self.rng.reseed(self.config.seed + self.dist.rank)

    def wrap_policy(self):
        """The module gradient-carrying forwards go through: the DDP wrapper, the FSDP2-sharded
        model, or the model itself; self.model stays the unwrapped policy (sampling, adapters, saving)."""
        if self.dist.mode == "fsdp2" and self.dist.enabled and self.is_peft:
            raise ConfigError("distributed=fsdp2 with a PEFT adapter is not supported; use distributed=ddp")
        wrapped = dist_utils.wrap_model(self.model, self.dist)
        self._per_rank_randomness()
        return wrapped

    def replicate_policy(self) -> None:
        """For algorithms that average gradients themselves (their loss spans modules outside a
        DDP wrapper): rank 0's policy weights to every rank, no wrapper."""
        if self.dist.enabled:
            if self.dist.mode != "ddp":
                raise ConfigError(f"{type(self).__name__} under torchrun supports distributed=ddp, not "
                                  f"{self.dist.mode!r}")
            dist_utils.broadcast_module(self.model)
        self._per_rank_randomness()

    def build_optimizer(self, params, lr: Optional[float] = None) -> torch.optim.Optimizer:
        """AdamW with the config's betas, eps and weight decay; fused unless a parameter rules it out."""
        cfg = self.config
        params = list(params)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=cfg.learning_rate if lr is None else lr,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                 weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))

    def build_scheduler(self, optimizer, total_updates: int):
        """Linear warm-up, then constant, linear or cosine decay over `total_updates` optimiser steps."""
        cfg = self.config
        warm = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_updates))

        def factor(i: int) -> float:
            if warm and i < warm:
                return (i + 1) / (warm + 1)
            if cfg.lr_scheduler_type == "constant":
                return 1.0
            progress = min(1.0, (i - warm) / max(1, total_updates - warm))
            if cfg.lr_scheduler_type == "linear":
                return 1.0 - progress
            return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # ------------------------------------------------------------------ what an algorithm implements
    def trainable_parameters(self):
        """Parameters of the policy that train (all, or the adapter's under PEFT)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def compute_advantages(self, batch: Rollout) -> Rollout:
        """A new Rollout with advantages (and any metrics in extras['metrics'])."""
        raise NotImplementedError

    def update(self, batch: Rollout) -> Dict[str, float]:
        """Optimise on one rollout; returns metrics (loss, kl, entropy, clip ratios, grad_norm...)."""
        raise NotImplementedError

    def extra_state(self) -> Dict[str, Any]:
        """Extra tensors / numbers a checkpoint's trainer_state.pt must hold."""
        return {}

    def load_extra_state(self, state: Dict[str, Any], path: str) -> None:
        """Restore what extra_state() and save_extra_files() wrote into checkpoint `path`."""

    def save_extra_files(self, directory: str) -> None:
        """Write extra files (e.g. the critic's weights) into a checkpoint directory being built."""

    # ------------------------------------------------------------------ setup helpers
    def _pick_device(self, spec: Optional[str]) -> torch.device:
        if self.dist.enabled and torch.cuda.is_available() and spec in (None, "cuda"):
            return torch.device("cuda", self.dist.local_rank)   # one GPU per rank
        return torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _local_indices(self, indices: List[int]) -> List[int]:
        """This rank's contiguous slice of the step's global prompts (whole groups per rank)."""
        W, r = self.dist.world_size, self.dist.rank
        k = len(indices) // W
        return indices[r * k:(r + 1) * k]

    def _prepare_reward_funcs(self, reward_funcs):
        if reward_funcs is None:
            raise ValueError("reward_funcs: give at least one reward function or reward model")
        if isinstance(reward_funcs, tuple) and len(reward_funcs) == 2 and isinstance(reward_funcs[0], torch.nn.Module):
            reward_funcs = [reward_funcs]                 # one (reward model, tokenizer) pair
        elif callable(reward_funcs) or isinstance(reward_funcs, str):
            reward_funcs = [reward_funcs]
        reward_funcs = list(reward_funcs)
        funcs, names = [], []
        for f in reward_funcs:
            if isinstance(f, tuple) and len(f) == 2 and isinstance(f[0], torch.nn.Module):  # (model, tokenizer)
                f = RewardModel(f[0], f[1])
            elif isinstance(f, str):                          # local reward-model directory
                f = RewardModel(f)
            elif isinstance(f, torch.nn.Module) and not isinstance(f, RewardModel):
                f = RewardModel(f, self._reward_tokenizer_for(f))
            if isinstance(f, RewardModel):
                f.model.to(self.device)
            if not callable(f):
                raise TypeError(f"reward_funcs: {f!r} is not callable")
            funcs.append(f)
            name = _func_name(f)
            while name in names:
                name += "_"
            names.append(name)
        if not funcs:
            raise ValueError("reward_funcs: give at least one reward function or reward model")
        return funcs, names

    @staticmethod
    def _reward_tokenizer_for(model):
        name = getattr(model.config, "_name_or_path", None)
        if not name:
            raise ValueError("a reward model given without its tokenizer: pass (model, tokenizer) "
                             "or grpo_fast.rewards.RewardModel(model, tokenizer)")
        return AutoTokenizer.from_pretrained(name, local_files_only=True)

    # ------------------------------------------------------------------ rollout
    def _prompt_text(self, prompt) -> str:
        if is_conversational(prompt):
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("a chat prompt (list of messages) needs a tokenizer with a chat_template")
            return self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected text or a list of chat messages, got {type(prompt).__name__}")
        return prompt

    def sampling_settings(self) -> SamplingSettings:
        cfg = self.config
        return SamplingSettings(n=cfg.num_generations, max_tokens=cfg.max_completion_length,
                                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                                repetition_penalty=cfg.repetition_penalty)

    def rollout(self, indices: List[int], dataset=None, settings: Optional[SamplingSettings] = None) -> Rollout:
        """Sample G completions for each prompt through the engine (stop at EOS); rows of
        `dataset` (default train_dataset) with `settings` (default the training ones)."""
        settings = settings or self.sampling_settings()
        G = settings.n
        dataset = self.train_dataset if dataset is None else dataset
        rows = [dataset[i] for i in indices]
        texts = [self._prompt_text(r["prompt"]) for r in rows]
        prompt_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        L = self.config.max_prompt_length
        if L is not None:  # keep the end of long prompts (as TRL)
            prompt_ids = [p[-L:] for p in prompt_ids]
        gen = self.engine.generate(prompt_ids, settings)
        pad = self.tokenizer.pad_token_id
        p_ids, p_mask = left_pad(prompt_ids, pad, self.device)
        p_ids, p_mask = p_ids.repeat_interleave(G, dim=0), p_mask.repeat_interleave(G, dim=0)   # (N, P)
        ids_list = [list(c) for c in gen.completion_ids]
        completion_ids = right_pad(ids_list, pad, device=self.device)                          # (N, T)
        completion_mask = right_pad([[1] * len(c) for c in ids_list], 0, dtype=p_mask.dtype,
                                    device=self.device, width=completion_ids.shape[1])
        truncated = torch.tensor([r != "stop" for r in gen.finish_reasons], device=self.device)
        engine_logps = None
        if gen.logprobs is not None:
            engine_logps = right_pad(gen.logprobs, 0.0, dtype=torch.float32, device=self.device,
                                     width=completion_ids.shape[1])
        decoded = self.tokenizer.batch_decode(ids_list, skip_special_tokens=True)
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        completions = [[{"role": "assistant", "content": t}] if is_conversational(p) else t
                       for p, t in zip(prompts, decoded)]
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        return Rollout(prompts=prompts, completions=completions, completion_ids_list=ids_list,
                       dataset_index=[i for i in indices for _ in range(G)], columns=columns,
                       prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=completion_ids,
                       completion_mask=completion_mask, truncated=truncated, group_size=G,
                       engine_logps=engine_logps)

    def forward_logits(self, model, batch: Rollout, rows=slice(None)) -> torch.Tensor:
        """Logits of the completion tokens only: (n, T, V), the prompt's logits are never made."""
        return forward_logits(model, batch, rows, index_logits_to_keep=self.index_logits_to_keep)

    # ------------------------------------------------------------------ log-probs and losses
    def _fused_head_of(self, model, name: str = "policy"):
        ids = self.tokenizer(self._prompt_text(self.train_dataset[0]["prompt"]), add_special_tokens=False)["input_ids"]
        check = torch.tensor([ids[-16:] or [self.tokenizer.eos_token_id]], device=self.device)   # (1, L)
        head, why = fused_head_for(model, dist=self.dist, index_logits_to_keep=self.index_logits_to_keep,
                                   check_ids=check)
        if head is None and self.dist.is_main:
            print(f"[grpo_fast] fused_lm_head: the {name} computes logits instead: {why}")
        return head

    def head_for(self, model):
        """The FusedHead to use for `model` (the policy, its wrapper, or the reference), or None."""
        if self.fused_head is not None and unwrap(model) is unwrap(self.model):
            return self.fused_head
        if self.ref_fused_head is not None and model is self.ref_model:
            return self.ref_fused_head
        return None

    def token_logps(self, model, batch: Rollout, rows=slice(None)) -> torch.Tensor:
        """(n, T) float32 log-probs of the completion tokens under `model` at the sampling temperature."""
        return self.logps_from(model, self.features(model, batch, rows), batch.completion_ids[rows])

    def engine_correction(self, batch: Rollout, trainer_logps: torch.Tensor):
        """With an engine that returns its log-probs (vLLM): the mismatch metrics every step, and with
        vllm_importance_sampling_correction the IS weights of the samples (TRL's definition,
        grpo_fast.rl.rollout_importance_weights). -> (weights or None, metrics)."""
        cfg = self.config
        if batch.engine_logps is None:
            return None, {}
        metrics = rollout_logp_mismatch(trainer_logps, batch.engine_logps, batch.completion_mask)
        if not cfg.vllm_importance_sampling_correction:
            return None, metrics
        weights, more = rollout_importance_weights(
            trainer_logps, batch.engine_logps, batch.completion_mask, cfg.vllm_importance_sampling_mode,
            cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max)
        metrics.update(more)
        return weights, metrics

    def features(self, model, batch: Rollout, rows=slice(None)) -> torch.Tensor:
        """What the loss of `model` starts from: the last hidden states (n, T, H) when it has a fused
        head, else the completion logits (n, T, V)."""
        head = self.head_for(model)
        return head.hidden(model, batch, rows) if head is not None else self.forward_logits(model, batch, rows)

    def logps_from(self, model, features: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """(n, T) log-probs from features(model, ...)."""
        head, t = self.head_for(model), self.config.temperature
        if head is not None:
            return selective_log_softmax_from_hidden(features, token_ids=token_ids, temperature=t,
                                                     **head.head_args(model))
        return selective_log_softmax(features, token_ids, t)

    def policy_loss_of(self, model, batch: Rollout, rows, advantages, mask, features=None, **options):
        """policy_loss of `model` on rows of the batch: from the hidden states through the fused head,
        else from the logits, whose gradient is then written into the logits tensor itself
        (inplace_grad: they are not needed afterwards). `features` when the caller has them already."""
        ids = batch.completion_ids[rows]
        if features is None:
            features = self.features(model, batch, rows)                       # (n, T, H) or (n, T, V)
        head = self.head_for(model)
        if head is not None:
            return policy_loss_from_hidden(features, token_ids=ids, advantages=advantages, mask=mask,
                                           **head.head_args(model), **options)
        return policy_loss(features, ids, advantages, mask, inplace_grad=True, **options)

    # ------------------------------------------------------------------ rewards
    def _call_reward(self, f, name: str, batch: Rollout, step: int, sel: Optional[List[int]] = None):
        """f called as TRL calls it: keywords only (prompts, completions, completion_ids, each
        dataset column, trainer_state, log_extra, log_metric). May return an awaitable."""
        pick = (lambda xs: xs) if sel is None else (lambda xs: [xs[i] for i in sel])
        kwargs = {k: pick(v) for k, v in batch.columns.items()}
        if sel is None:
            kwargs.update(trainer_state=self.state, log_extra=self._log_reward_extra, log_metric=self._log_reward_metric)
        else:  # locating a failure: what the function logs then is not the step's
            kwargs.update(trainer_state=self.state, log_extra=lambda column, values: None,
                          log_metric=lambda name, value: None)
        return f(prompts=pick(batch.prompts), completions=pick(batch.completions),
                 completion_ids=pick(batch.completion_ids_list), **kwargs)

    def _log_reward_metric(self, name: str, value: float) -> None:
        """log_metric(name, value) of a reward function: averaged over the step, into its metrics."""
        self._reward_metrics.setdefault(str(name), []).append(float(value))

    def _log_reward_extra(self, column: str, values: Sequence[Any]) -> None:
        """log_extra(column, values) of a reward function: one value per completion of the step,
        kept in batch.extras['log_extra'] (the completion log's extra columns)."""
        self._reward_extra.setdefault(str(column), []).extend(list(values))

    def _reward_values(self, name: str, values, batch: Rollout, step: int) -> List[float]:
        """A function's output -> floats. None and NaN mean no reward (NaN); +-inf is an error."""
        N = len(batch)
        if values is None or not hasattr(values, "__len__") or len(values) != N:
            got = "None" if values is None else (f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__)
            raise RewardFunctionError(f"reward function {name!r} returned {got} for {N} completions at step {step}")
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        try:
            col = [math.nan if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            i = next(i for i, v in enumerate(values) if v is not None and not _is_number(v))
            raise RewardFunctionError(f"reward function {name!r} returned {values[i]!r} (not a number or None) "
                                      f"for {self._sample_desc(batch, i)} at step {step}") from None
        for i, v in enumerate(col):
            if math.isinf(v):
                raise RewardFunctionError(f"reward function {name!r} returned {v} for {self._sample_desc(batch, i)} "
                                          f"at step {step}: rewards must be finite (None or NaN = no reward)")
        return col

    def _sample_desc(self, batch: Rollout, i: int) -> str:
        p = batch.prompts[i]
        text = p if isinstance(p, str) else repr(p)
        if len(text) > 200:
            text = text[:200] + "..."
        return f"sample {i} of the step (dataset index {batch.dataset_index[i]}, prompt {text!r})"

    def compute_rewards(self, batch: Rollout, step: int) -> Rollout:
        """Call every reward function (async ones concurrently); None/NaN -> NaN (no reward), +-inf
        raises; weighted sum (NaN where every function gave no reward)."""
        self.state.global_step = step - 1  # TRL's state during scoring: the steps done so far
        outputs: List[Any] = [None] * len(self.reward_funcs)
        pending = []                                                             # (j, awaitable)
        for j, (f, name) in enumerate(zip(self.reward_funcs, self.reward_names)):
            try:
                out = self._call_reward(f, name, batch, step)
            except Exception as e:
                raise self._locate_reward_failure(f, name, batch, step, e) from e
            if inspect.isawaitable(out):
                pending.append((j, out))
            else:
                outputs[j] = out
        if pending:
            results = self._async.gather([a for _, a in pending])
            for (j, _), res in zip(pending, results):
                if isinstance(res, BaseException):
                    if not isinstance(res, Exception):
                        raise res
                    raise self._locate_reward_failure(self.reward_funcs[j], self.reward_names[j], batch, step,
                                                      res) from res
                outputs[j] = res
        columns = [self._reward_values(name, out, batch, step) for name, out in zip(self.reward_names, outputs)]
        if self._reward_extra:
            batch.extras["log_extra"] = dict(self._reward_extra)
        per_func = torch.tensor(columns, dtype=torch.float32).T.contiguous()      # (N, F)
        w = self.reward_weights
        weighted = per_func * w                                                  # (N, F)
        total = torch.nansum(weighted, dim=1)
        total[torch.isnan(per_func).all(dim=1)] = float("nan")
        return batch.with_fields(rewards=total, rewards_per_func=per_func)

    def _locate_reward_failure(self, f, name, batch, step, error) -> RewardFunctionError:
        # Call the function one sample at a time to find which one breaks it.
        for i in range(len(batch)):
            try:
                out = self._call_reward(f, name, batch, step, sel=[i])
                if inspect.isawaitable(out):
                    res = self._async.gather([out])[0]
                    if isinstance(res, Exception):
                        raise res
            except Exception as e:
                return RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e} on "
                                           f"{self._sample_desc(batch, i)} at step {step}")
        return RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error} on the batch "
                                   f"of {len(batch)} completions at step {step} (first: {self._sample_desc(batch, 0)}); "
                                   "each sample alone succeeded")

    # ------------------------------------------------------------------ metrics
    def rollout_metrics(self, batch: Rollout) -> Dict[str, float]:
        """Reward / length statistics of the step's global batch (the same numbers on every rank)."""
        lengths = batch.completion_mask.sum(1).float()                           # (N,)
        rewards, per_func, truncated = batch.rewards, batch.rewards_per_func, batch.truncated
        if self.dist.enabled:  # 2 + F floats per completion: gather them and compute once, exactly
            local = torch.cat([rewards.float()[:, None], per_func.float(), lengths.cpu()[:, None],
                               truncated.float().cpu()[:, None]], dim=1)          # (N, F + 3)
            full = self.dist.all_gather(local)                                   # (W * N, F + 3)
            rewards, per_func = full[:, 0], full[:, 1:-2]
            lengths, truncated = full[:, -2], full[:, -1] > 0.5
        return self._reward_stats(rewards, per_func, lengths, truncated, batch.group_size)

    def _reward_stats(self, rewards, rewards_per_func, lengths, truncated, G: int) -> Dict[str, float]:
        m: Dict[str, float] = {}
        r = rewards.double()
        valid = ~torch.isnan(r)
        m["reward"] = float(r[valid].mean()) if valid.any() else float("nan")
        # per-group std over the rewards that exist (Bessel-corrected; groups of < 2 count as 0);
        # with G = 1 (PPO's default) there are no groups: the std of the whole batch
        if G == 1:
            G = r.numel()
        g, ok = torch.where(valid, r, 0.0).view(-1, G), valid.view(-1, G).double()
        n = ok.sum(1)
        mean = g.sum(1) / n.clamp(min=1)
        var = (((g - mean[:, None]) * ok) ** 2).sum(1) / (n - 1).clamp(min=1)
        std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
        m["reward_std"] = float(std.mean())
        m["frac_reward_zero_std"] = float((std == 0).double().mean())
        for j, name in enumerate(self.reward_names):
            col = rewards_per_func[:, j]
            ok = col[~torch.isnan(col)]
            m[f"rewards/{name}/mean"] = float(ok.mean()) if ok.numel() else float("nan")
            m[f"rewards/{name}/std"] = float(ok.std()) if ok.numel() > 1 else 0.0
        m["completion_length"] = float(lengths.mean())
        m["completion_length_min"] = float(lengths.min())
        m["completion_length_max"] = float(lengths.max())
        m["clipped_ratio"] = float(truncated.float().mean())
        return m

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> Dict[str, Any]:
        sharded = self.dist.enabled and self.dist.mode == "fsdp2"
        state = {"step": self.global_step, "rng": self.rng.state_dict(),
                 "sampler": self.sampler.state_dict(), "history": self.history, "num_tokens": self.num_tokens,
                 "config": self.config.to_dict(), "algorithm": self.algorithm, "extra": self.extra_state()}
        engine_state = getattr(self.engine, "state_dict", None)
        if callable(engine_state):  # e.g. the vLLM engines' sampling-seed generator
            state["engine"] = engine_state()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.optimizer is not None and not sharded:  # FSDP2: the optimiser state is in the sharded files
            state["optimizer"] = self.optimizer.state_dict()
        if self.dist.enabled:  # every rank's generators, so each rank resumes its own sampling exactly
            state["rng_per_rank"] = self.dist.all_gather_object(state["rng"])
            state["world_size"] = self.dist.world_size
            state["distributed"] = self.dist.mode
        return state

    def save_checkpoint(self) -> str:
        """Collective under torchrun: every rank calls it (rank 0 writes, FSDP2 ranks write their shards)."""
        bad = next((n for n, p in self.model.named_parameters()
                    if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())), None)
        if self.dist.any(bad is not None):
            raise NonFiniteUpdateError(f"step {self.global_step}: parameter {bad or '(on another rank)'} holds "
                                       "NaN/inf; no checkpoint written (the previous one is intact)")
        self.last_checkpoint = ckpt.save_checkpoint(self.config.output_dir, self.global_step, self.model,
                                                    self.tokenizer, self._state(), self.config.save_total_limit,
                                                    dist=self.dist, optimizer=self.optimizer,
                                                    write_extra=self.save_extra_files)
        return self.last_checkpoint

    def load_checkpoint(self, path: str) -> None:
        """Restore checkpoint `path`. An unreadable file raises ckpt.CorruptCheckpointError naming it.
        Settings that differ from the checkpoint's are listed in a warning; the optimiser's and the
        scheduler's state win, so the optimiser fields (learning_rate, betas, eps, weight decay) take
        the checkpoint's values in self.config (and config.yaml), the others the new ones."""
        with ckpt.reading(path, ckpt.STATE_FILE):
            state = ckpt.load_state(path)
        if state.get("algorithm", self.algorithm) != self.algorithm:
            raise ValueError(f"checkpoint {path} was written by the {state['algorithm']} trainer, not {self.algorithm}")
        saved_world = int(state.get("world_size", 1))
        if ckpt.is_sharded(path):
            if not (self.dist.enabled and self.dist.mode == "fsdp2") or saved_world != self.dist.world_size:
                raise ValueError(f"checkpoint {path} is an FSDP2 checkpoint sharded over {saved_world} processes: "
                                 f"resume it with distributed=fsdp2 on {saved_world} processes (this run: "
                                 f"{self.dist.mode} on {self.dist.world_size})")
            ckpt.load_sharded(path, self.model, self.optimizer)
        else:
            if self.dist.enabled and self.dist.mode == "fsdp2":
                raise ValueError(f"checkpoint {path} is not sharded: resume it with distributed=ddp")
            with ckpt.reading(path, "the model weights"):
                ckpt.load_model_weights(self.model, path)
            if self.optimizer is not None:
                with ckpt.reading(path, f"the optimiser state in {ckpt.STATE_FILE}"):
                    self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._reconcile_config(state.get("config") or {}, path)
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = int(state["step"])
        self.history = list(state["history"])
        self.num_tokens = int(state.get("num_tokens", 0))
        self.load_extra_state(state.get("extra", {}), path)
        if "engine" in state and callable(getattr(self.engine, "load_state_dict", None)):
            self.engine.load_state_dict(state["engine"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            self.rng.load_state_dict(per_rank[self.dist.rank])
        elif not self.dist.enabled:
            self.rng.load_state_dict(state["rng"] if per_rank is None else per_rank[0])
        else:  # another world size: the weights, optimiser and data order carry over, sampling restarts
            if self.dist.is_main:
                print(f"[grpo_fast] {path} was written by {saved_world} process(es), this run has "
                      f"{self.dist.world_size}: random generators reseeded per rank")
            self.rng.reseed(self.config.seed + 1_000_003 * self.global_step + self.dist.rank)
        self.last_checkpoint = path

    # settings whose value lives in the optimiser's state (param_groups) and the scheduler's base_lrs
    _OPTIMIZER_FIELDS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay")
    # where and how a run is driven, not what it trains
    _NOT_SETTINGS = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir", "device", "disable_tqdm",
                     "report_to", "plot")

    def _reconcile_config(self, saved: Dict[str, Any], path: str) -> None:
        now = self.config.to_dict()
        changed = [k for k in now if k in saved and k not in self._NOT_SETTINGS and saved[k] != now[k]]
        if not changed:
            return
        kept = {k: saved[k] for k in changed if k in self._OPTIMIZER_FIELDS}
        lines = [f"  {k}: {saved[k]!r} in the checkpoint, {now[k]!r} now -> "
                 + ("the checkpoint's (optimiser state)" if k in kept else "the new value") for k in changed]
        if self.dist.is_main:
            warnings.warn(f"resuming {path} with changed settings:\n" + "\n".join(lines)
                          + "\nconfig.yaml records the values in effect", RuntimeWarning, stacklevel=3)
        if kept:
            self.config = self.config.replace(**kept)

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint: Optional[str] = None) -> List[Dict[str, Any]]:
        """Train for config.max_steps steps; returns the metrics history (one dict per logged step).

        resume_from_checkpoint (TRL's train() argument): a checkpoint directory, or "latest"/True for
        the newest complete one in output_dir; overrides config.resume_from_checkpoint.

        The output folder is locked for the run (OUTPUT_DIR/.grpo_fast.lock, fcntl.flock: the OS
        drops it when the process dies). A folder that already holds a run is refused unless the
        run resumes or config.overwrite_output_dir clears it (docs/trl_migration.md, "Output folders").
        """
        lock, error = None, None
        if self.dist.is_main:
            try:
                lock = ckpt.OutputDirLock(self.config.output_dir)
            except ckpt.OutputDirError as e:
                error = e
        if self.dist.any(error is not None):  # rank 0 could not lock the folder: every rank stops
            raise error or ckpt.OutputDirError(f"output_dir {self.config.output_dir!r} is in use by another run")
        try:
            self._start_run(resume_from_checkpoint)
            history = self._train_loop()
            self._run_callbacks("on_train_end")
            return history
        finally:
            if lock is not None:
                lock.release()

    def _start_run(self, resume_from_checkpoint) -> None:
        """Check the output folder, then resume (newest loadable checkpoint) or start fresh."""
        cfg = self.config
        spec = resume_from_checkpoint if resume_from_checkpoint is not None else cfg.resume_from_checkpoint
        if isinstance(spec, bool):
            spec = "latest" if spec else None
        wants_resume = spec is not None and str(spec).lower() not in ("", "false", "none")
        error = None
        if self.dist.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            found = ckpt.previous_run(cfg.output_dir)
            if found and not wants_resume:
                if not cfg.overwrite_output_dir:
                    error = ckpt.OutputDirError(
                        f"output_dir {cfg.output_dir!r} already holds a run ({', '.join(found[:4])}"
                        f"{', ...' if len(found) > 4 else ''}): continue it with --resume_from_checkpoint latest "
                        "(resume_from_checkpoint='latest'), or start afresh with --overwrite_output_dir "
                        "(overwrite_output_dir=True, which deletes that run's files), or pick another output_dir")
                else:
                    ckpt.clear_run(cfg.output_dir)
        if self.dist.any(error is not None):  # every rank stops, not only rank 0
            raise error or ckpt.OutputDirError(f"output_dir {cfg.output_dir!r} already holds a run (see rank 0)")
        if wants_resume:
            self._resume(spec)
            self.engine.sync_weights(self.model)  # an engine with its own copy samples the resumed weights
        self._run_callbacks("on_train_begin")

    def _resume(self, spec) -> None:
        cfg = self.config
        candidates = ckpt.resume_candidates(spec, cfg.output_dir)
        if not candidates:
            if self.dist.is_main:
                warnings.warn(f"resume_from_checkpoint={spec!r}: no checkpoint in {cfg.output_dir!r}, starting fresh "
                              "from step 0", RuntimeWarning, stacklevel=3)
            return
        explicit = str(spec).lower() not in ("latest", "true", "last")
        for path in candidates:
            try:
                problem = ckpt.verify_checkpoint(path)
                if problem is not None:
                    raise ckpt.CorruptCheckpointError(problem)
                self.load_checkpoint(path)
                return
            except ckpt.CorruptCheckpointError as e:
                if explicit:
                    raise
                if self.dist.is_main:
                    warnings.warn(f"{e}; trying the next older checkpoint", RuntimeWarning, stacklevel=3)
        raise ckpt.CorruptCheckpointError(f"no checkpoint in {cfg.output_dir!r} could be loaded (each is named in a "
                                          "warning above); move them away to start fresh")

    def _run_callbacks(self, event: str, metrics: Optional[Dict[str, Any]] = None) -> bool:
        """transformers.TrainerCallback objects get `event` as the HF Trainer calls it (args is this
        trainer's config); plain callables cb(trainer, metrics) -> bool run at on_step_end. True:
        some callback asked to stop (control.should_training_stop or a True return)."""
        stop = False
        for cb in self.callbacks:
            if isinstance(cb, TrainerCallback):
                kwargs = {"logs": metrics} if event == "on_log" else {}
                out = getattr(cb, event)(self.config, self.state, self.control, model=self.model,
                                         processing_class=self.tokenizer, optimizer=self.optimizer,
                                         lr_scheduler=self.scheduler, **kwargs)
                if isinstance(out, TrainerControl):
                    self.control = out
            elif event == "on_step_end":
                stop = bool(cb(self, metrics)) or stop
        return stop or bool(self.control.should_training_stop)

    def _step_end_callbacks(self, metrics: Dict[str, Any]) -> bool:
        self.state.global_step = self.global_step
        self.state.epoch = self.sampler.epoch + self.sampler.position / self.sampler.size
        self.state.num_input_tokens_seen = self.num_tokens
        if self.history and self.history[-1] is metrics:  # a logging step
            self.state.log_history.append(dict(metrics))
            self._run_callbacks("on_log", metrics)
        return self._run_callbacks("on_step_end", metrics)

    def _train_loop(self) -> List[Dict[str, Any]]:
        cfg = self.config
        main = self.dist.is_main  # only rank 0 writes logs, the progress bar, plots and the final model
        if main:
            cfg.to_yaml(os.path.join(cfg.output_dir, "config.yaml"))
        tracker = MetricsTracker(cfg.output_dir, max_steps=cfg.max_steps, start_step=self.global_step,
                                 history=self.history, report_to=cfg.report_to, disable_tqdm=cfg.disable_tqdm,
                                 desc=self.algorithm, enabled=main)
        completion_log = CompletionLog(cfg.output_dir, start_step=self.global_step,
                                       enabled=main and cfg.log_completions)
        stopped = False
        try:
            if cfg.eval_strategy == "steps" and self.global_step == 0:  # the curve's starting point
                first = {"step": 0, **self.evaluate()}
                self.history.append(first)
                tracker.log(first)
            while self.global_step < cfg.max_steps:
                metrics = self.training_step()
                tracker.advance()
                logging_step = self.global_step % cfg.logging_steps == 0 or self.global_step == cfg.max_steps
                if cfg.log_completions and logging_step:  # collective: every rank's rows reach rank 0
                    completion_log.log(self.completion_rows(self.last_batch))
                eval_every = cfg.eval_steps or cfg.logging_steps
                if cfg.eval_strategy == "steps" and (self.global_step % eval_every == 0
                                                     or self.global_step == cfg.max_steps):
                    metrics.update(self.evaluate())
                    logging_step = True
                self.last_batch = None
                if logging_step:
                    self.history.append(metrics)
                    tracker.log(metrics)
                stop = self.dist.any(self._step_end_callbacks(metrics))
                if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step < cfg.max_steps:
                    self.save_checkpoint()
                if stop:
                    stopped = True
                    break
        finally:
            tracker.close()
        # reached only when no error was raised: a failing step never overwrites a checkpoint
        if self.last_checkpoint is None or not self.last_checkpoint.endswith(f"checkpoint-{self.global_step}"):
            self.save_checkpoint()
        if not stopped:
            if cfg.save_final_model:
                self.save_final()
            if cfg.plot and main:
                self.write_plots()
        self.dist.barrier()  # no rank returns before rank 0 has written everything
        return self.history

    def training_step(self) -> Dict[str, Any]:
        # what reward functions log (log_metric / log_extra) and skipped updates, for this step
        self._reward_metrics, self._reward_extra, self._skipped_in_step = {}, {}, 0
        with self.rng.scope():  # sampling and dropout draw from the trainer's random state
            metrics = self._training_step()
        metrics["skipped_updates"] = self._skipped_in_step
        for name, values in sorted(self._reward_metrics.items()):
            metrics[name] = sum(values) / len(values)
        return metrics

    def finite_update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the optimiser step may be taken: loss and gradient norm finite on every rank (one
        host sync per optimiser step). Otherwise the step is skipped with a warning and counted
        (skipped_updates); max_consecutive_nonfinite skips in a row raise NonFiniteUpdateError."""
        bad = not bool(torch.isfinite(loss.detach()).all() and torch.isfinite(grad_norm.detach()).all())
        if not self.dist.any(bad):
            self._nonfinite_run = 0
            return True
        self._nonfinite_run += 1
        self._skipped_in_step += 1
        step, n, limit = self.global_step + 1, self._nonfinite_run, self.config.max_consecutive_nonfinite
        if n >= limit:
            raise NonFiniteUpdateError(
                f"step {step}: {n} optimiser updates in a row had a non-finite loss or gradient norm "
                f"(max_consecutive_nonfinite={limit}); training stopped, the weights are those of the last "
                f"finite update and checkpoints hold finite weights only (lower learning_rate, check the rewards)")
        if self.dist.is_main:
            warnings.warn(f"step {step}: non-finite loss ({float(loss):.4g}) or gradient norm ({float(grad_norm):.4g}): "
                          f"optimiser step skipped ({n} in a row; {limit} stop training)", RuntimeWarning, stacklevel=2)
        return False

    def warn_if_no_signal(self, batch: Rollout) -> None:
        """One warning (at most every 50 steps) when a step's rewards cannot teach anything: every
        reward missing (None/NaN), or every group's rewards equal (zero std, G > 1)."""
        r = batch.rewards.double()
        valid = ~torch.isnan(r)
        none = not bool(valid.any())
        flat = False
        if not none and batch.group_size > 1:
            x, v = r.view(-1, batch.group_size), valid.view(-1, batch.group_size)
            hi = torch.where(v, x, -math.inf).amax(1)
            lo = torch.where(v, x, math.inf).amin(1)
            flat = bool(((hi <= lo) | (v.sum(1) < 2)).all())
        if self.dist.any(not (none or flat)):   # some rank has a learning signal
            return
        step = self.global_step + 1
        if self._last_no_signal_warning is not None and step - self._last_no_signal_warning < 50:
            return
        self._last_no_signal_warning = step
        if self.dist.is_main:
            why = ("every reward is None/NaN (no reward function scored any completion)" if none else
                   "every group's rewards are equal (zero std), so every advantage is 0")
            warnings.warn(f"step {step}: no learning signal: {why}; further such steps warn at most every 50 steps",
                          RuntimeWarning, stacklevel=2)

    def _training_step(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        batch, t_gen = self.sample_batch()
        batch = self.compute_advantages(batch)
        update_metrics = self.update(batch)
        if not self.update_metrics_reduced:
            update_metrics = self.dist.mean_metrics(update_metrics)
        self.engine.sync_weights(self.model)
        self.global_step += 1
        self.last_batch = batch if self.config.log_completions else None  # for the completion log
        dt = time.perf_counter() - t0
        tokens = int(batch.prompt_mask.sum() + batch.completion_mask.sum())
        if self.dist.enabled:  # global tokens; the slowest rank's times
            tokens = int(self.dist.sum_floats([tokens])[0])
            dt, t_gen = self.dist.all_reduce(torch.tensor([dt, t_gen], dtype=torch.float64), "max").tolist()
        self.num_tokens += tokens
        metrics: Dict[str, Any] = {"step": self.global_step}
        metrics.update(self.rollout_metrics(batch))
        metrics.update(update_metrics)
        metrics.update(self.dist.mean_metrics(batch.extras.get("metrics", {})))
        if self.scheduler is not None:
            metrics["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        metrics["num_tokens"] = self.num_tokens
        metrics["tokens_per_s"] = tokens / dt
        metrics["generation_time"] = t_gen
        metrics["step_time"] = dt
        return metrics

    # ------------------------------------------------------------------ completion logs
    def completion_rows(self, batch: Rollout) -> List[Dict[str, Any]]:
        """(step, prompt, completion, each reward, advantage) of the step's completions, every
        rank's (a collective under torchrun), the first num_completions_to_print of them."""
        adv = batch.advantages
        if adv is not None and adv.dim() == 2:   # per-token advantages (PPO): their mean over the completion
            m = batch.completion_mask.to(adv.dtype)
            adv = (adv * m).sum(1) / m.sum(1).clamp(min=1)
        rows = []
        for i in range(len(batch)):
            p = batch.prompts[i]
            c = batch.completions[i]
            rows.append({
                "step": self.global_step,
                "prompt": p if isinstance(p, str) else self._prompt_text(p),
                "completion": c if isinstance(c, str) else c[-1]["content"],
                "rewards": {n: float(batch.rewards_per_func[i, j]) for j, n in enumerate(self.reward_names)},
                "reward": float(batch.rewards[i]),
                "advantage": None if adv is None else float(adv[i]),
                # the reward functions' log_extra columns, one value per completion
                **{k: v[i] for k, v in batch.extras.get("log_extra", {}).items() if i < len(v)},
            })
        if self.dist.enabled:
            rows = [r for part in self.dist.all_gather_object(rows) for r in part]
        k = self.config.num_completions_to_print
        return rows if k is None else rows[:k]

    # ------------------------------------------------------------------ evaluation
    def eval_settings(self) -> SamplingSettings:
        """Greedy (top_k=1: the most likely token, through any engine) or sampled as in training
        with num_generations_eval completions per prompt."""
        cfg = self.config
        train = self.sampling_settings()
        if not cfg.eval_do_sample:
            return SamplingSettings(n=1, max_tokens=cfg.max_completion_length, temperature=1.0, top_p=1.0, top_k=1)
        return SamplingSettings(n=cfg.num_generations_eval or cfg.num_generations, max_tokens=train.max_tokens,
                                temperature=train.temperature, top_p=train.top_p, top_k=train.top_k,
                                min_p=train.min_p, repetition_penalty=train.repetition_penalty)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Generate on eval_dataset, score with the reward functions; returns eval_* metrics.

        Runs under its own forked random state seeded from (seed, step), so training's random
        stream is the same with or without evaluation. Under torchrun every rank evaluates the
        whole set (generation under FSDP2 is a collective) and the numbers are rank 0's.
        """
        cfg = self.config
        settings = self.eval_settings()
        k = settings.n
        per_batch = max(1, cfg.per_device_eval_batch_size // k)
        n = len(self.eval_dataset)
        rewards, per_func, lengths = [], [], []
        was_training = self.model.training
        with torch.random.fork_rng(devices=self.rng._devices()):
            torch.manual_seed(cfg.seed * 1_000_003 + self.global_step)
            for start in range(0, n, per_batch):
                batch = self.rollout(list(range(start, min(n, start + per_batch))), self.eval_dataset, settings)
                batch = self.compute_rewards(batch, self.global_step)
                rewards.append(batch.rewards.double())
                per_func.append(batch.rewards_per_func.double())
                lengths.append(batch.completion_mask.sum(1).double().cpu())
        self.model.train(was_training)
        r, pf, lengths = torch.cat(rewards), torch.cat(per_func), torch.cat(lengths)
        ok = ~torch.isnan(r)
        m: Dict[str, float] = {"eval_reward": float(r[ok].mean()) if ok.any() else math.nan}
        for j, name in enumerate(self.reward_names):
            col = pf[:, j][~torch.isnan(pf[:, j])]
            m[f"eval_rewards/{name}/mean"] = float(col.mean()) if col.numel() else math.nan
        m["eval_completion_length"] = float(lengths.mean())
        if k > 1:  # a prompt passes when one of its k completions has a total reward > 0
            passed = (torch.nan_to_num(r, nan=0.0) > 0).view(-1, k).any(1)
            m[f"eval_pass@{k}"] = float(passed.double().mean())
        return m

    def sample_batch(self):
        """The step's scored rollout and the seconds spent generating it: (Rollout with rewards, t_gen).
        Every rank draws the same global prompts and keeps its own slice. GRPO's dynamic sampling
        overrides this to draw more rounds."""
        t0 = time.perf_counter()
        indices = self._local_indices(self.sampler.take(self.config.prompts_per_step))
        batch = self.rollout(indices)
        t_gen = time.perf_counter() - t0
        return self.compute_rewards(batch, self.global_step + 1), t_gen

    def save_final(self) -> str:
        """Collective under torchrun (FSDP2 gathers the full weights); rank 0 writes."""
        path = os.path.join(self.config.output_dir, "final")
        model = self.model
        if self.dist.enabled and self.dist.mode == "fsdp2":
            state = ckpt.full_model_state(model)    # every rank takes part; rank 0 gets the tensors
            if self.dist.is_main:
                with ckpt.quiet_progress():
                    model.save_pretrained(path, state_dict=state, safe_serialization=True)
                    self.tokenizer.save_pretrained(path)
            self.final_dir = path
            return path
        if self.dist.is_main:
            if self.is_peft and hasattr(model, "merge_and_unload"):
                model = copy.deepcopy(model).merge_and_unload()
            with ckpt.quiet_progress():
                model.save_pretrained(path, safe_serialization=True)
                self.tokenizer.save_pretrained(path)
        self.final_dir = path
        return path

    def write_plots(self) -> List[str]:
        try:
            self.plot_paths = plot_run(self.config.output_dir)
        except ImportError as e:  # matplotlib missing: the JSONL has the numbers
            print(f"[grpo_fast] plots skipped: {e}")
            self.plot_paths = []
        return self.plot_paths
