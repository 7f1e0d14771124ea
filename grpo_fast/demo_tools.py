"""The built-in multi-turn task: `grpo-fast train --task tools`, offline, minutes on a CPU.

The demo's tiny character-level Llama is asked two-digit additions ("37+48=") that it cannot do
alone, and given a tool that can: `add(a, b)`. A short supervised warm-up on chat transcripts
teaches the format: most transcripts answer directly (the teacher is right, but two-digit sums
are beyond what the tiny model learns in the warm-up, so its own answers are mostly wrong), a
few call the tool and copy its result. GRPO with the tool then moves the probability onto calling
it: the tool-call frequency and the reward rise together.

The chat template is Qwen2-style (`<|im_start|>role ... <|im_end|>`, calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, results as `<tool_response>` in a
user turn), with a one-line tool list instead of Qwen's JSON schemas so prompts stay short for a
character-level model. `build_chat_tokenizer` is also what the multi-turn tests use.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .algorithms import GRPOTrainer
from .config import GRPOConfig
from .demo import _CHARS, build_model, supervised_step, train_task

__all__ = ["CHAT_TEMPLATE", "add", "answer_reward", "build_chat_tokenizer", "build_tools_demo", "run_tools_demo",
           "tools_config_defaults", "tools_dataset"]

_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
_TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]   # added, not special (Qwen)

# Qwen2.5's structure, compact: the tools' names and parameters on one system line
CHAT_TEMPLATE = (  # newlines after a tag are written as {{ '\n' }}: chat templates run with trim_blocks
    "{% if tools %}<|im_start|>system{{ '\\n' }}"
    "{% if messages[0].role == 'system' %}{{ messages[0].content + '\\n' }}{% endif %}Tools:"
    "{% for tool in tools %} {{ tool.function.name }}({{ tool.function.parameters.properties | list | join(', ') }})"
    "{% endfor %}<|im_end|>{{ '\\n' }}"
    "{% elif messages[0].role == 'system' %}{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant"
    "{% if message.content %}{{ '\\n' + message.content }}{% endif %}"
    "{% for tc in message.tool_calls %}{% set f = tc.function if tc.function is defined else tc %}"
    "{{ '\\n<tool_call>{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}</tool_call>' }}"
    "{% endfor %}<|im_end|>{{ '\\n' }}"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>' + message.content + '</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>{{ '\\n' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


def build_chat_tokenizer():
    """A character-level tokenizer with Qwen's chat tokens, built in code: <|im_end|> is the EOS
    (as in Qwen2.5-Instruct), <tool_call> and friends are single added tokens, and the chat
    template (CHAT_TEMPLATE) renders tools, tool calls and tool messages."""
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _TOOL_TOKENS + _CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                        truncation_side="left")
    tokenizer.add_tokens(_TOOL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The sum of a and b.
    """
    return int(a) + int(b)


