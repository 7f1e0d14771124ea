"""Producers turn prompt rows into samples: the only place that knows about templates and turns.

    Producer              the interface: produce(rows, indices, settings, group_size) -> Rollout
    SingleTurnProducer    one engine call per sample: prompt -> one sampled span

The group expansion happens here, once: each prompt is repeated `group_size` times before the
engine sees it, so engines only ever sample one completion per prompt they are given.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .data import Rollout, Sample, collate
from .engine import RolloutEngine, SamplingSettings
from .template import PromptTemplate

__all__ = ["Producer", "SingleTurnProducer"]


class Producer:
    """The interface."""

    def produce(self, rows: Sequence[Dict[str, Any]], indices: Sequence[int], settings: SamplingSettings,
                group_size: int, *, first_group_id: int = 0) -> Rollout:
        """`group_size` samples of each row's prompt, in the padded layout (rollout/data.py)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the producer holds (not the engine: its owner closes it)."""


class SingleTurnProducer(Producer):
    """prompt -> engine -> one completion per sample; every completion token was sampled."""

    def __init__(self, engine: RolloutEngine, template: PromptTemplate, *, device):
        self.engine, self.template, self.device = engine, template, device
        self.tokenizer = template.tokenizer

    def produce(self, rows, indices, settings, group_size, *, first_group_id: int = 0) -> Rollout:
        G = group_size
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        prompt_ids = [p for p in self.template.encode([r["prompt"] for r in rows]) for _ in range(G)]
        gen = self.engine.generate(prompt_ids, settings)
        if len(gen.completion_ids) != len(prompt_ids):
            raise RuntimeError(f"engine {self.engine.name!r} returned {len(gen.completion_ids)} completions for "
                               f"{len(prompt_ids)} prompts")
        texts = self.tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
        samples: List[Sample] = []
        for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, gen.completion_ids)):
            samples.append(Sample(prompt_ids=p_ids, completion_ids=list(c_ids), sampled=[1] * len(c_ids),
                                  logprobs=None if gen.logprobs is None else list(gen.logprobs[i]),
                                  policy_versions=None if gen.policy_versions is None else list(gen.policy_versions[i]),
                                  finish_reason=gen.finish_reasons[i],
                                  completion=self.template.completion(prompts[i], texts[i])))
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        return collate(samples, prompts=prompts, dataset_index=[i for i in indices for _ in range(G)],
                       columns=columns, group_size=G, pad_token_id=self.tokenizer.pad_token_id, device=self.device,
                       first_group_id=first_group_id)
