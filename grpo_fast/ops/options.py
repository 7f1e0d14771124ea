"""The options of `policy_loss`, validated once, travelling together as one dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_LEVELS = ("token", "sequence")
# the importance_sampling_level a loss type is defined at, and why (TRL 1.16 only warns; we refuse the other)
_REQUIRED_IS_LEVEL = {
    "luspo": ("sequence", "LUSPO is GSPO's per-sequence loss scaled by the sequence length"),
    "vespo": ("token", "VESPO forms its own sequence weight from the summed token log-ratios, so 'sequence' would "
                       "change only the ratio of the KL bias correction"),
}
_VESPO_MIN_LAMBDA = 1e-4  # TRL's floor of the gamma weight's decay


def option(default, doc: str):
    """A LossOptions field with a one-line description for users (read by the trainer config)."""
    return field(default=default, metadata={"doc": doc})


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _check_number(name: str, value, *, low=None, low_open=False, allow_none=False) -> None:
    if value is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a number, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}={value!r}: expected {'>' if low_open else '>='} {low}")


def _check_positive_tensor(name: str, n) -> None:
    """A one-element tensor must be finite and > 0. On CUDA reading it back would stall the host
    on every call, so the check is a device-side assert there (it fails the next synchronising call)."""
    if n.dtype == torch.bool or n.dtype.is_complex:
        raise TypeError(f"{name} must be a real number tensor, got {n.dtype}")
    if torch.compiler.is_compiling():
        return
    if n.is_cuda:
        torch._assert_async(torch.isfinite(n) & (n > 0), f"{name} must be finite and > 0")
        return
    value = float(n)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}: expected a finite number > 0")


@dataclass(frozen=True)
class LossOptions:
    """Everything about the loss beyond phase 2's positional (B, T) inputs. Field meanings and
    defaults follow TRL 1.16's GRPOConfig where it has the field (docs/losses.md). Two fields may
    hold tensors: num_items_in_batch (a scalar), sampling_logps (B, T) and importance_weights
    (B, T) or (B, 1). A new field is declared with option(default, doc); policy_loss and
    policy_loss_from_hidden take every field by name, with no change to their signatures."""

    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo (docs/losses.md)
    beta: float = 0.0  # KL coefficient (needs ref_logps when != 0)
    kl_estimator: str = "k3"  # k1 | k2 | k3 estimator of KL(pi || ref)
    epsilon_low: float = 0.2  # lower clip: rho >= 1 - epsilon_low
    epsilon_high: Optional[float] = None  # upper clip: rho <= 1 + epsilon_high (defaults to epsilon_low);
    # for cispo the cap of the importance weight itself: min(rho, epsilon_high) (TRL; ScaleRL suggests 5.0)
    delta: Optional[float] = None  # two-sided clipping: rho <= delta in the unclipped branch
    clip_ratio_c: Optional[float] = None  # dual clip for A < 0 (PPO): loss <= -c * A
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * (mean H over the masked tokens)
    temperature: float = 1.0  # logits are divided by this before the softmax
    max_completion_length: Optional[int] = None  # dr_grpo's constant normaliser
    num_items_in_batch: Optional[float] = None  # dapo / cispo normaliser (sum of the mask when None)
    sapo_temperature_pos: float = 1.0  # sapo gate temperature for tokens with A > 0
    sapo_temperature_neg: float = 1.05  # sapo gate temperature for tokens with A <= 0
    top_entropy_quantile: float = 1.0  # policy term on the top-q entropy tokens only (1.0 = all)
    use_bias_correction_kl: bool = True  # KL term times the importance ratio (DeepSeek-V3.2, TRL default)
    off_policy_mask_threshold: Optional[float] = None  # drop A < 0 sequences whose mean KL(sampling||pi) > this
    # per-token log-probs of the sampling engine (B, T), for off_policy_mask_threshold; old_logps when None
    sampling_logps: Optional[Any] = field(default=None, compare=False)
    # detached per-token (B, T) or per-sequence (B, 1) weights multiplying the policy-gradient term
    # (after its masks, before the KL term): TRL's vLLM importance-sampling correction of the
    # rollout-engine / trainer mismatch (grpo_fast.rl.rollout_importance_weights); vespo takes
    # (B, T) only and folds their logs into its sequence weight instead
    importance_weights: Optional[Any] = field(default=None, compare=False)
    # under torch.distributed: maps this rank's (B*T,) entropies, NaN at masked tokens, to the concatenation
    # of every rank's (NaN allowed), so the top_entropy_quantile threshold is over all ranks, as in TRL
    entropy_gather: Optional[Callable[[Any], Any]] = field(default=None, compare=False)
    # micro-batches per optimiser step whose losses the caller sums: per-micro-batch means (grpo, bnpo,
    # dr_grpo, sapo, luspo, the entropy bonus) are divided by it; dapo / cispo / vespo use num_items_in_batch
    gradient_accumulation_steps: int = 1
    vespo_k_pos: float = option(2.0, "vespo, A >= 0: the power k of the gamma weight w^k e^(lambda (1 - w)); "
                                     "larger k down-weights sequences with w < 1 more (>= 0)")
    vespo_lambda_pos: float = option(3.0, "vespo, A >= 0: the decay lambda of the gamma weight; larger lambda "
                                          "down-weights sequences with w > 1 more (>= 1e-4)")
    vespo_k_neg: float = option(3.0, "vespo, A < 0: the power k of the gamma weight (>= 0)")
    vespo_lambda_neg: float = option(2.0, "vespo, A < 0: the decay lambda of the gamma weight (>= 1e-4)")

    def __post_init__(self):
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        _check_number("beta", self.beta)
        _check_number("epsilon_low", self.epsilon_low, low=0.0)
        if self.epsilon_low >= 1.0:
            raise ValueError(f"epsilon_low={self.epsilon_low!r}: expected a value in [0, 1)")
        _check_number("epsilon_high", self.epsilon_high, low=0.0, allow_none=True)
        _check_number("delta", self.delta, low=1.0, low_open=True, allow_none=True)
        _check_number("clip_ratio_c", self.clip_ratio_c, low=1.0, low_open=True, allow_none=True)
        _check_number("entropy_coef", self.entropy_coef)
        _check_number("temperature", self.temperature, low=0.0, low_open=True)
        _check_number("sapo_temperature_pos", self.sapo_temperature_pos, low=0.0, low_open=True)
        _check_number("sapo_temperature_neg", self.sapo_temperature_neg, low=0.0, low_open=True)
        _check_number("top_entropy_quantile", self.top_entropy_quantile, low=0.0)
        if self.top_entropy_quantile > 1.0:
            raise ValueError(f"top_entropy_quantile={self.top_entropy_quantile!r}: expected a value in [0, 1]")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be a bool, got {type(self.use_bias_correction_kl).__name__}")
        _check_number("off_policy_mask_threshold", self.off_policy_mask_threshold, allow_none=True)
        for name in ("vespo_k_pos", "vespo_k_neg"):
            _check_number(name, getattr(self, name), low=0.0)
        for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
            # TRL clamps lambda to >= 1e-4 silently; below that we refuse instead of changing the value
            _check_number(name, getattr(self, name), low=_VESPO_MIN_LAMBDA)
        if self.entropy_gather is not None and not callable(self.entropy_gather):
            raise TypeError(f"entropy_gather must be callable or None, got {type(self.entropy_gather).__name__}")
        ga = self.gradient_accumulation_steps
        if isinstance(ga, bool) or not isinstance(ga, int):
            raise TypeError(f"gradient_accumulation_steps must be an int, got {type(ga).__name__}")
        if ga < 1:
            raise ValueError(f"gradient_accumulation_steps={ga}: expected >= 1")
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise ValueError(
                "loss_type='cispo' needs epsilon_high: the cap of the importance weight, min(rho, epsilon_high) "
                "(TRL's meaning for cispo; ScaleRL suggests 5.0)"
            )
        level, why = _REQUIRED_IS_LEVEL.get(self.loss_type, (self.importance_sampling_level, ""))
        if self.importance_sampling_level != level:
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r}: loss_type={self.loss_type!r} needs "
                f"importance_sampling_level={level!r} ({why}; docs/losses.md)"
            )
        if self.loss_type == "dr_grpo":
            if self.max_completion_length is None:
                raise ValueError("loss_type='dr_grpo' needs max_completion_length (the constant normaliser)")
        if self.max_completion_length is not None:
            if isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int):
                raise TypeError(
                    f"max_completion_length must be an int, got {type(self.max_completion_length).__name__}"
                )
            if self.max_completion_length <= 0:
                raise ValueError(f"max_completion_length={self.max_completion_length}: expected > 0")
        n = self.num_items_in_batch
        if n is not None:
            if hasattr(n, "numel"):  # a tensor (e.g. an all-reduced token count): checked without a sync
                if n.numel() != 1:
                    raise ValueError(f"num_items_in_batch: expected a scalar tensor, got shape {tuple(n.shape)}")
                _check_positive_tensor("num_items_in_batch", n)
            else:
                _check_number("num_items_in_batch", n, low=0.0, low_open=True)

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high
