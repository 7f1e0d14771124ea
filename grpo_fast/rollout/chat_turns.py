"""The chat template of a multi-turn rollout: prompts rendered with their tools, and the tokens
of tool messages as the template renders them.

The policy's tokens are kept exactly as sampled; between its turns the rollout appends the tokens
the template puts after an assistant turn that called tools: the tool messages and the next
assistant header. Those are found by rendering a stand-in conversation twice, [user, assistant
with the calls] and the same plus the tool messages (with the generation prompt), and taking what
the second adds after the first's end-of-turn token (TRL's method). That is right only if the
template renders earlier messages the same whatever follows ("prefix-preserving"); Qwen3's
template, for one, drops the reasoning of earlier turns. `TurnTemplate` checks this once at start:
a template that fails is replaced by TRL's patched training template when TRL has one for it
(Qwen3, DeepSeek-V3, GPT-OSS, ...), and refused otherwise, with an error that says how to fix it.

The end-of-turn token is the last added-vocabulary token of a rendered assistant turn
(`<|im_end|>` for Qwen, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma); when it is not the
tokenizer's EOS, generation also stops at it.
"""
from __future__ import annotations

import copy
import json
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["TemplateError", "TurnTemplate"]

_NAME, _KEY, _VALUE, _CONTENT = "tool_name_a8f3", "tool_arg_key_b9d4", "tool_arg_value_d6e7", "tool_content_c4f9"

FIX = ("Give the tokenizer a chat template that renders earlier turns the same whatever follows: "
       "`pip install trl` (TRL ships patched training templates for Qwen3, Qwen3.5, DeepSeek-V3, GPT-OSS, Llama 3, "
       "Gemma and others; they are used automatically), or set tokenizer.chat_template yourself "
       "(trl.chat_template_utils.get_training_chat_template(tokenizer) returns TRL's patched one).")


class TemplateError(ValueError):
    """The chat template cannot carry a multi-turn rollout; the message says why and how to fix it."""


def _calls(names: Sequence[str], arguments: Any = None) -> List[Dict[str, Any]]:
    return [{"type": "function", "function": {"name": n, "arguments": {} if arguments is None else arguments}}
            for n in names]


def _stand_in(names: Sequence[str], arguments: Any = None) -> List[Dict[str, Any]]:
    """[user, assistant calling `names`]: what precedes the tool messages of a turn."""
    return [{"role": "user", "content": "dummy"},
            {"role": "assistant", "content": "", "tool_calls": _calls(names, arguments)}]


def _patched_template(tokenizer) -> Optional[str]:
    """TRL's prefix-preserving training template for this tokenizer's template, or None."""
    try:
        from trl.chat_template_utils import get_training_chat_template
    except ImportError:
        return None
    try:
        return get_training_chat_template(tokenizer)
    except Exception:  # TRL has no patched version of this template
        return None


