"""Prompt templating and tokenisation: a dataset row's prompt (text, or chat messages rendered by
the tokenizer's chat template) to the token ids the engine samples from.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

__all__ = ["PromptTemplate", "is_conversational"]


def is_conversational(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], dict)


class PromptTemplate:
    """Renders and tokenises prompts as TRL does: chat prompts through the chat template with the
    generation prompt, no special tokens added to plain text, and a prompt longer than
    `max_prompt_length` keeps its last tokens."""

    def __init__(self, tokenizer, max_prompt_length: Optional[int] = None):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length

    def text(self, prompt: Any) -> str:
        if is_conversational(prompt):
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("a chat prompt (list of messages) needs a tokenizer with a chat_template")
            return self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected text or a list of chat messages, got {type(prompt).__name__}")
        return prompt

    def encode(self, prompts: Sequence[Any]) -> List[List[int]]:
        """Token ids of each prompt (its last max_prompt_length tokens)."""
        ids = self.tokenizer([self.text(p) for p in prompts], add_special_tokens=False)["input_ids"]
        L = self.max_prompt_length
        return [list(p[-L:]) if L is not None else list(p) for p in ids]

    def completion(self, prompt: Any, text: str) -> Any:
        """A completion in the prompt's form: text, or [an assistant message] for a chat prompt."""
        return [{"role": "assistant", "content": text}] if is_conversational(prompt) else text
