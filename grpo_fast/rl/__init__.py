"""Tensor-only RL maths that several trainers use: group advantage estimators (by name), masked
statistics, token-level rewards, the rollout-engine importance weights, the adaptive KL
controller, and TRPO's natural-gradient step. Nothing here knows about models,
rollouts or configs; it imports nothing from grpo_fast.trainer.
"""
from .advantages import ESTIMATORS, group_advantages, informative_groups, register_estimator
from .importance import IS_MODES, rollout_importance_weights, rollout_logp_mismatch
from .natural_gradient import TRPOStepResult, conjugate_gradient, trpo_step
from .stats import (AdaptiveKLController, explained_variance, masked_mean, masked_std, masked_var,
                    masked_whiten, token_rewards)

__all__ = ["ESTIMATORS", "group_advantages", "informative_groups", "register_estimator", "IS_MODES", "AdaptiveKLController", "rollout_importance_weights", "rollout_logp_mismatch", "TRPOStepResult", "conjugate_gradient", "explained_variance", "masked_mean",
           "masked_std", "masked_var", "masked_whiten", "token_rewards", "trpo_step"]
