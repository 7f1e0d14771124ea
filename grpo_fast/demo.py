"""The built-in task: `grpo-fast train` with no model runs this, offline, in minutes on a CPU.

Pipeline in miniature (pre-training -> SFT -> RL):
  - a character-level tokenizer and a tiny Llama built from a config (nothing is downloaded);
  - a short supervised warm-up on single-digit addition ("3+5=" -> "8<eos>"): 60 steps teach
    the format ("<digits><eos>") but only some of the sums, so sampling at temperature 1 is
    right about a quarter of the time;
  - GRPO with a rule reward (1 for the right number, else 0, as in DeepSeekMath) then moves
    the probability onto the right answers: the mean reward starts low and climbs.
  - `run_demo` holds out a fifth of the pairs (never seen in the warm-up or in training) and
    evaluates greedily on them every eval_steps: the held-out accuracy (eval_reward) is plotted
    beside the training reward.
"""
from __future__ import annotations

import os
import random
import time
from typing import Any, Dict, List, Optional

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .rewards import accuracy_reward
from .algorithms import GRPOTrainer
from .config import GRPOConfig

# printable ASCII; anything else maps to <unk>
_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

# A chat template in the usual Jinja form, so chat-style prompts render with this tokenizer too.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast built in code: bos/eos/pad/unk + printable ASCII.

    No BOS is added to plain text (prompts are tokenized as TRL does, without special tokens).
    """
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", truncation_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
                max_position_embeddings: int = 64):
    """A tiny Llama (about 70k parameters at the defaults) from a config, randomly initialised."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # the model's own generation defaults must not leak into sampling (the trainer sets them)
    model.generation_config.do_sample = True
    return model


