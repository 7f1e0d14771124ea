"""The step's scored rollout: prompts -> producer -> rewards (-> dynamic sampling) -> loss mask.

Every rank draws the same global prompts (prompts_per_step per rank, as TRL's per-device batch)
and keeps its own contiguous slice (whole groups per rank). With dynamic sampling (DAPO; verl's
filter_groups), rounds of prompts are generated until every rank holds prompts_per_step groups
with a learning signal (or dynamic_sampling_max_batches
rounds); under torchrun the rounds and the number of groups each rank keeps are decided from
all-gathered counts, so every rank does the same. Last, the one rule for samples without a
reward (Rollout.with_loss_mask) gives the loss mask every algorithm trains on.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Tuple

import torch

from ..rl import informative_groups
from ..rollout import Rollout, SamplingSettings, concat_rollouts
from .data import local_slice

__all__ = ["BatchSource", "eval_settings", "sampling_settings", "say_resumed"]


def sampling_settings(config) -> SamplingSettings:
    """The training sampling settings of a config."""
    return SamplingSettings(max_tokens=config.max_completion_length, temperature=config.temperature,
                            top_p=config.top_p, top_k=config.top_k, min_p=config.min_p,
                            repetition_penalty=config.repetition_penalty)


def eval_settings(config) -> Tuple[SamplingSettings, int]:
    """(settings, completions per prompt) of evaluation: greedy (top_k=1: the most likely token,
    through any engine, one completion) or sampled as in training, num_generations_eval each."""
    if not config.eval_do_sample:
        return SamplingSettings(max_tokens=config.max_completion_length, temperature=1.0, top_p=1.0, top_k=1), 1
    return sampling_settings(config), config.num_generations_eval or config.num_generations


class BatchSource:
    """Produces and scores one step's rollout."""

    def __init__(self, producer, rewards, sampler, dataset, config, dist, engine=None):
        self.producer, self.rewards, self.sampler, self.dataset = producer, rewards, sampler, dataset
        self.engine = engine    # whose state a checkpoint holds (None: the producer's)
        self.config, self.dist = config, dist
        self.settings = sampling_settings(config)

    # the synchronous loop draws nothing ahead: the sampler and the engine in the checkpoint are exact
    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        """A checkpoint of asynchronous rollouts (train/async_batches.py): regenerate what was in flight."""
        engine = self.engine if self.engine is not None else self.producer.engine
        if say_resumed(self.sampler, engine, state, print if self.dist.is_main else None):
            if self.dist.is_main:
                print("[grpo_fast] (the synchronous loop trains whole rounds: those groups are trained again)")

    def close(self) -> None:
        """Nothing to release (the asynchronous source stops its producer thread here)."""

    def _round(self, step: int, first_group_id: int) -> Tuple[Rollout, float]:
        cfg, dist = self.config, self.dist
        indices = local_slice(self.sampler.take(cfg.prompts_per_step * dist.world_size), dist.rank, dist.world_size)
        t0 = time.perf_counter()
        batch = self.producer.produce([self.dataset[i] for i in indices], indices, self.settings,
                                      cfg.num_generations, first_group_id=first_group_id)
        t_gen = time.perf_counter() - t0
        return self.rewards.score(batch, step), t_gen

    def next(self, step: int) -> Tuple[Rollout, float, Dict[str, Any]]:
        """(the step's rollout with rewards and loss_mask, seconds spent generating, metrics)."""
        cfg = self.config
        if not cfg.dynamic_sampling:
            batch, t_gen = self._round(step, 0)
            return batch.with_loss_mask(cfg.mask_truncated_completions), t_gen, {}
        batch, t_gen, metrics = self._dynamic(step)
        return batch.with_loss_mask(cfg.mask_truncated_completions), t_gen, metrics

    def _dynamic(self, step: int):
        cfg, dist = self.config, self.dist
        W, G = dist.world_size, cfg.num_generations
        per_rank = cfg.prompts_per_step                 # groups each rank trains on
        names = self.rewards.names
        F = len(names)
        kept, n_kept, first = [], 0, None
        rounds = groups_seen = groups_filtered = 0
        reward_sum = reward_n = 0.0
        func_sums = torch.zeros(2 * F, dtype=torch.float64)   # per reward function: sum, count
        t_gen = 0.0
        while True:
            rounds += 1
            part, dt = self._round(step, rounds * per_rank)
            t_gen += dt
            first = part if first is None else first
            good = informative_groups(part.rewards, G)                            # (groups,)
            rows = [g * G + j for g in torch.nonzero(good).flatten().tolist() for j in range(G)]
            if rows:
                kept.append(part.select(rows))
                n_kept += len(rows) // G
            r, pf = part.rewards.double(), part.rewards_per_func.double()
            ok, pf_ok = ~torch.isnan(r), ~torch.isnan(pf)
            # every rank's kept count and this round's statistics, so all ranks decide alike
            stats = torch.cat([torch.tensor([n_kept, float((~good).sum()), float(r[ok].sum()), float(ok.sum())],
                                            dtype=torch.float64),
                               torch.where(pf_ok, pf, 0.0).sum(0), pf_ok.double().sum(0)])[None]
            everyone = dist.all_gather(stats)                                    # (W, 4 + 2F)
            func_sums += everyone[:, 4:].sum(0)
            groups_seen += per_rank * W
            groups_filtered += int(everyone[:, 1].sum())
            reward_sum += float(everyone[:, 2].sum())
            reward_n += float(everyone[:, 3].sum())
            least = int(everyone[:, 0].min())
            if least >= per_rank or (cfg.dynamic_sampling_max_batches and rounds >= cfg.dynamic_sampling_max_batches):
                break
        n_groups = min(least, per_rank)
        if n_groups == 0:
            # no informative group on some rank: train on the first round as sampled (its advantages
            # are all 0; the policy term gives no gradient)
            batch = first
        else:
            batch = concat_rollouts(kept, self.producer.tokenizer.pad_token_id).select(list(range(n_groups * G)))
        metrics = {"dynamic_sampling/rounds": float(rounds),
                   "dynamic_sampling/frac_groups_filtered": groups_filtered / groups_seen,
                   "dynamic_sampling/groups_trained": float(n_groups * W),
                   "dynamic_sampling/reward_sampled": reward_sum / reward_n if reward_n else math.nan}
        for j, name in enumerate(names):  # each function's mean over everything sampled
            n = float(func_sums[F + j])
            metrics[f"dynamic_sampling/rewards_sampled/{name}/mean"] = float(func_sums[j]) / n if n else math.nan
        if n_groups < per_rank and dist.is_main:
            print(f"[grpo_fast] step {step}: dynamic sampling stopped after {rounds} round(s) "
                  f"(dynamic_sampling_max_batches={cfg.dynamic_sampling_max_batches}) with {n_groups * W} of "
                  f"{per_rank * W} informative groups; training on those")
        return batch, t_gen, metrics


def say_resumed(sampler, engine, state, say) -> int:
    """Restore the prompt sampler and the engine to where the asynchronous producer stood before the
    first round not fully trained (train/async_batches.py), say so, and return how many groups of
    that round had been trained."""
    sampler.load_state_dict(state["sampler"])
    if state.get("engine"):
        engine.load_state_dict(state["engine"])
    rounds, skip = int(state.get("rounds_in_flight", 0)), int(state.get("skip_groups", 0))
    if say is not None and (rounds or skip):
        say(f"[grpo_fast] resume: {rounds} round(s) of prompts had been generated ahead of the trainer "
            f"(max_staleness={state.get('max_staleness')}) and are generated again with the resumed weights, from "
            f"prompt {sampler.position} of epoch {sampler.epoch}"
            + (f"; the first {skip} group(s) of the first round were trained before the checkpoint" if skip else ""))
    return skip
