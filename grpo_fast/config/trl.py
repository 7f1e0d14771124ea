"""TRL's field names: every field of TRL 1.16's GRPOConfig (and the TrainingArguments it inherits)
that is not a field here is mapped to ours (TRL_ALIASES) or refused by name (TRL_REFUSED), never
accepted and ignored. docs/trl_migration.md is the table of all of them; tests/test_trl_dropin.py
keeps the two in step with the installed trl.
"""
from __future__ import annotations

from typing import Any, Dict

from .coerce import ConfigError, truthy

__all__ = ["TRL_ALIASES", "TRL_REFUSED", "translate_trl_names"]


def _one_of(name: str, accepted, reason: str):
    def check(value):
        if value not in accepted:
            raise ConfigError(f"{name}={value!r}: TRL field not supported here with that value ({reason})")
        return {}
    return check



# TRL name -> function(value) -> {our field: value} (or ConfigError for a value we cannot honour)
TRL_ALIASES: Dict[str, Any] = {
    # the name transformers recommends over gradient_checkpointing with FSDP (a key of fsdp_config there)
    "activation_checkpointing": lambda value: {"gradient_checkpointing": True} if truthy(value) else {},
    "use_cpu": lambda value: {"device": "cpu"} if truthy(value) else {},
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
    "multi_objective_aggregation": (("sum_then_normalize", None),
                                    "rewards are summed with reward_weights, then normalised"),
    "sync_ref_model": (_OFF, "the reference model is fixed"),
    "ref_model_mixup_alpha": ((0.6, None), "the reference model is fixed"),
    "ref_model_sync_steps": ((512, None), "the reference model is fixed"),
    "log_multimodal": ((True, False, None), "text models only"),
    "log_unique_prompts": (_OFF, "not supported"),
    "log_completions_hub_repo": (_OFF, "no hub access"),
    "use_transformers_continuous_batching": (_OFF, "use use_vllm"),
    "transformers_continuous_batching_config": (_OFF, "use use_vllm"),
    "use_transformers_paged": (_OFF, "use use_vllm"),
}


def translate_trl_names(cls, values: Dict[str, Any]) -> Dict[str, Any]:
    """TRL's field names in `values` -> ours (TRL_ALIASES); a TRL field not supported here raises
    ConfigError naming it (TRL_REFUSED), unless its value asks for what happens here anyway.
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
        else:
            out[name] = value  # unknown: the dataclass raises its TypeError
    for ours, (name, v) in mapped.items():
        if ours in out and out[ours] != v:
            raise ConfigError(f"{name} asks for {ours}={v!r} but {ours}={out[ours]!r} was given")
        out[ours] = v
    # TRL's value forms of fields we share
    for name in ("bf16", "fp16"):  # TRL's None: "not set" (TRL then turns bf16 on unless fp16; here off)
        if name in out and out[name] is None:
            del out[name]
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
