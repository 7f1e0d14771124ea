"""RLTrainer: the machinery every algorithm shares.

    prompts -> rollout (generate) -> rewards -> [compute_advantages] -> [update] -> metrics
            -> progress bar / metrics.jsonl / TensorBoard -> checkpoints -> final model + plots

An algorithm subclasses RLTrainer and fills in the hooks (marked HOOK below):
    setup()                 build extra models (reference, value model) once the policy exists
    compute_advantages(b)   put advantages on the Rollout
    update(b) -> dict       the optimisation step(s) on one rollout; returns its metrics
    extra_state() / load_extra_state(state)   anything else a checkpoint must carry
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import distributed as dist_utils
from . import checkpoint as ckpt
from .config import ConfigError, RLConfig
from .tracking import MetricsTracker

__all__ = ["RLTrainer", "Rollout", "RewardFunctionError", "PromptSampler"]


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable; names the function and the sample."""


# ----------------------------------------------------------------------------- data
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


def _rows(dataset) -> Any:
    """A list of dicts, or a datasets.Dataset (indexable, rows are dicts)."""
    if isinstance(dataset, dict):
        raise TypeError("train_dataset: expected a datasets.Dataset or a list of dicts, got a dict "
                        "(a DatasetDict? pick a split, e.g. dataset['train'])")
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty")
    first = dataset[0]
    if not isinstance(first, dict) or "prompt" not in first:
        raise ValueError("train_dataset rows need a 'prompt' field (text or a list of chat messages)")
    return dataset


# ----------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """One step's samples. N = prompts * G completions, T = longest completion."""

    prompts: List[Any]                 # (N,) raw prompts (text or chat messages), each repeated G times
    completions: List[Any]             # (N,) decoded completions (text, or [assistant message])
    dataset_index: List[int]           # (N,) row of the dataset each sample came from
    columns: Dict[str, List[Any]]      # other dataset columns, aligned with the completions
    prompt_ids: torch.Tensor           # (N, P) left-padded
    prompt_mask: torch.Tensor          # (N, P)
    completion_ids: torch.Tensor       # (N, T)
    completion_mask: torch.Tensor      # (N, T) 1 up to and including the first EOS
    truncated: torch.Tensor            # (N,) bool: no EOS within max_completion_length
    group_size: int = 1
    rewards: Optional[torch.Tensor] = None            # (N,) float32, NaN = no reward
    rewards_per_func: Optional[torch.Tensor] = None   # (N, F)
    advantages: Optional[torch.Tensor] = None         # (N,) or (N, T)
    old_logps: Optional[torch.Tensor] = None          # (N, T)
    ref_logps: Optional[torch.Tensor] = None          # (N, T)
    extras: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def _is_conversational(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], dict)


