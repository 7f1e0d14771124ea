"""GRPOTrainer: group-relative advantages + the clipped surrogate of grpo_fast.policy_loss.

The update rule on top of RLTrainer's rollout / rewards / logging / checkpoints:
  advantages  group_advantages(rewards, G) (C++ core; NaN rewards -> advantage 0)
  old logps   only when num_iterations > 1 (the rollout policy, before any update)
  ref logps   only when beta > 0 (frozen copy, or the PEFT base with the adapter disabled)
  update      num_iterations x [gradient_accumulation_steps micro-batches -> one optimiser step]

Under torchrun each rank holds whole groups (its slice of the step's prompts): advantages are
computed on the all-gathered reward vector (so scale_rewards="batch" uses the global batch std),
dapo's normaliser is the all-rank token count over the world size (DDP / FSDP2 average the
gradients), and the other losses average micro-batch means, which the gradient average makes
the global mean; no gradient sync on all but the last micro-batch. The result equals a
one-process step on the same global batch (tests/test_distributed.py).
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import torch

from ..ops import group_advantages
from . import distributed as dist_utils
from .base import RLTrainer
from .config import GRPOConfig
from .rollout import Rollout, concat_rollouts

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
        config (or TRL's name, args): GRPOConfig.
        tokenizer (or TRL's name, processing_class): the policy's tokenizer (loaded from the model's
            path when omitted).
        ref_model: reference policy for the KL penalty (beta > 0); default: a frozen copy of model.
        peft_config: a peft config: only the adapter is trained; the reference is the base model.
        callbacks: callables cb(trainer, metrics) -> bool called after every step; True stops training.
        engine: the rollout engine (grpo_fast.trainer.engine.RolloutEngine); default: HF generate.
    """

    config_class = GRPOConfig
    algorithm = "grpo"
    update_metrics_reduced = True  # update() reduces its metrics over ranks itself, exactly

    def __init__(self, model, reward_funcs=None, train_dataset=None, *, ref_model=None, **kwargs):
        super().__init__(model, reward_funcs, train_dataset, **kwargs)
        cfg: GRPOConfig = self.config
        self.ref_model = self.build_reference_model(cfg.beta > 0, ref_model)
        self.wrapped_model = self.wrap_policy()
        self.optimizer = self.build_optimizer(self.trainable_parameters())
        self.scheduler = self.build_scheduler(self.optimizer, cfg.max_steps * cfg.num_iterations)
        # TRL's adaptive entropy control (docs/losses.md): the coefficient and the last step's
        # mean kept-token entropy (+inf before the first step, so the first step applies 0)
        self.entropy_coef = float(cfg.entropy_coef)
        self.last_entropy = math.inf

    # ------------------------------------------------------------------ checkpointed state
    def extra_state(self) -> Dict[str, Any]:
        state = super().extra_state()
        state["entropy_coef"] = float(self.entropy_coef)
        state["last_entropy"] = float(self.last_entropy)
        return state

    def load_extra_state(self, state: Dict[str, Any], path: str) -> None:
        super().load_extra_state(state, path)
        self.entropy_coef = float(state.get("entropy_coef", self.config.entropy_coef))
        self.last_entropy = float(state.get("last_entropy", math.inf))

    def _applied_entropy_coef(self) -> float:
        """The entropy_coef every micro-batch of this step passes to policy_loss."""
        cfg: GRPOConfig = self.config
        if not cfg.use_adaptive_entropy:
            return cfg.entropy_coef
        return self.entropy_coef if self.last_entropy <= cfg.entropy_target else 0.0

    def _adapt_entropy_coef(self, kept_entropy_sum: float, kept_tokens: float) -> None:
        """TRL's rule after an optimiser step; the sums are over every micro-batch and rank."""
        cfg: GRPOConfig = self.config
        H = kept_entropy_sum / kept_tokens if kept_tokens > 0 else math.nan
        if not math.isfinite(H):  # no kept tokens: nothing observed, the state stays
            return
        if H <= cfg.entropy_target:
            self.entropy_coef = min(self.entropy_coef + cfg.entropy_coef_delta, cfg.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - cfg.entropy_coef_delta, cfg.entropy_coef_min)
        self.last_entropy = H

    # ------------------------------------------------------------------ dynamic sampling (DAPO)
    @staticmethod
    def informative_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
        """(N,) float rewards, NaN = none -> (N // G,) bool: the groups whose rewards are not all
        equal (at least two rewards, std > 0), the groups with a learning signal."""
        r = rewards.detach().double().view(-1, G)
        valid = ~torch.isnan(r)
        hi = torch.where(valid, r, -math.inf).amax(1)
        lo = torch.where(valid, r, math.inf).amin(1)
        return (valid.sum(1) >= 2) & (hi > lo)

    def sample_batch(self):
        """With dynamic_sampling: generate rounds of prompts_per_step prompts, keep the informative
        groups, until the step has prompts_per_step of them (or dynamic_sampling_max_batches rounds);
        train on exactly that many. Under torchrun the rounds and the number of groups each rank
        keeps are decided from all-gathered counts, so every rank does the same."""
        cfg: GRPOConfig = self.config
        if not cfg.dynamic_sampling:
            return super().sample_batch()
        W = self.dist.world_size
        per_rank = cfg.prompts_per_step // W            # groups each rank trains on
        G = cfg.num_generations
        kept, counts_kept = [], 0                       # this rank's informative groups so far
        first = None
        rounds = groups_seen = groups_filtered = 0
        reward_sum = reward_n = 0.0
        F = len(self.reward_names)
        func_sums = torch.zeros(2 * F, dtype=torch.float64)   # per reward function: sum, count
        t_gen = 0.0
        while True:
            rounds += 1
            t0 = time.perf_counter()
            indices = self._local_indices(self.sampler.take(cfg.prompts_per_step))
            part = self.rollout(indices)
            t_gen += time.perf_counter() - t0
            part = self.compute_rewards(part, self.global_step + 1)
            first = part if first is None else first
            good = self.informative_groups(part.rewards, G)                      # (groups,)
            rows = [g * G + j for g in torch.nonzero(good).flatten().tolist() for j in range(G)]
            if rows:
                kept.append(part.select(rows))
                counts_kept += len(rows) // G
            r = part.rewards.double()
            ok = ~torch.isnan(r)
            # every rank's kept count and this round's statistics, so all ranks decide alike
            pf = part.rewards_per_func.double()
            pf_ok = ~torch.isnan(pf)
            stats = torch.cat([torch.tensor([counts_kept, float((~good).sum()), float(r[ok].sum()), float(ok.sum())],
                                            dtype=torch.float64),
                               torch.where(pf_ok, pf, 0.0).sum(0), pf_ok.double().sum(0)])[None]
            allstats = self.dist.all_gather(stats)                               # (W, 4 + 2F)
            func_sums += allstats[:, 4:].sum(0)
            groups_seen += cfg.prompts_per_step
            groups_filtered += int(allstats[:, 1].sum())
            reward_sum += float(allstats[:, 2].sum())
            reward_n += float(allstats[:, 3].sum())
            least = int(allstats[:, 0].min())
            if least >= per_rank or (cfg.dynamic_sampling_max_batches and rounds >= cfg.dynamic_sampling_max_batches):
                break
        n_groups = min(least, per_rank)
        if n_groups == 0:
            # no rank has an informative group on some rank: train on the first round as sampled
            # (its advantages are all 0; the policy term gives no gradient)
            batch = first
        else:
            batch = concat_rollouts(kept, self.tokenizer.pad_token_id).select(list(range(n_groups * G)))
        metrics = {"dynamic_sampling/rounds": float(rounds),
                   "dynamic_sampling/frac_groups_filtered": groups_filtered / groups_seen,
                   "dynamic_sampling/groups_trained": float(n_groups * W),
                   "dynamic_sampling/reward_sampled": reward_sum / reward_n if reward_n else math.nan}
        for j, name in enumerate(self.reward_names):  # each function's mean over everything sampled
            n = float(func_sums[F + j])
            metrics[f"dynamic_sampling/rewards_sampled/{name}/mean"] = float(func_sums[j]) / n if n else math.nan
        if n_groups < per_rank and self.dist.is_main:
            print(f"[grpo_fast] step {self.global_step + 1}: dynamic sampling stopped after {rounds} round(s) "
                  f"(dynamic_sampling_max_batches={cfg.dynamic_sampling_max_batches}) with {n_groups * W} of "
                  f"{cfg.prompts_per_step} informative groups; training on those")
        return batch.with_fields(extras={"metrics": metrics}), t_gen

    # ------------------------------------------------------------------ advantages
    def compute_advantages(self, batch: Rollout) -> Rollout:
        cfg: GRPOConfig = self.config
        self.warn_if_no_signal(batch)
        rewards = batch.rewards
        if self.dist.enabled:  # N floats per rank; the global vector makes "batch" scaling exact
            rewards = self.dist.all_gather(rewards)                              # (W * N,)
        adv = group_advantages(rewards, batch.group_size, estimator=cfg.advantage_estimator,
                               scale=cfg.scale_rewards)
        if self.dist.enabled:
            N = len(batch)
            adv = adv[self.dist.rank * N:(self.dist.rank + 1) * N]
        fields = {"advantages": adv.to(self.device)}                             # (N,)
        if cfg.mask_truncated_completions:
            keep = (~batch.truncated).to(batch.completion_mask.dtype)[:, None]
            fields["loss_mask"] = batch.completion_mask * keep
        if cfg.num_iterations > 1 or batch.engine_logps is not None:
            was = self.model.training
            self.model.eval()
            old_logps = self._logps(self.model, batch)                         # (N, T) the trainer's, at rollout
            self.model.train(was)
            # an engine's samples (vLLM): log the mismatch; with the IS correction the loss weighs each
            # sample by trainer / engine likelihood and keeps these as old log-probs, as TRL does
            weights, metrics = self.engine_correction(batch, old_logps)
            batch.extras.setdefault("metrics", {}).update(metrics)
            if weights is not None:
                fields["importance_weights"] = weights
            if cfg.num_iterations > 1 or weights is not None:
                fields["old_logps"] = old_logps
        if cfg.beta > 0:
            with self.ref_context():
                fields["ref_logps"] = self._logps(self.ref_model if self.ref_model is not None else self.model, batch)
        return batch.with_fields(**fields)

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def _logps(self, model, batch: Rollout) -> torch.Tensor:
        mb = self.config.per_device_train_batch_size
        out = []
        for start in range(0, len(batch), mb):
            out.append(self.token_logps(model, batch, slice(start, start + mb)))   # (mb, T)
        return torch.cat(out)                                                   # (N, T)

    # ------------------------------------------------------------------ the update
    def update(self, batch: Rollout) -> Dict[str, Any]:
        cfg: GRPOConfig = self.config
        self.model.train()
        N = len(batch)
        mb = cfg.per_device_train_batch_size
        # this rank's micro-batches: gradient_accumulation_steps on one process, fewer when the
        # step's global batch is split over ranks (DDP's gradient average restores the global mean)
        n_micro = math.ceil(N / mb)
        mask = batch.mask
        # dapo: one normaliser for all micro-batches of the optimiser step (their total token count,
        # over all ranks; divided by the world size because the ranks' gradients are averaged)
        num_items = None
        if cfg.loss_type in ("dapo", "cispo"):
            tokens = self.dist.sum_floats([float(mask.sum())])[0]
            num_items = max(tokens, 1.0) / self.dist.world_size
        # metrics accumulate on the device (loss, token weight, each metric x weight) and are
        # read back once per update: no host-device sync per micro-batch
        keys = ("entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "kl", "cispo_clip_ratio",
                "entropy_masked_frac", "off_policy_masked_frac")
        acc = None
        present = set()
        grad_norms = []
        applied_coefs = []
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            it_loss = 0.0  # this optimiser step's loss (summed over its micro-batches), checked before the step
            coef = self._applied_entropy_coef()
            applied_coefs.append(coef)
            kept = None  # adaptive entropy: (sum of kept-token entropy, kept tokens) of this optimiser step
            for i, start in enumerate(range(0, N, mb)):
                rows = slice(start, start + mb)
                sync = dist_utils.gradient_sync(self.wrapped_model, self.dist, sync=i == n_micro - 1)
                with sync:
                    loss, out = self._micro_loss(batch, rows, num_items, n_micro, entropy_coef=coef)
                    loss.backward()
                    it_loss = it_loss + loss.detach()
                w = mask[rows].sum().to(torch.float64)
                vals = [loss.detach().to(torch.float64), w]
                for key in keys:
                    v = getattr(out, key)
                    present.update([key] if v is not None else [])
                    vals.append(v.to(torch.float64) * w if v is not None else torch.zeros_like(w))
                row = torch.stack(vals)
                acc = row if acc is None else acc + row
                if cfg.use_adaptive_entropy:
                    n_kept = w if out.entropy_masked_frac is None else w * (1 - out.entropy_masked_frac.to(torch.float64))
                    h = out.entropy if out.entropy_kept is None else out.entropy_kept
                    pair = torch.stack([h.detach().to(torch.float64) * n_kept, n_kept])
                    kept = pair if kept is None else kept + pair
            if cfg.use_adaptive_entropy:
                self._adapt_entropy_coef(*self.dist.sum_floats(kept.tolist()))
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
            elif self.dist.mode == "fsdp2" and self.dist.enabled:  # sharded grads: the norm is a collective
                gn = torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True)
            else:
                gn = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            grad_norms.append(dist_utils.full_tensor(gn).detach().to(torch.float64))
            if self.finite_update(it_loss, grad_norms[-1]):  # else skipped: the weights stay finite
                self.optimizer.step()
                self.scheduler.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
        values = acc.tolist()
        loss_total, weight_total = values[0], values[1]
        sums = {k: values[2 + j] for j, k in enumerate(keys) if k in present}
        grad_norms = torch.stack(grad_norms).tolist()
        keys = sorted(sums)
        # over ranks: loss is a mean of the ranks' losses (as their gradients), the rest token-weighted
        totals = self.dist.sum_floats([loss_total, weight_total] + [sums[k] for k in keys])
        loss_total, weight_total = totals[0] / self.dist.world_size, totals[1]
        sums = dict(zip(keys, totals[2:]))
        metrics: Dict[str, Any] = {"loss": loss_total / cfg.num_iterations,
                                   "grad_norm": sum(grad_norms) / len(grad_norms)}
        denom = max(weight_total, 1.0)
        for key in ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
            metrics[key] = sums[key] / denom if key in sums else (0.0 if key == "kl" else float("nan"))
        for key in ("cispo_clip_ratio", "entropy_masked_frac", "off_policy_masked_frac"):
            if key in sums:
                metrics[key] = sums[key] / denom
        if cfg.entropy_coef or cfg.use_adaptive_entropy:
            metrics["entropy_coef"] = sum(applied_coefs) / len(applied_coefs)  # the coefficient the loss used
        return metrics

    def _gather_entropies(self, h: torch.Tensor) -> torch.Tensor:
        """(n,) float entropies of this rank (NaN = masked) -> every rank's, concatenated (NaN-padded
        to the longest rank's n, which the quantile ignores like masked tokens)."""
        n = self.dist.all_reduce(torch.tensor([h.numel()], dtype=torch.float64), "max")
        width = int(n.item())
        if h.numel() < width:
            h = torch.cat([h, h.new_full((width - h.numel(),), float("nan"))])
        return self.dist.all_gather(h)

    def _micro_loss(self, batch: Rollout, rows: slice, num_items, n_micro: int, entropy_coef: Optional[float] = None):
        cfg: GRPOConfig = self.config
        if entropy_coef is None:
            entropy_coef = self._applied_entropy_coef()
        mask = batch.mask
        # through the fused LM head (hidden states, no logits) unless the model rules it out
        out = self.policy_loss_of(
            self.wrapped_model, batch, rows, batch.advantages[rows], mask[rows],
            old_logps=None if batch.old_logps is None else batch.old_logps[rows],
            ref_logps=None if batch.ref_logps is None else batch.ref_logps[rows],
            loss_type=cfg.loss_type, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
            epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            importance_sampling_level=cfg.importance_sampling_level, entropy_coef=entropy_coef,
            temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
            num_items_in_batch=num_items, gradient_accumulation_steps=n_micro,
            sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
            top_entropy_quantile=cfg.top_entropy_quantile, use_bias_correction_kl=cfg.use_bias_correction_kl,
            off_policy_mask_threshold=cfg.off_policy_mask_threshold,
            sampling_logps=None if batch.engine_logps is None else batch.engine_logps[rows],
            importance_weights=None if batch.importance_weights is None else batch.importance_weights[rows],
            entropy_gather=self._gather_entropies if self.dist.enabled and cfg.top_entropy_quantile < 1 else None)
        # dapo / cispo are normalised over the whole accumulated batch (num_items_in_batch), the
        # others per micro-batch divided by gradient_accumulation_steps inside the loss
        return out.loss, out