def addition_dataset(low: int = 0, high: int = 9) -> List[Dict[str, Any]]:
    """Every "a+b=" with low <= a, b <= high; the answer column reaches the reward function."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)}
            for a in range(low, high + 1) for b in range(low, high + 1)]


def split_holdout(data: List[Dict[str, Any]]):
    """(train, held_out): the pairs a+b= with (3a + b) % 5 == 0 held out (20 of the 100), fixed."""
    def held(row):
        a, b = row["prompt"].rstrip("=").split("+")
        return (3 * int(a) + int(b)) % 5 == 0
    return [r for r in data if not held(r)], [r for r in data if held(r)]


def warmup(model, tokenizer, data, *, steps: int = 60, teacher_accuracy: float = 1.0,
           lr: float = 3e-3, batch_size: int = 100, seed: int = 0) -> float:
    """Supervised warm-up (deliberately short); returns the last training loss.

    Each label is the right sum with probability `teacher_accuracy`, else a random number in the
    answer range (a noisy teacher; the demo uses a clean one and few steps instead).
    """
    rng = random.Random(seed)
    answers = sorted({int(row["answer"]) for row in data})
    lo, hi = answers[0], answers[-1]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=gen).tolist()
        texts, prompt_lens = [], []
        for i in idx:
            row = data[i]
            label = row["answer"] if rng.random() < teacher_accuracy else str(rng.randint(lo, hi))
            texts.append(row["prompt"] + label + tokenizer.eos_token)
            prompt_lens.append(len(tokenizer(row["prompt"])["input_ids"]))
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        width = labels.shape[1]
        for r, plen in enumerate(prompt_lens):
            pad = width - int(enc["attention_mask"][r].sum())
            labels[r, : pad + plen] = -100  # learn the answer only
        loss_value = supervised_step(model, opt, enc, labels)
    model.eval()
    return loss_value


def supervised_step(model, opt, enc, labels) -> float:
    """One optimiser step of next-token loss on `labels` (-100: not learnt), positions as under
    left padding; returns the loss."""
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out = model(**enc, position_ids=position_ids, labels=labels)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return float(out.loss.detach())


def demo_config_defaults() -> Dict[str, Any]:
    """GRPOConfig values for the built-in task (CLI and YAML values override these)."""
    return dict(
        output_dir="runs/demo",
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=600,
        per_device_train_batch_size=128,   # completions per micro-batch: 16 prompts x 8
        num_generations=8,
        gradient_accumulation_steps=1,
        max_prompt_length=16,
        max_completion_length=4,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        logging_steps=1,
        save_steps=200,
        seed=0,
        weight_decay=0.0,
        dtype="float32",
        eval_strategy="steps",             # greedy accuracy on the held-out pairs (run_demo)
        eval_steps=20,
        plot=True,                         # the reward curve is part of the demo, whatever report_to says
    )


def accuracy(model, tokenizer, data, *, max_new_tokens: int = 4) -> float:
    """Greedy accuracy on `data` (used by the summary)."""
    enc = tokenizer([r["prompt"] for r in data], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = accuracy_reward([r["prompt"] for r in data], texts, answer=[r["answer"] for r in data])
    return sum(scores) / len(scores)


def build_demo(seed: int = 0, *, warmup_steps: int = 60, teacher_accuracy: float = 1.0,
               verbose: bool = True, holdout: bool = False, num_heads: int = 4) -> Dict[str, Any]:
    """Tokenizer, warmed-up tiny model, dataset and reward function of the built-in task.

    holdout=True: train_dataset (warm-up and RL) has 80 pairs and eval_dataset the other 20
    (split_holdout); False: all 100 pairs train and eval_dataset is None.
    num_heads: attention heads of the tiny Llama (2 gives head_dim 32, the smallest vLLM's CPU
    attention supports; the demo uses it with use_vllm).
    """
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, num_heads=num_heads, seed=seed)
    data, held_out = split_holdout(addition_dataset()) if holdout else (addition_dataset(), None)
    loss = warmup(model, tokenizer, data, steps=warmup_steps, teacher_accuracy=teacher_accuracy, seed=seed)
    if verbose:
        print(f"[demo] supervised warm-up: {warmup_steps} steps (teacher right {teacher_accuracy:.0%} "
              f"of the time), final loss {loss:.3f}")
    return {"model": model, "tokenizer": tokenizer, "train_dataset": data, "eval_dataset": held_out,
            "reward_funcs": [accuracy_reward]}


def train_task(config, trainer_cls, build):
    """Train a built-in task: its parts from build(verbose) (model, tokenizer, train_dataset,
    reward_funcs, and eval_dataset / tools when it has them), the trainer, train(), with one
    intra-op thread. -> (trainer, history, seconds including the build, is rank 0)."""
    # The model is tiny: a second intra-op thread buys little, and on a busy shared machine two
    # spinning OpenMP threads per process can make every step 10-50x slower. One thread is also
    # what makes the run reproducible from machine to machine. GRPO_FAST_DEMO_THREADS overrides;
    # the caller's thread count is restored afterwards.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("GRPO_FAST_DEMO_THREADS", "1")))
    try:
        t0 = time.perf_counter()
        rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
        parts = build(rank0)
        extra = {k: parts[k] for k in ("eval_dataset", "tools") if parts.get(k) is not None}
        trainer = trainer_cls(parts["model"], parts["reward_funcs"], parts["train_dataset"], config=config,
                              tokenizer=parts["tokenizer"], **extra)
        history = trainer.train()
        return trainer, history, time.perf_counter() - t0, rank0
    finally:
        torch.set_num_threads(threads_before)


def run_demo(config=None, overrides: Optional[Dict[str, Any]] = None, trainer_cls=None):
    """Warm up, train (GRPO unless another trainer class is given), plot, print a summary; returns the history."""
    if config is None:
        config = GRPOConfig(**{**demo_config_defaults(), **(overrides or {})})
    # vLLM's CPU attention needs head_dim >= 32: 2 heads of 32 instead of 4 of 16 with use_vllm
    heads = 2 if getattr(config, "use_vllm", False) else 4
    trainer, history, elapsed, rank0 = train_task(
        config, trainer_cls or GRPOTrainer,
        lambda verbose: build_demo(config.seed, verbose=verbose, holdout=True, num_heads=heads))
    rewards = [h["reward"] for h in history if "reward" in h]
    if not rank0:
        return history
    if rewards:
        tail = rewards[-10:]
        print(f"[demo] mean reward: first {rewards[0]:.3f} -> last {rewards[-1]:.3f} "
              f"(mean of the last {len(tail)}: {sum(tail) / len(tail):.3f}) over {len(rewards)} logged steps; "
              f"wall time {elapsed:.0f}s including the warm-up")
    evals = [h["eval_reward"] for h in history if h.get("eval_reward") is not None]
    if evals:
        print(f"[demo] held-out greedy accuracy (20 pairs never trained on): {evals[0]:.2f} -> {evals[-1]:.2f}")
    print(f"[demo] metrics: {trainer.metrics_path}")
    if trainer.plot_paths:
        print(f"[demo] reward curve: {trainer.plot_paths[0]}")
    print(f"[demo] final model: {trainer.final_dir}")
    return history
