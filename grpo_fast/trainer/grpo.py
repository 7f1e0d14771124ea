"""GRPOTrainer: group-relative advantages + the clipped surrogate of grpo_fast.policy_loss.

The update rule on top of RLTrainer's rollout / rewards / logging / checkpoints:
  advantages  group_advantages(rewards, G) (C++ core; NaN rewards -> advantage 0)
  old logps   only when num_iterations > 1 (the rollout policy, before any update)
  ref logps   only when beta > 0 (frozen copy, or the PEFT base with the adapter disabled)
  update      num_iterations x [gradient_accumulation_steps micro-batches -> one optimiser step]
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Optional

import torch

from .base import RLTrainer, Rollout
from .config import GRPOConfig

__all__ = ["GRPOTrainer"]


class GRPOTrainer(RLTrainer):
    """Group Relative Policy Optimization (DeepSeekMath), with TRL's options.

    Args:
        model: a transformers causal LM, or a local path / name (from_pretrained, local files only).
        reward_funcs: a callable f(prompts, completions, completion_ids, **columns) -> list[float | None],
            a sequence-classification reward model given as (model, tokenizer) or RewardModel, a local
            reward-model directory, or a list of these (summed with config.reward_weights).
        train_dataset: a datasets.Dataset or a list of dicts with "prompt" (text or chat messages);
            the other columns reach the reward functions as keyword lists.
        config: GRPOConfig.
        tokenizer: the policy's tokenizer (loaded from the model's path when omitted).
        ref_model: reference policy for the KL penalty (beta > 0); default: a frozen copy of model.
        peft_config: a peft config: only the adapter is trained; the reference is the base model.
        callbacks: callables cb(trainer, metrics) -> bool called after every step; True stops training.
    """

    config_class = GRPOConfig
    algorithm = "grpo"

    def __init__(self, model, reward_funcs, train_dataset, *, config: Optional[GRPOConfig] = None,
                 tokenizer=None, ref_model=None, peft_config=None, callbacks=None):
        super().__init__(model, reward_funcs, train_dataset, config=config, tokenizer=tokenizer,
                         ref_model=ref_model, peft_config=peft_config, callbacks=callbacks)

    # ------------------------------------------------------------------ hooks
    def setup(self) -> None:
        cfg: GRPOConfig = self.config
        self.ref_model = None
        if cfg.beta > 0 and not self.is_peft:
            ref = self._user_ref_model if self._user_ref_model is not None else copy.deepcopy(self.model)
            if isinstance(ref, str):
                from transformers import AutoModelForCausalLM

                ref = AutoModelForCausalLM.from_pretrained(ref, local_files_only=True)
            ref.eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self.ref_model = ref.to(self.device)
        self._user_ref_model = None

    def prompts_per_step(self) -> int:
        return self.config.prompts_per_step

    def generations_per_prompt(self) -> int:
        return self.config.num_generations

    def updates_per_step(self) -> int:
        return self.config.num_iterations

    def compute_advantages(self, batch: Rollout) -> None:
        from grpo_fast import group_advantages

        cfg: GRPOConfig = self.config
        batch.advantages = group_advantages(batch.rewards, batch.group_size, estimator=cfg.advantage_estimator,
                                            scale=cfg.scale_rewards).to(self.device)   # (N,)

    # ------------------------------------------------------------------ log-probs
    def _ref_context(self):
        if self.ref_model is None and self.is_peft:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    @torch.no_grad()
    def _logps(self, model, batch: Rollout) -> torch.Tensor:
        from grpo_fast import selective_log_softmax

        mb = self.config.per_device_train_batch_size
        out = []
        for start in range(0, len(batch), mb):
            rows = slice(start, start + mb)
            logits = self.forward_logits(model, batch, rows)                   # (mb, T, V)
            out.append(selective_log_softmax(logits, batch.completion_ids[rows], self.config.temperature))
        return torch.cat(out)                                                   # (N, T)

    def _prepare(self, batch: Rollout) -> None:
        cfg: GRPOConfig = self.config
        if cfg.mask_truncated_completions:
            batch.completion_mask = batch.completion_mask * (~batch.truncated).to(batch.completion_mask.dtype)[:, None]
        if cfg.num_iterations > 1:
            was = self.model.training
            self.model.eval()
            batch.old_logps = self._logps(self.model, batch)
            self.model.train(was)
        if cfg.beta > 0:
            with self._ref_context():
                batch.ref_logps = self._logps(self.ref_model if self.ref_model is not None else self.model, batch)

    # ------------------------------------------------------------------ the update
    def update(self, batch: Rollout) -> Dict[str, Any]:
        from grpo_fast import policy_loss

        cfg: GRPOConfig = self.config
        self._prepare(batch)
        self.model.train()
        N = len(batch)
        mb = cfg.per_device_train_batch_size
        ga = cfg.gradient_accumulation_steps
        mask = batch.completion_mask
        # dapo: one normaliser for all micro-batches of the optimiser step (their total token count)
        num_items = float(mask.sum().clamp(min=1)) if cfg.loss_type == "dapo" else None
        sums: Dict[str, float] = {}
        weight_total = 0.0
        loss_total = 0.0
        grad_norms = []
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(0, N, mb):
                rows = slice(start, start + mb)
                logits = self.forward_logits(self.model, batch, rows)             # (mb, T, V)
                out = policy_loss(
                    logits, batch.completion_ids[rows], batch.advantages[rows], mask[rows],
                    old_logps=None if batch.old_logps is None else batch.old_logps[rows],
                    ref_logps=None if batch.ref_logps is None else batch.ref_logps[rows],
                    loss_type=cfg.loss_type, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                    epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
                    importance_sampling_level=cfg.importance_sampling_level, entropy_coef=cfg.entropy_coef,
                    temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
                    num_items_in_batch=num_items)
                # dapo is already normalised over the whole accumulated batch; the others per micro-batch
                loss = out.loss if cfg.loss_type == "dapo" else out.loss / ga
                loss.backward()
                loss_total += float(loss.detach())
                w = float(mask[rows].sum())
                weight_total += w
                for key in ("entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "kl"):
                    v = getattr(out, key)
                    if v is not None:
                        sums[key] = sums.get(key, 0.0) + float(v) * w
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
            else:
                gn = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            grad_norms.append(float(gn))
            self.optimizer.step()
            self.scheduler.step()
        metrics: Dict[str, Any] = {"loss": loss_total / cfg.num_iterations,
                                   "grad_norm": sum(grad_norms) / len(grad_norms)}
        denom = max(weight_total, 1.0)
        for key in ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
            metrics[key] = sums[key] / denom if key in sums else (0.0 if key == "kl" else float("nan"))
        return metrics