def _set_dropout_zero(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _func_name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


class RLTrainer:
    """Base trainer. `config_class` is the dataclass of the algorithm's settings."""

    config_class = RLConfig
    algorithm = "base"
    # True when update() returns metrics already reduced over ranks (identical on every rank);
    # otherwise the base averages them over ranks
    update_metrics_reduced = False

    def __init__(self, model, reward_funcs, train_dataset, *, config: Optional[RLConfig] = None,
                 tokenizer=None, ref_model=None, peft_config=None,
                 callbacks: Optional[Sequence[Callable]] = None):
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"config: expected {self.config_class.__name__}, got {type(self.config).__name__}")
        cfg = self.config
        # torchrun with WORLD_SIZE > 1: join the process group (a plain run gets a world of one)
        self.dist = dist_utils.init_from_env(cfg.distributed, cfg.ddp_timeout)
        # the same seed on every rank until the model is wrapped: identical initialisation (LoRA...)
        self._seed_everything(cfg.seed)
        self.device = self._pick_device(cfg.device)

        self.model, self.tokenizer = self._load_model(model, tokenizer)
        if peft_config is not None:
            try:
                from peft import get_peft_model
            except ImportError as e:
                raise ImportError("peft_config was given but peft is not installed: pip install peft") from e
            self.model = get_peft_model(self.model, peft_config)
        self.is_peft = ckpt._is_peft(self.model)
        if cfg.disable_dropout:
            _set_dropout_zero(self.model)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            if hasattr(self.model, "config"):
                self.model.config.use_cache = False
        self.model.to(self.device)
        self._user_ref_model = ref_model

        self.train_dataset = _rows(train_dataset)
        self.reward_funcs, self.reward_names = self._prepare_reward_funcs(reward_funcs)
        weights = cfg.reward_weights
        if weights is None:
            weights = [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        self.sampler = PromptSampler(len(self.train_dataset), cfg.seed, cfg.shuffle_dataset)
        self._index_logits_to_keep: Optional[bool] = None  # learnt on the first policy forward
        self.callbacks = list(callbacks or [])
        self.setup()  # HOOK: reference / value models
        W = self.dist.world_size
        if self.prompts_per_step() % W:
            raise ConfigError(f"{self.prompts_per_step()} prompts per step (the global batch) cannot be split "
                              f"evenly over {W} processes: make it a multiple of the world size")
        if self.dist.mode == "fsdp2" and self.is_peft:
            raise ConfigError("distributed=fsdp2 with a PEFT adapter is not supported; use distributed=ddp")
        # the module gradient-carrying forwards go through: DDP wrapper, the FSDP2-sharded model, or
        # the model itself; self.model stays the unwrapped policy (generate, adapters, saving)
        self.wrapped_model = dist_utils.wrap_model(self.model, self.dist)
        if self.dist.enabled:  # from here on each rank samples its own completions
            self._seed_everything(cfg.seed + self.dist.rank)
        params = [p for p in self.trainable_parameters()]
        # the fused AdamW (one kernel over all parameters; CPU and CUDA) unless a parameter rules it out
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                           **({"fused": True} if fused else {}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda())
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self.num_tokens = 0
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.final_dir: Optional[str] = None
        self.plot_paths: List[str] = []
        self.last_checkpoint: Optional[str] = None

    # ------------------------------------------------------------------ HOOKS
    def setup(self) -> None:
        """HOOK: build what the algorithm needs besides the policy (called once, in __init__)."""

    def build_reference_model(self, needed: bool) -> None:
        """self.ref_model: a frozen copy of the policy (or the user's reference, a model or a
        local path) when `needed`; None otherwise, and with PEFT, where the reference is the
        base model with the adapter disabled (see _ref_context)."""
        self.ref_model = None
        if needed and not self.is_peft:
            ref = self._user_ref_model if self._user_ref_model is not None else copy.deepcopy(self.model)
            if isinstance(ref, str):
                from transformers import AutoModelForCausalLM

                ref = AutoModelForCausalLM.from_pretrained(ref, local_files_only=True)
            ref.eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self.ref_model = ref.to(self.device)
        self._user_ref_model = None

    def _ref_context(self):
        """Context in which self.model acts as the reference (PEFT: adapter disabled)."""
        if self.ref_model is None and self.is_peft:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def trainable_parameters(self):
        """HOOK: parameters the optimiser updates (the policy's, plus e.g. a value head)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def updates_per_step(self) -> int:
        """HOOK: optimiser steps per training step (the scheduler length is max_steps times this)."""
        return 1

    def prompts_per_step(self) -> int:
        """HOOK: distinct prompts sampled per step."""
        cfg = self.config
        return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps

    def generations_per_prompt(self) -> int:
        """HOOK: completions sampled per prompt."""
        return 1

    def compute_advantages(self, batch: Rollout) -> None:
        """HOOK: set batch.advantages (and any metrics in batch.extras['metrics'])."""
        raise NotImplementedError

    def update(self, batch: Rollout) -> Dict[str, float]:
        """HOOK: optimise on one rollout; returns metrics (loss, kl, entropy, clip ratios, grad_norm...)."""
        raise NotImplementedError

    def extra_state(self) -> Dict[str, Any]:
        """HOOK: extra things a checkpoint must hold (e.g. a value model's state)."""
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        """HOOK: restore what extra_state() returned."""

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

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _load_model(self, model, tokenizer):
        cfg = self.config
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            kwargs = dict(cfg.model_init_kwargs or {})
            kwargs.setdefault("local_files_only", True)
            if cfg.dtype != "auto":
                kwargs.setdefault("dtype", getattr(torch, cfg.dtype))
            else:
                kwargs.setdefault("dtype", "auto")
            name = str(model)
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        elif tokenizer is None:
            from transformers import AutoTokenizer

            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            if not name:
                raise ValueError("tokenizer: the model was given as an object without a name_or_path; pass tokenizer=")
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token: completions could never end")
        tokenizer.padding_side = "left"
        return model, tokenizer

    def _prepare_reward_funcs(self, reward_funcs):
        from ..rewards import RewardModel

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
        from transformers import AutoTokenizer

        name = getattr(model.config, "_name_or_path", None)
        if not name:
            raise ValueError("a reward model given without its tokenizer: pass (model, tokenizer) "
                             "or grpo_fast.rewards.RewardModel(model, tokenizer)")
        return AutoTokenizer.from_pretrained(name, local_files_only=True)

    def _lr_lambda(self):
        cfg = self.config
        total = cfg.max_steps * self.updates_per_step()
        warm = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total))

        def factor(i: int) -> float:
            if warm and i < warm:
                return (i + 1) / (warm + 1)
            if cfg.lr_scheduler_type == "constant":
                return 1.0
            progress = min(1.0, (i - warm) / max(1, total - warm))
            if cfg.lr_scheduler_type == "linear":
                return 1.0 - progress
            return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

        return factor

    # ------------------------------------------------------------------ rollout
    def _prompt_text(self, prompt) -> str:
        if _is_conversational(prompt):
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("a chat prompt (list of messages) needs a tokenizer with a chat_template")
            return self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected text or a list of chat messages, got {type(prompt).__name__}")
        return prompt

    def generation_kwargs(self) -> Dict[str, Any]:
        cfg = self.config
        kw = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                  max_new_tokens=cfg.max_completion_length, pad_token_id=self.tokenizer.pad_token_id,
                  eos_token_id=self.tokenizer.eos_token_id, repetition_penalty=cfg.repetition_penalty,
                  use_cache=True)
        if cfg.min_p is not None:
            kw["min_p"] = cfg.min_p
        return kw

    def _unwrapped(self):
        return self.model

    @torch.no_grad()
    def rollout(self, indices: List[int]) -> Rollout:
        """Sample G completions for each prompt (left padding, stop at EOS)."""
        from transformers import GenerationConfig

        G = self.generations_per_prompt()
        rows = [self.train_dataset[i] for i in indices]
        texts = [self._prompt_text(r["prompt"]) for r in rows]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                             add_special_tokens=False)
        prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
        L = self.config.max_prompt_length
        if L is not None and prompt_ids.shape[1] > L:  # keep the end of long prompts (as TRL)
            prompt_ids, prompt_mask = prompt_ids[:, -L:], prompt_mask[:, -L:]
        prompt_ids = prompt_ids.repeat_interleave(G, dim=0).to(self.device)     # (N, P)
        prompt_mask = prompt_mask.repeat_interleave(G, dim=0).to(self.device)   # (N, P)

        model = self._unwrapped()
        was_training = model.training
        model.eval()
        gen_config = GenerationConfig(**self.generation_kwargs())
        # FSDP2: every forward is a collective, so ranks keep stepping until all have finished
        synced = {"synced_gpus": True} if self.dist.enabled and self.dist.mode == "fsdp2" else {}
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config,
                             **synced)
        if was_training:
            model.train()
        completion_ids = out[:, prompt_ids.shape[1]:]                          # (N, T)
        N, T = completion_ids.shape
        is_eos = completion_ids == self.tokenizer.eos_token_id
        has_eos = is_eos.any(dim=1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full((N,), T, device=out.device))
        # every token up to and including the first EOS
        completion_mask = (torch.arange(T, device=out.device)[None, :] <= first_eos[:, None]).to(prompt_mask.dtype)
        truncated = ~has_eos

        lengths = completion_mask.sum(1).tolist()
        ids_list = [row[:n] for row, n in zip(completion_ids.tolist(), lengths)]
        decoded = self.tokenizer.batch_decode(ids_list, skip_special_tokens=True)
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        completions = [[{"role": "assistant", "content": t}] if _is_conversational(p) else t
                       for p, t in zip(prompts, decoded)]
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        return Rollout(prompts=prompts, completions=completions,
                       dataset_index=[i for i in indices for _ in range(G)], columns=columns,
                       prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                       completion_mask=completion_mask, truncated=truncated, group_size=G,
                       extras={"completion_ids_list": ids_list})

    def forward_logits(self, model, batch: Rollout, rows=slice(None)) -> torch.Tensor:
        """Logits of the completion tokens only: (n, T, V), the prompt's logits are never made."""
        prompt_ids, prompt_mask = batch.prompt_ids[rows], batch.prompt_mask[rows]
        completion_ids, completion_mask = batch.completion_ids[rows], batch.completion_mask[rows]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)             # (n, P + T)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        # positions as generate() gives them under left padding
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        P, T = prompt_ids.shape[1], completion_ids.shape[1]
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self._index_logits_to_keep is not False:
            # logits_to_keep as the positions P-1 .. P+T-2, the ones that predict the completion: the
            # same numbers as TRL's "T + 1, drop the last", but no wasted row, and the logits come out
            # contiguous (B, T, V), which the loss reads in one pass instead of per sequence
            keep = torch.arange(P - 1, P + T - 1, device=input_ids.device)
            try:
                logits = model(**kw, logits_to_keep=keep).logits
            except (TypeError, ValueError, RuntimeError, IndexError):
                logits = None
            if logits is not None and logits.shape[:2] == (input_ids.shape[0], T):
                self._index_logits_to_keep = True
                return logits                                                   # (n, T, V) predicts token t
            if self._index_logits_to_keep is True:
                raise RuntimeError("the model stopped accepting a tensor logits_to_keep")
            self._index_logits_to_keep = False  # this model takes only an int
        logits = model(**kw, logits_to_keep=T + 1).logits                       # (n, T + 1, V)
        return logits[:, :-1]                                                   # (n, T, V) predicts token t

    # ------------------------------------------------------------------ rewards
    def _call_reward(self, f, name: str, batch: Rollout, step: int, sel: Optional[List[int]] = None):
        ids = batch.extras["completion_ids_list"]
        pick = (lambda xs: xs) if sel is None else (lambda xs: [xs[i] for i in sel])
        return f(pick(batch.prompts), pick(batch.completions), pick(ids),
                 **{k: pick(v) for k, v in batch.columns.items()})

    def _sample_desc(self, batch: Rollout, i: int) -> str:
        p = batch.prompts[i]
        text = p if isinstance(p, str) else repr(p)
        if len(text) > 200:
            text = text[:200] + "..."
        return f"sample {i} of the step (dataset index {batch.dataset_index[i]}, prompt {text!r})"

    def compute_rewards(self, batch: Rollout, step: int) -> None:
        """Call every reward function; None -> NaN; weighted sum (NaN where every function gave None)."""
        N = len(batch)
        columns = []
        for j, (f, name) in enumerate(zip(self.reward_funcs, self.reward_names)):
            try:
                values = self._call_reward(f, name, batch, step)
            except Exception as e:
                raise self._locate_reward_failure(f, name, batch, step, e) from e
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
            columns.append(col)
        per_func = torch.tensor(columns, dtype=torch.float32).T.contiguous()      # (N, F)
        w = self.reward_weights
        weighted = per_func * w                                                  # (N, F)
        total = torch.nansum(weighted, dim=1)
        total[torch.isnan(per_func).all(dim=1)] = float("nan")
        batch.rewards_per_func, batch.rewards = per_func, total

    def _locate_reward_failure(self, f, name, batch, step, error) -> RewardFunctionError:
        # Call the function one sample at a time to find which one breaks it.
        for i in range(len(batch)):
            try:
                self._call_reward(f, name, batch, step, sel=[i])
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
        # per-group std over the rewards that exist (Bessel-corrected; groups of < 2 count as 0)
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
        state = {"step": self.global_step, "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(),
                 "sampler": self.sampler.state_dict(), "history": self.history, "num_tokens": self.num_tokens,
                 "config": self.config.to_dict(), "algorithm": self.algorithm, "extra": self.extra_state()}
        if not sharded:  # FSDP2: the optimiser state goes into the sharded files with the model
            state["optimizer"] = self.optimizer.state_dict()
        if self.dist.enabled:  # every rank's generators, so each rank resumes its own sampling exactly
            state["rng_per_rank"] = self.dist.all_gather_object(state["rng"])
            state["world_size"] = self.dist.world_size
            state["distributed"] = self.dist.mode
        return state

    def save_checkpoint(self) -> str:
        """Collective under torchrun: every rank calls it (rank 0 writes, FSDP2 ranks write their shards)."""
        self.last_checkpoint = ckpt.save_checkpoint(self.config.output_dir, self.global_step, self.model,
                                                    self.tokenizer, self._state(), self.config.save_total_limit,
                                                    dist=self.dist, optimizer=self.optimizer)
        return self.last_checkpoint

    def load_checkpoint(self, path: str) -> None:
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
            ckpt.load_model_weights(self.model, path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = int(state["step"])
        self.history = list(state["history"])
        self.num_tokens = int(state.get("num_tokens", 0))
        self.load_extra_state(state.get("extra", {}))
        per_rank = state.get("rng_per_rank")
        # last: nothing after it may draw random numbers
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            ckpt.set_rng_state(per_rank[self.dist.rank])
        elif not self.dist.enabled:
            ckpt.set_rng_state(state["rng"] if per_rank is None else per_rank[0])
        else:  # another world size: the weights, optimiser and data order carry over, sampling restarts
            if self.dist.is_main:
                print(f"[grpo_fast] {path} was written by {saved_world} process(es), this run has "
                      f"{self.dist.world_size}: random generators reseeded per rank")
            self._seed_everything(self.config.seed + 1_000_003 * self.global_step + self.dist.rank)
        self.last_checkpoint = path

    # ------------------------------------------------------------------ the loop
    def train(self) -> List[Dict[str, Any]]:
        """Train for config.max_steps steps; returns the metrics history (one dict per logged step)."""
        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True)
        resume = ckpt.resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        main = self.dist.is_main  # only rank 0 writes logs, the progress bar, plots and the final model
        if main:
            cfg.to_yaml(os.path.join(cfg.output_dir, "config.yaml"))
        tracker = MetricsTracker(cfg.output_dir, max_steps=cfg.max_steps, start_step=self.global_step,
                                 history=self.history, report_to=cfg.report_to, disable_tqdm=cfg.disable_tqdm,
                                 desc=self.algorithm, enabled=main)
        stopped = False
        try:
            while self.global_step < cfg.max_steps:
                metrics = self.training_step()
                tracker.advance()
                if self.global_step % cfg.logging_steps == 0 or self.global_step == cfg.max_steps:
                    self.history.append(metrics)
                    tracker.log(metrics)
                stop = self.dist.any(any(bool(cb(self, metrics)) for cb in self.callbacks))
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
        t0 = time.perf_counter()
        # every rank draws the same global prompts and keeps its own slice
        indices = self._local_indices(self.sampler.take(self.prompts_per_step()))
        batch = self.rollout(indices)
        t_gen = time.perf_counter() - t0
        self.compute_rewards(batch, self.global_step + 1)
        self.compute_advantages(batch)
        update_metrics = self.update(batch)
        if not self.update_metrics_reduced:
            update_metrics = self.dist.mean_metrics(update_metrics)
        self.global_step += 1
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
        metrics["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        metrics["num_tokens"] = self.num_tokens
        metrics["tokens_per_s"] = tokens / dt
        metrics["generation_time"] = t_gen
        metrics["step_time"] = dt
        return metrics

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
            from ..plot import plot_run

            self.plot_paths = plot_run(self.config.output_dir)
        except ImportError as e:  # matplotlib missing: the JSONL has the numbers
            print(f"[grpo_fast] plots skipped: {e}")
            self.plot_paths = []
        return self.plot_paths
