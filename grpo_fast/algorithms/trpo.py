"""TRPO (Schulman et al. 2015): KL-constrained natural-gradient steps.

On a scored rollout (rewards and loss_mask set by the loop):
  prepare   the old policy: the full next-token distribution log_softmax(logits / temperature) of
            every completion token and its token log-probs (eval mode, detached); advantages:
            advantage_estimator="group": group advantages (as GRPO) on every trained token;
            "gae": a critic's values, GAE over the token rewards (grpo_fast.train.advantages)
  update    grpo_fast.rl.trpo_step over the trainable parameters (the adapter only under PEFT):
            maximise L(θ) = Σ m·ρ·A / Σ m subject to KL̄(θ) = Σ_t m_t KL(π_old || π_θ) / Σ m <= max_kl
            (conjugate gradient on Fisher-vector products, a full step scaled to the bound,
            backtracking line search; a rejected step leaves the parameters bit-identical); then,
            with gae, vf_iters passes of critic regression with its own AdamW

Memory: the old distributions take N · T · V · 4 bytes, and the surrogate gradient and each Fisher
product hold the autograd graph of the whole rollout: fine for small models and short completions.
Forwards run in eval mode, so KL̄(θ_old) = 0 and the Fisher products are deterministic.

Under torchrun (distributed=ddp): each rank's surrogate and KL are its local masked sums over
(global token count / world size), trpo_step averages g, every Fisher product and the line-search
scalars over ranks, so all ranks take the same step; the critic regression keeps the one-process
minibatch count with averaged gradients. Metrics: kl (after the step; 0 when rejected),
step_accepted, accepted_fraction, line_search_steps, surrogate_gain, expected_gain, step_norm,
entropy (of the rollout policy), and with gae value_loss and the GAE statistics.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..config import TRPOConfig
from ..model import Critic
from ..ops import selective_log_softmax
from ..rl import trpo_step
from ..rollout import Rollout
from ..train.advantages import engine_correction, gae_advantages, global_group_advantages
from ..train.algorithm import Algorithm, AlgorithmContext, micro_batches
from ..train.distributed import average_gradients
from ..train.optim import NonFiniteGuard, OptimizerStep, build_optimizer
from ..train.trainer import Trainer

__all__ = ["TRPO", "TRPOTrainer"]


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class TRPO(Algorithm):
    name = "trpo"

    def __init__(self, ctx: AlgorithmContext, ref_model=None, value_model=None):
        super().__init__(ctx)   # ref_model: unused (the constraint is to the rollout policy); a uniform API
        cfg: TRPOConfig = self.config
        gae = cfg.advantage_estimator == "gae"
        # the step averages g, the Fisher products and the line-search scalars itself: no DDP wrapper
        self.replicate_policy()
        self.critic: Optional[Critic] = None
        self.vf_step: Optional[OptimizerStep] = None
        if gae:
            self.critic = Critic(self.policy.model, value_model if value_model is not None else cfg.value_model,
                                 device=self.device, disable_dropout=cfg.disable_dropout, dist=self.dist)
            self.vf_step = OptimizerStep(build_optimizer(self.critic.parameters(), cfg, lr=cfg.vf_learning_rate),
                                         max_grad_norm=cfg.max_grad_norm, dist=self.dist,
                                         max_consecutive_nonfinite=cfg.max_consecutive_nonfinite)
        # the policy moves only by the natural-gradient step: no policy optimiser, no scheduler; a step whose
        # surrogate or gradient is non-finite counts as a skipped update, as in every algorithm
        self.guard = NonFiniteGuard(cfg.max_consecutive_nonfinite, self.dist)
        self.steps_accepted = self.steps_tried = 0

    # ------------------------------------------------------------------ state and files
    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"steps_accepted": self.steps_accepted, "steps_tried": self.steps_tried}
        if self.vf_step is not None:
            state["vf_optimizer"] = self.vf_step.optimizer.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any], path: str) -> None:
        self.steps_accepted = int(state.get("steps_accepted", 0))
        self.steps_tried = int(state.get("steps_tried", 0))
        if self.critic is not None:
            self.critic.load(path, legacy_state=state.get("critic"))
            self.vf_step.optimizer.load_state_dict(state["vf_optimizer"])

    def save_files(self, directory: str) -> None:
        if self.critic is not None:
            self.critic.save(directory)

    def export(self, directory: str) -> None:
        if self.critic is not None:
            self.critic.save_final(directory)

    # ------------------------------------------------------------------ prepare
    def _chunks(self, n: int):
        return micro_batches(n, self.config.per_device_train_batch_size)

    @torch.no_grad()
    def _old_policy(self, batch: Rollout):
        """The rollout policy's log_softmax over V (N, T, V) and its token log-probs (N, T)."""
        model, t = self.policy.model, self.config.temperature
        was = model.training
        model.eval()
        full, logps = [], []
        for rows in self._chunks(len(batch)):
            logits = self.policy.logits(model, batch, rows)                      # (n, T, V)
            logits = logits.to(_at_least_float32(logits.dtype))
            full.append(torch.log_softmax(logits / t, dim=-1)
                        .clamp(min=torch.finfo(logits.dtype).min))               # -inf -> finite: 0·(-inf) is NaN
            logps.append(selective_log_softmax(logits, batch.completion_ids[rows], t))
        model.train(was)
        return torch.cat(full), torch.cat(logps)

    def prepare(self, batch: Rollout, step: int) -> Rollout:
        cfg: TRPOConfig = self.config
        mask = batch.loss_mask
        m = mask.to(torch.float32)
        old_all, old_logps = self._old_policy(batch)
        metrics: Dict[str, float] = {}
        if cfg.advantage_estimator == "group":
            adv = global_group_advantages(batch.rewards, batch.group_size, estimator="grpo", scale=cfg.scale_rewards,
                                          dist=self.dist, device=self.device)
            advantages, returns = adv[:, None] * m, None                         # (N, T)
        else:
            scores = torch.nan_to_num(batch.rewards, nan=0.0).to(self.device)
            values = self._values(batch) * m                                     # (N, T)
            advantages, returns, _, metrics = gae_advantages(scores, values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                                             whiten=cfg.whiten_advantages, dist=self.dist)
        # an engine's samples (vLLM): the mismatch metrics and, with the IS correction, the weights of the surrogate
        weights, engine_metrics = engine_correction(batch, old_logps, cfg)
        metrics.update(engine_metrics)
        batch = batch.with_fields(advantages=advantages, old_logps=old_logps, importance_weights=weights)
        # every rank's token count once, for the surrogate's and the KL's normaliser
        batch.extras.update(old_log_softmax=old_all, returns=returns, metrics=metrics,
                            tokens=self.dist.token_normaliser(mask))
        return batch

    @torch.no_grad()
    def _values(self, batch: Rollout) -> torch.Tensor:
        critic = self.critic.model
        was = critic.training
        critic.eval()
        values = torch.cat([self.critic.values(batch, rows).float() for rows in self._chunks(len(batch))])
        critic.train(was)
        return values

    # ------------------------------------------------------------------ surrogate and KL
    def surrogate(self, batch: Rollout) -> torch.Tensor:
        """L(θ) = Σ m·w·ρ·A / Σ m over the rollout (this rank's share under torchrun); w: the engine's
        importance weights (vLLM with vllm_importance_sampling_correction), else 1."""
        m = batch.loss_mask.to(torch.float32)
        w = batch.importance_weights
        out = 0.0
        for rows in self._chunks(len(batch)):
            logps = self.policy.token_logps(self.policy.model, batch, rows)      # (n, T), fused head if any
            ratio = torch.exp(logps - batch.old_logps[rows])                     # (n, T)
            term = ratio * batch.advantages[rows] * m[rows]
            out = out + (term if w is None else term * w[rows]).sum()
        return out / batch.extras["tokens"]

    def mean_kl(self, batch: Rollout) -> torch.Tensor:
        """KL̄(θ) = Σ m · KL(π_old || π_θ) / Σ m, over the full next-token distribution, in plain
        torch log_softmax (twice differentiable, for the Fisher-vector products)."""
        m = batch.loss_mask.to(torch.float32)
        old_all = batch.extras["old_log_softmax"]
        out = 0.0
        for rows in self._chunks(len(batch)):
            logits = self.policy.logits(self.policy.model, batch, rows)          # (n, T, V)
            new = torch.log_softmax(logits.to(_at_least_float32(logits.dtype)) / self.config.temperature, dim=-1)
            old = old_all[rows]
            out = out + ((old.exp() * (old - new)).sum(-1) * m[rows]).sum()
        return out / batch.extras["tokens"]

    # ------------------------------------------------------------------ update
    def update(self, batch: Rollout, step: int) -> Dict[str, Any]:
        cfg: TRPOConfig = self.config
        params, model, dist = self.trainable_parameters(), self.policy.model, self.dist
        was = model.training
        model.eval()  # deterministic forwards: KL̄(θ_old) = 0 and reproducible Fisher products
        try:
            res = trpo_step(params, lambda: self.surrogate(batch), lambda: self.mean_kl(batch), cfg.max_kl,
                            cg_iters=cfg.cg_iters, damping=cfg.cg_damping, backtrack_iters=cfg.backtrack_iters,
                            backtrack_ratio=cfg.backtrack_ratio, accept_ratio=cfg.accept_ratio,
                            reduce=(lambda t: dist.all_reduce(t) / dist.world_size) if dist.enabled else None)
        finally:
            model.train(was)
        for p in params:
            p.grad = None
        self.guard.record(res.nonfinite, step, "non-finite surrogate, gradient or Fisher product")
        self.steps_tried += 1
        self.steps_accepted += int(res.accepted)
        old, m = batch.extras["old_log_softmax"], batch.loss_mask
        entropy = -(old.exp() * old).sum(-1)                                     # (N, T)
        metrics: Dict[str, Any] = {
            "kl": res.kl, "step_accepted": float(res.accepted), "accepted_fraction": self.steps_accepted / self.steps_tried,
            "line_search_steps": res.line_search_steps, "surrogate_gain": res.surrogate_gain,
            "expected_gain": res.expected_gain, "step_norm": res.step_norm,
            # this rank's share of the global mean: the mean over ranks below is the global value
            "entropy": float((entropy * m.to(entropy.dtype)).sum()) / batch.extras["tokens"],
        }
        if self.critic is not None:
            metrics["value_loss"] = self._fit_critic(batch, step)
        metrics = dist.mean_metrics(metrics)
        vf = self.vf_step.metrics(learning_rate=False) if self.vf_step is not None else {"skipped_updates": 0}
        metrics.update(vf, skipped_updates=vf["skipped_updates"] + self.guard.take_skipped())
        return metrics

    def _fit_critic(self, batch: Rollout, step: int) -> float:
        """vf_iters passes of 0.5·(V - R)² regression (masked token mean per minibatch); the mean loss
        (this rank's share under torchrun, where each rank holds per_device_train_batch_size rows of
        every minibatch, as TRL's per-device batch, and the gradients are averaged)."""
        cfg: TRPOConfig = self.config
        mask, returns, dist = batch.loss_mask, batch.extras["returns"], self.dist
        self.critic.model.train()
        losses = []
        N, mb = len(batch), cfg.per_device_train_batch_size
        for _ in range(cfg.vf_iters):
            order = torch.randperm(N, generator=self.ctx.rng.generator).to(mask.device)  # the trainer's generator
            for start in range(0, N, mb):
                rows = order[start:start + mb]
                m = mask[rows].to(torch.float32)
                values = self.critic.values(batch, rows)                          # (n, T)
                loss = 0.5 * (((values - returns[rows]) ** 2) * m).sum() / dist.token_normaliser(m)
                self.vf_step.optimizer.zero_grad(set_to_none=True)
                self.vf_step.backward(loss)
                average_gradients(self.vf_step.params, dist)
                self.vf_step(loss, step)
                losses.append(loss.detach())
        return float(torch.stack(losses).mean())


class TRPOTrainer(Trainer):
    """Trust Region Policy Optimization (Schulman et al. 2015) for causal LMs.

    Args:
        model, reward_funcs, train_dataset, tokenizer, peft_config, callbacks, engine, eval_dataset, tools,
            environment_factory, rollout_func: as GRPOTrainer (with peft_config only the adapter moves; the
            Fisher products are over it).
        config: TRPOConfig.
        value_model: the critic with advantage_estimator="gae" (a ValueModel, a transformers model
            whose trunk gets a fresh head, or a local path / hub id); default: a copy of the policy.
        ref_model: unused (TRPO's constraint is to the rollout policy); accepted for a uniform API.

    The policy moves only by the TRPO step (no policy optimiser or scheduler). The critic (gae) has
    its own AdamW; both are in every checkpoint, and it is saved to OUTPUT_DIR/final/value_model.
    """

    config_class = TRPOConfig
    algorithm_class = TRPO

    critic = property(lambda self: self.algorithm.critic)
