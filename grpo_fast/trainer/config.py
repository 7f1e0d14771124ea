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
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

__all__ = ["ConfigError", "CriticConfig", "GRPOConfig", "PPOConfig", "RLConfig", "TRPOConfig"]


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


def _field_doc(cls, name: str) -> str:
    return cls._DOCS.get(name, "")


@dataclass
class RLConfig:
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
    plot: bool = True
    """Write PNG plots of the metric curves to OUTPUT_DIR/plots at the end."""
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
        unknown = [k for k in values if k not in known]
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
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value")
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
    """Entropy bonus weight (0: none)."""

    _CHOICES = dict(RLConfig._CHOICES, **{
        "kl_estimator": ("k1", "k2", "k3"),
        "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
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
