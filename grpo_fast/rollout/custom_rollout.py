"""RolloutFuncProducer: TRL's `rollout_func(prompts, trainer)`, the user's own rollout.

Called with the step's prompts on this process (each row's prompt repeated num_generations times,
consecutively, as TRL passes them; deep copies) and the trainer. It returns a dict:

    prompt_ids       one token-id list per completion
    completion_ids   one token-id list per completion: every token after the prompt
    logprobs         the sampling engine's log-prob per completion token, or None
    env_mask         optional, per completion token: 1 where the policy sampled it, 0 for tokens
                     it did not (environment feedback); 0-tokens are out of the loss, the KL,
                     the entropy, the normalisers and the importance-sampling correction
    anything else    reaches the reward functions as a keyword: a list gives one value per
                     completion, anything else the same value for all (TRL)

The completions the reward functions see are the decoded completion ids (an assistant message for
a chat prompt); a completion is "length"-finished unless its last token is the EOS or the pad token.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List

from .data import Rollout, Sample, collate
from .producer import Producer
from .template import PromptTemplate

__all__ = ["RolloutFuncProducer"]

_REQUIRED = ("prompt_ids", "completion_ids", "logprobs")


class RolloutFuncProducer(Producer):
    def __init__(self, rollout_func: Callable, trainer, template: PromptTemplate, *, device):
        self.rollout_func, self.trainer, self.template, self.device = rollout_func, trainer, template, device
        self.tokenizer = template.tokenizer

    def produce(self, rows, indices, settings, group_size, *, first_group_id: int = 0) -> Rollout:
        G = group_size
        prompts = [copy.deepcopy(r["prompt"]) for r in rows for _ in range(G)]
        out = self.rollout_func(copy.deepcopy(prompts), self.trainer)
        N = len(prompts)
        if not isinstance(out, dict):
            raise TypeError(f"rollout_func must return a dict with {list(_REQUIRED)}, got {type(out).__name__}")
        missing = [k for k in _REQUIRED if k not in out]
        if missing:
            raise ValueError(f"rollout_func must return keys {missing} in its output dict")
        prompt_ids, completion_ids, logprobs = out["prompt_ids"], out["completion_ids"], out["logprobs"]
        env_mask = out.get("env_mask")
        for name, value in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids), ("logprobs", logprobs),
                            ("env_mask", env_mask)):
            if value is not None and len(value) != N:
                raise ValueError(f"rollout_func returned {len(value)} {name} for {N} prompts (the prompts list holds "
                                 f"each prompt num_generations={G} times, as TRL passes them: return one completion "
                                 "per entry, in order)")
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        samples: List[Sample] = []
        for i in range(N):
            ids = [int(t) for t in completion_ids[i]]
            mask = [1] * len(ids) if env_mask is None else [int(bool(m)) for m in env_mask[i]]
            if len(mask) != len(ids):
                raise ValueError(f"rollout_func: env_mask[{i}] has {len(mask)} entries for {len(ids)} completion tokens")
            lp = None
            if logprobs is not None:
                if len(logprobs[i]) != len(ids):
                    raise ValueError(f"rollout_func: logprobs[{i}] has {len(logprobs[i])} entries for {len(ids)} "
                                     "completion tokens")
                lp = [float("nan") if (m == 0 or v is None) else float(v) for v, m in zip(logprobs[i], mask)]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            samples.append(Sample(prompt_ids=[int(t) for t in prompt_ids[i]], completion_ids=ids, sampled=mask,
                                  logprobs=lp, finish_reason="stop" if ids and ids[-1] in (eos, pad) else "length",
                                  completion=self.template.completion(prompts[i], text)))
        columns: Dict[str, List[Any]] = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        for k, v in out.items():
            if k in _REQUIRED or k == "env_mask":
                continue
            columns[k] = [v[i] if i < len(v) else None for i in range(N)] if isinstance(v, list) else [v] * N
        return collate(samples, prompts=prompts, dataset_index=[i for i in indices for _ in range(G)], columns=columns,
                       group_size=G, pad_token_id=pad, device=self.device, first_group_id=first_group_id)
