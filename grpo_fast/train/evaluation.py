"""Evaluation during training (TRL's eval_dataset with eval_strategy="steps")."""
from __future__ import annotations

import contextlib
import math
from typing import Dict

import torch

from .batches import eval_settings
from .metrics import tool_metrics

__all__ = ["Evaluator"]


@contextlib.contextmanager
def _engine_state_kept(engine):
    """The engine's sampling state (state_dict: what a checkpoint holds) restored on the way out."""
    saved = engine.state_dict()
    try:
        yield
    finally:
        engine.load_state_dict(saved)


class Evaluator:
    """Generates on the held-out prompts and scores them with the reward functions.

    Runs under its own forked random state seeded from (seed, step), and the engine's own sampling
    state (vLLM's seed generator) is put back afterwards, so training samples the same with or
    without evaluation, whatever the engine; what the reward functions log is not recorded. Under
    torchrun every rank evaluates the whole set (generation under FSDP2 is a collective) and the
    numbers are rank 0's.
    """

    def __init__(self, producer, rewards, dataset, config, rng):
        self.producer, self.rewards, self.dataset, self.config, self.rng = producer, rewards, dataset, config, rng

    @torch.no_grad()
    def evaluate(self, step: int) -> Dict[str, float]:
        cfg = self.config
        settings, k = eval_settings(cfg)
        per_batch = max(1, cfg.per_device_eval_batch_size // k)
        n = len(self.dataset)
        rewards, per_func, lengths, stats = [], [], [], {}
        with self.rng.forked(cfg.seed * 1_000_003 + step), _engine_state_kept(self.producer.engine):
            for start in range(0, n, per_batch):
                indices = list(range(start, min(n, start + per_batch)))
                batch = self.producer.produce([self.dataset[i] for i in indices], indices, settings, k)
                batch = self.rewards.score(batch, step, record=False)
                rewards.append(batch.rewards.double())
                per_func.append(batch.rewards_per_func.double())
                lengths.append(batch.sampled_mask.sum(1).double().cpu())   # the policy's tokens, as in training
                for key, values in (batch.sample_stats or {}).items():
                    stats.setdefault(key, []).extend(values)
        r, pf, lengths = torch.cat(rewards), torch.cat(per_func), torch.cat(lengths)
        ok = ~torch.isnan(r)
        m: Dict[str, float] = {"eval_reward": float(r[ok].mean()) if ok.any() else math.nan}
        for j, name in enumerate(self.rewards.names):
            col = pf[:, j][~torch.isnan(pf[:, j])]
            m[f"eval_rewards/{name}/mean"] = float(col.mean()) if col.numel() else math.nan
        m["eval_completion_length"] = float(lengths.mean())
        if stats:  # multi-turn: this rank's tool metrics (rank 0's are logged)
            m.update(tool_metrics(stats, prefix="eval_"))
        if k > 1:  # a prompt passes when one of its k completions has a total reward > 0
            passed = (torch.nan_to_num(r, nan=0.0) > 0).view(-1, k).any(1)
            m[f"eval_pass@{k}"] = float(passed.double().mean())
        return m