class TurnTemplate:
    """Renders and tokenises the messages of a multi-turn rollout (module docstring)."""

    def __init__(self, tokenizer, max_prompt_length: Optional[int] = None):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateError("tools and environments need a tokenizer with a chat template that renders tool "
                                "calls and tool messages (e.g. Qwen2.5's or Qwen3's); this tokenizer has none")
        self.chat_template: Optional[str] = None     # None: the tokenizer's own
        self._check_tool_calling()
        if not self._prefix_preserving():
            patched = _patched_template(tokenizer)
            if patched is None:
                raise TemplateError("the chat template does not keep earlier turns' tokens as a prefix: rendering "
                                    "[user, assistant with a tool call] and then the same messages plus a tool message "
                                    "changes the first rendering, so the tokens the model sampled could not be kept as "
                                    f"they are. {FIX}")
            self.chat_template = patched
            if not self._prefix_preserving():
                raise TemplateError(f"TRL's patched chat template for this tokenizer is not prefix-preserving either. {FIX}")
            warnings.warn("multi-turn: the tokenizer's chat template does not keep earlier turns as a prefix; "
                          "TRL's patched training template for it is used instead", UserWarning, stacklevel=3)
        self.end_of_turn = self._end_of_turn()
        eos = tokenizer.eos_token_id
        # generation must also stop at the end-of-turn token when the EOS is another token
        self.stop_token_ids: Tuple[int, ...] = () if self.end_of_turn in (None, eos) else (self.end_of_turn,)
        self._prefixes: Dict[Tuple[str, ...], List[int]] = {}
        self._truncation_warned = False

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Sequence[Dict[str, Any]], tools: Sequence[Callable] = (), *,
               add_generation_prompt: bool) -> str:
        kw = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        # `or None`: some templates render tool boilerplate for tools=[] (TRL does the same)
        return self.tokenizer.apply_chat_template(list(messages), tools=list(tools) or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kw)

    def encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render_calls(self, names: Sequence[str], tail: Sequence[Dict[str, Any]] = (), *, add_generation_prompt: bool,
                      arguments: Any = None) -> str:
        try:
            return self.render(_stand_in(names, arguments) + list(tail), add_generation_prompt=add_generation_prompt)
        except TypeError:  # templates that want the arguments as a JSON string (DeepSeek-V3's)
            if arguments is not None:
                raise
            return self.render(_stand_in(names, "{}") + list(tail), add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, messages: Sequence[Dict[str, Any]], tools: Sequence[Callable]) -> List[int]:
        """Token ids of a chat prompt rendered with its tools and the generation prompt (its last
        max_prompt_length tokens; a warning the first time a prompt is cut)."""
        ids = self.encode(self.render(messages, tools, add_generation_prompt=True))
        L = self.max_prompt_length
        if L is not None and len(ids) > L:
            if not self._truncation_warned:
                self._truncation_warned = True
                warnings.warn(f"a multi-turn prompt of {len(ids)} tokens (with its tool schemas) is cut to its last "
                              f"max_prompt_length={L} tokens, which drops the start of the system prompt; set "
                              "max_prompt_length=None (TRL does not cut prompts) or raise it", UserWarning, stacklevel=2)
            ids = ids[-L:]
        return ids

    # ------------------------------------------------------------------ tool messages
    def tool_suffix(self, tool_messages: Sequence[Dict[str, Any]]) -> List[int]:
        """The tokens that follow an assistant turn whose calls got `tool_messages`: the tool
        messages as the template renders them, then the next assistant header."""
        names = tuple(m.get("name", "unknown") for m in tool_messages)
        prefix = self._prefixes.get(names)
        if prefix is None:
            prefix = self._turn_end(self.encode(self._render_calls(names, add_generation_prompt=False)))
            self._prefixes[names] = prefix
        full = self.encode(self._render_calls(names, tool_messages, add_generation_prompt=True))
        if full[:len(prefix)] != prefix:
            raise TemplateError(f"the chat template renders an assistant turn calling {list(names)} differently once "
                                f"its tool messages follow (not prefix-preserving for these calls). {FIX}")
        return full[len(prefix):]

    def _turn_end(self, ids: List[int]) -> List[int]:
        """ids up to and including the last end-of-turn token (all of them when there is none)."""
        ends = [i for i, t in enumerate(ids) if t == self.end_of_turn]
        return ids[:ends[-1] + 1] if ends else ids

    # ------------------------------------------------------------------ checks at start
    def _check_tool_calling(self) -> None:
        messages = [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "", "tool_calls": _calls([_NAME], {_KEY: _VALUE})},
                    {"role": "tool", "name": _NAME, "content": _CONTENT}]
        try:
            text = self.render(messages, add_generation_prompt=False)
        except TypeError:
            bad = copy.deepcopy(messages)
            bad[1]["tool_calls"] = _calls([_NAME], json.dumps({_KEY: _VALUE}))
            text = self.render(bad, add_generation_prompt=False)
        except Exception as e:  # jinja2's TemplateError: the template refuses the roles
            raise TemplateError(f"the chat template cannot render a tool-calling conversation (user -> assistant "
                                f"with tool_calls -> tool): {type(e).__name__}: {e}") from e
        missing = [what for what, s in (("the tool call's name", _NAME), ("its arguments", _KEY),
                                        ("the tool message", _CONTENT)) if s not in text]
        if missing:
            raise TemplateError("the chat template drops " + ", ".join(missing) + " when it renders a tool-calling "
                                "conversation, so the model could not see its tools' results; give the tokenizer a "
                                "template that supports tools (e.g. Qwen2.5's or Qwen3's)")

    def _prefix_preserving(self) -> bool:
        first = self.encode(self._render_calls(["dummy"], add_generation_prompt=False))
        tool = [{"role": "tool", "name": "dummy", "content": "dummy"}]
        second = self.encode(self._render_calls(["dummy"], tool, add_generation_prompt=True))
        return second[:len(first)] == first

    def _end_of_turn(self) -> Optional[int]:
        """The last added-vocabulary token (or EOS) of a rendered assistant turn."""
        tok = self.tokenizer
        candidates = set(getattr(tok, "added_tokens_decoder", {}) or {})
        if tok.eos_token_id is not None:
            candidates.add(tok.eos_token_id)
        head = self.encode(self._render_calls(["dummy"], add_generation_prompt=False))
        user_only = self.encode(self.render(_stand_in(["dummy"])[:1], add_generation_prompt=True))
        turn = head[len(user_only):] if head[:len(user_only)] == user_only else head
        found = [t for t in turn if t in candidates]
        return found[-1] if found else None
