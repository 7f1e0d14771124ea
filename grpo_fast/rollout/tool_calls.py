"""Tool calls: the tools' schemas, and the calls a sampled assistant turn makes.

    tool_schemas(tools)         the JSON schema of each tool (transformers.utils.get_json_schema),
                                checked once at start so a tool without type hints or a docstring
                                fails then, naming the tool
    parse_turn(...)             a sampled turn -> (the assistant message, its calls)

A turn is parsed with the tokenizer's own response parsing when it has one (its
`response_template`, transformers' `parse_response`), else in the Hermes / Qwen form every
Qwen2.5 / Qwen3 / Hermes chat template renders: `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`. A call whose JSON does not parse, whose name is missing or whose arguments are not
an object is still a call: it carries an error, which goes back to the model as the tool's
message (the model learns from it; the run never fails on what a model writes).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from transformers.utils import get_json_schema

__all__ = ["ToolCall", "parse_turn", "tool_name", "tool_schemas"]

_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolCall:
    """One call of a turn: the tool's name and arguments, or what was wrong with it."""

    name: str
    arguments: Dict[str, Any]
    error: Optional[str] = None        # malformed: this text is the tool message, nothing runs

    def message(self) -> Dict[str, Any]:
        """The call as an assistant message's tool_calls entry (TRL / transformers form)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_name(tool: Callable) -> str:
    return getattr(tool, "__name__", type(tool).__name__)


def tool_schemas(tools: Sequence[Callable]) -> Dict[str, Dict[str, Any]]:
    """name -> JSON schema of each tool, as the chat template receives it. Raises ValueError naming
    a tool whose schema cannot be made (no type hints, no Google-style docstring) or a name used twice."""
    out: Dict[str, Dict[str, Any]] = {}
    for tool in tools:
        if not callable(tool):
            raise TypeError(f"tools: {tool!r} is not callable (tools are plain Python functions)")
        name = tool_name(tool)
        try:
            schema = get_json_schema(tool)
        except Exception as e:  # transformers raises TypeError / DocstringParsingException
            raise ValueError(f"tool {name!r}: its JSON schema cannot be made ({e}); a tool needs type hints on "
                             "every argument and a Google-style docstring with an Args: section "
                             "(https://huggingface.co/docs/transformers/en/chat_extras#passing-tools)") from e
        if name in out:
            raise ValueError(f"two tools are named {name!r}: tool names must be unique (an environment's public "
                             "methods are tools too)")
        out[name] = schema
    return out


def _call_from_json(text: str) -> ToolCall:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return ToolCall("unknown", {}, f"malformed tool call: not JSON ({e.msg} at character {e.pos})")
    if not isinstance(obj, dict):
        return ToolCall("unknown", {}, 'malformed tool call: expected {"name": ..., "arguments": {...}}')
    if "function" in obj and isinstance(obj["function"], dict):   # {"type": "function", "function": {...}}
        obj = obj["function"]
    return _checked(obj.get("name"), obj.get("arguments"))


def _checked(name, arguments) -> ToolCall:
    if not isinstance(name, str) or not name:
        return ToolCall("unknown", {}, "malformed tool call: no tool name")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(name, {}, f"malformed arguments for {name}: not JSON ({e.msg})")
    if not isinstance(arguments, dict):
        return ToolCall(name, {}, f"malformed arguments for {name}: expected an object of named arguments, "
                                  f"got {type(arguments).__name__}")
    return ToolCall(name, arguments)


def _hermes(raw: str, clean: Callable[[str], str]) -> Tuple[Dict[str, Any], List[ToolCall]]:
    """`<tool_call>{json}</tool_call>` blocks (the last one may be unterminated: malformed)."""
    calls = []
    for m in _BLOCK.finditer(raw):
        body = clean(m.group(1)).strip()
        if not m.group(0).endswith("</tool_call>"):
            calls.append(ToolCall("unknown", {}, "malformed tool call: <tool_call> without </tool_call>"))
        else:
            calls.append(_call_from_json(body))
    content = clean(_BLOCK.sub("", raw)).strip()
    message: Dict[str, Any] = {"role": "assistant", "content": content}
    good = [c.message() for c in calls if c.error is None]
    if good:
        message["tool_calls"] = good
    return message, calls


def _from_template(tokenizer, ids, prefix, tools) -> Tuple[Dict[str, Any], List[ToolCall]]:
    parsed = tokenizer.parse_response(list(ids), prefix=list(prefix), tools=list(tools) or None)
    if not isinstance(parsed, dict):
        raise ValueError("parse_response returned no message")
    content = parsed.get("content") or ""
    if isinstance(content, str) and tokenizer.eos_token:
        content = content.removesuffix(tokenizer.eos_token)
    calls = []
    for c in parsed.get("tool_calls") or []:
        if not isinstance(c, dict):
            calls.append(ToolCall("unknown", {}, "malformed tool call"))
        elif c.get("type", "function") != "function":
            calls.append(ToolCall(str(c.get("name", "unknown")), {}, f"Unsupported tool call type: {c.get('type')}"))
        else:
            f = c.get("function", c)
            calls.append(_checked(f.get("name"), f.get("arguments")))
    # what else the parser found (the reasoning, say) stays in the message
    message: Dict[str, Any] = {**{k: v for k, v in parsed.items() if k != "tool_calls"}, "role": "assistant",
                               "content": content}
    good = [c.message() for c in calls if c.error is None]
    if good:
        message["tool_calls"] = good
    return message, calls


def parse_turn(tokenizer, ids: Sequence[int], *, prefix: Sequence[int], tools: Sequence[Callable] = ()
               ) -> Tuple[Dict[str, Any], List[ToolCall]]:
    """(assistant message, calls) of one sampled turn `ids`; `prefix` is every token before it.

    The message is what reward functions and the completion log see: the text outside the calls
    (special tokens removed) and `tool_calls` in transformers' form (well-formed calls only)."""
    if getattr(tokenizer, "response_template", None) is not None:
        try:
            message, calls = _from_template(tokenizer, ids, prefix, tools)
            if calls or "<tool_call>" not in message["content"]:
                return message, calls
        except Exception:  # a turn the template's parser cannot read: try the Hermes form, as text
            pass
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]

    def clean(text: str) -> str:
        for t in specials:
            text = text.replace(t, "")
        return text

    return _hermes(tokenizer.decode(list(ids), skip_special_tokens=False), clean)