def tools_dataset(n: int = 400, seed: int = 0, low: int = 10, high: int = 99) -> List[Dict[str, Any]]:
    """Two-digit additions as chat prompts; the answer column reaches the reward."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)})
    return rows


def answer_reward(completions, answer, **kwargs) -> List[float]:
    """1 when the last assistant message is exactly the sum, else 0."""
    out = []
    for messages, want in zip(completions, answer):
        last = [m for m in messages if m.get("role") == "assistant"][-1]
        out.append(1.0 if (last.get("content") or "").strip() == str(want) else 0.0)
    return out


def _transcript(tokenizer, row, use_tool: bool) -> str:
    a, b = (int(x) for x in row["prompt"][0]["content"].rstrip("=").split("+"))
    messages = list(row["prompt"])
    if use_tool:
        messages += [{"role": "assistant", "content": "",
                      "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]},
                     {"role": "tool", "name": "add", "content": str(a + b)}]
    messages.append({"role": "assistant", "content": row["answer"]})
    return tokenizer.apply_chat_template(messages, tools=[add], tokenize=False)


def warmup(model, tokenizer, data, *, steps: int, tool_fraction: float, lr: float = 3e-3, batch_size: int = 64,
           seed: int = 0) -> float:
    """Supervised warm-up on transcripts (a `tool_fraction` of them call the tool); the loss is on
    the assistant turns only. Returns the last loss."""
    rng = random.Random(seed)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        texts = [_transcript(tokenizer, rng.choice(data), rng.random() < tool_fraction) for _ in range(batch_size)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = torch.full_like(enc["input_ids"], -100)
        for r, ids in enumerate(enc["input_ids"].tolist()):
            inside = False
            for t in range(len(ids)):   # learn what follows each "<|im_start|>assistant\n", through its <|im_end|>
                if ids[t] == start and ids[t + 1:t + 1 + len(header)] == header:
                    inside, skip = True, len(header) + 1
                if inside:
                    if skip > 0:
                        skip -= 1
                    else:
                        labels[r, t] = ids[t]
                        if ids[t] == end:
                            inside = False
        labels[enc["attention_mask"] == 0] = -100
        loss_value = supervised_step(model, opt, enc, labels)
    model.eval()
    return loss_value


def tools_config_defaults() -> Dict[str, Any]:
    """GRPOConfig values for the tools task (CLI and YAML values override these)."""
    return dict(
        output_dir="runs/tools", learning_rate=5e-4, lr_scheduler_type="constant", warmup_steps=0, max_steps=300,
        per_device_train_batch_size=64, num_generations=8, gradient_accumulation_steps=1, max_prompt_length=None,
        max_completion_length=96, max_tool_calling_iterations=2, temperature=1.0, beta=0.0, logging_steps=1,
        save_steps=0, seed=0, dtype="float32", disable_dropout=True)


def build_tools_demo(seed: int = 0, *, warmup_steps: int = 240, tool_fraction: float = 0.1, verbose: bool = True,
                     num_heads: int = 2) -> Dict[str, Any]:
    """The tokenizer, the warmed-up tiny model, the data, the reward and the tool of the task.

    The warm-up has two parts: the first five sixths of `warmup_steps` on transcripts half of which
    call the tool (the model learns the format and to copy the numbers into the call and the result
    into its answer), the rest with only `tool_fraction` of them calling it, which sets how often
    the model calls the tool when RL starts. num_heads=2 gives head_dim 32 (vLLM's CPU attention
    runs it too)."""
    tokenizer = build_chat_tokenizer()
    model = build_model(tokenizer, hidden_size=64, num_layers=2, num_heads=num_heads, seed=seed,
                        max_position_embeddings=256)
    data = tools_dataset(seed=seed)
    first = warmup_steps * 5 // 6
    warmup(model, tokenizer, data, steps=first, tool_fraction=0.5, seed=seed)
    loss = warmup(model, tokenizer, data, steps=warmup_steps - first, tool_fraction=tool_fraction, seed=seed + 1)
    if verbose:
        print(f"[tools] supervised warm-up: {warmup_steps} steps (half, then {tool_fraction:.0%}, of the transcripts "
              f"call the tool), final loss {loss:.3f}")
    return {"model": model, "tokenizer": tokenizer, "train_dataset": data, "reward_funcs": [answer_reward],
            "tools": [add]}


def run_tools_demo(config=None, overrides: Optional[Dict[str, Any]] = None, trainer_cls=None):
    """Warm up, train with the tool, plot, print a summary; returns the history."""
    if config is None:
        config = GRPOConfig(**{**tools_config_defaults(), **(overrides or {})})
    trainer, history, elapsed, rank0 = train_task(config, trainer_cls or GRPOTrainer,
                                                  lambda verbose: build_tools_demo(config.seed, verbose=verbose))
    if rank0:
        rewards = [h["reward"] for h in history if "reward" in h]
        calls = [h["tools/call_frequency"] for h in history if "tools/call_frequency" in h]
        if rewards:
            k = min(10, len(rewards))
            print(f"[tools] reward: mean of the first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} "
                  f"{sum(rewards[-k:]) / k:.3f}; tool calls per completion {sum(calls[:k]) / k:.2f} -> "
                  f"{sum(calls[-k:]) / k:.2f}; wall time {elapsed:.0f}s including the warm-up")
        print(f"[tools] metrics: {trainer.metrics_path}")
        if trainer.plot_paths:
            print(f"[tools] plots: {os.path.dirname(trainer.plot_paths[0])}")
    return history
