"""RewardModel: a sequence-classification model used as a reward function."""
from __future__ import annotations

from typing import List, Optional

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..model import hub
from .rules import _text

__all__ = ["RewardModel"]


class RewardModel:
    """A sequence-classification model as a reward function: the score is logit 0 of prompt + completion.

    `model` is an AutoModelForSequenceClassification instance, a local path or a hub id (loaded as
    transformers does: model/hub.py), `tokenizer` its tokenizer (loaded from the same name when the
    model is given by name). Conversational samples are rendered with the tokenizer's chat template.
    """

    def __init__(self, model, tokenizer=None, *, batch_size: int = 32, max_length: Optional[int] = None):
        if isinstance(model, str):
            name = model
            model = hub.from_pretrained(AutoModelForSequenceClassification, name, what="reward model")
            tokenizer = tokenizer or hub.from_pretrained(AutoTokenizer, name, what="reward model's tokenizer")
        if tokenizer is None:
            raise ValueError("RewardModel needs the reward model's tokenizer")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.__name__ = f"reward_model[{name.rstrip('/').split('/')[-1] or type(model).__name__}]"

    def _render(self, prompt, completion) -> str:
        if isinstance(prompt, list):  # chat messages
            messages = list(prompt) + (completion if isinstance(completion, list)
                                       else [{"role": "assistant", "content": _text(completion)}])
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return _text(prompt) + _text(completion)

    def __call__(self, prompts, completions, completion_ids=None, **columns) -> List[float]:
        texts = [self._render(p, c) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        scores: List[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=self.max_length is not None, max_length=self.max_length,
                                     add_special_tokens=True).to(device)
                logits = self.model(**enc).logits  # (b, num_labels)
                scores.extend(logits[:, 0].float().tolist())
        return scores
