"""One GRPO update at Qwen's vocabulary: grpo_fast's GRPOTrainer (fused LM head / logits path) vs TRL's (issue 12).

Setup (the same for every provider): a Qwen2-shaped tiny backbone built from a config
(Qwen2Config, vocab_size 151936, tied embeddings as Qwen2-0.5B, --hidden / --layers), fp32, CPU.
No generation: a fixed rollout of 16 completions x 512 tokens (random ids < V, every token
kept, no EOS) after a 16-token prompt, fixed rewards 0/1 alternating (one group of 16), beta 0,
loss "dapo", num_iterations 1, one micro-batch of 16 (per_device_train_batch_size=16 for both),
AdamW, max_grad_norm 1.0. One update = forward + backward + clip + optimizer step.

- ours:    the GRPO algorithm's update(batch) on a hand-built Rollout (advantages from its prepare).
- TRL:     GRPOTrainer.compute_loss(model, inputs) + backward + clip + optimizer step, with `inputs`
           shaped as `_generate_and_score_completions` returns them (prompt_ids, prompt_mask,
           completion_ids, completion_mask, advantages, num_items_in_batch). TRL 1.16 patches its
           fused LM head (trl/kernels/chunked_logprob.py) into the model unconditionally in
           GRPOTrainer.__init__ (add_fused_lm_head); no config field turns it off, so TRL runs fused.

Memory: each provider runs in a FRESH subprocess (one after the other, never in parallel).
Right before each update we write "5" to /proc/self/clear_refs (resets VmHWM to the current
RSS), read VmRSS, run the update and read VmHWM: extra = VmHWM - VmRSS(before). The children run
with MALLOC_MMAP_THRESHOLD_=65536 so large freed buffers go back to the OS and RSS follows the
allocator (the same for every provider). The first update also creates AdamW's state (2x the
parameters) and the gradients (1x); later updates only the gradients: both are reported.
Time: median over the updates after the first, wall clock and CPU time of the process (1 thread:
the CPU time is the work done, less disturbed by other jobs on a shared machine than the wall time).

    python bench/bench_grpo_update_memory.py                     # markdown table
    python bench/bench_grpo_update_memory.py --completion-length 32 --updates 2   # quick check
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PROVIDERS = ("ours_fused", "ours_logits", "trl")
N, P = 16, 16  # completions per update (one group), prompt length


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns that RSS in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    return _status_kib("VmHWM") * 1024


def build_model(vocab: int, hidden: int, layers: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(1, hidden // 32)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).float()


def fixed_rollout(vocab: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (1, P), generator=g).repeat(N, 1)
    completion_ids = torch.randint(3, vocab, (N, T), generator=g)
    rewards = torch.tensor([float(i % 2) for i in range(N)])
    return prompt_ids, torch.ones(N, P, dtype=torch.long), completion_ids, torch.ones(N, T, dtype=torch.long), rewards


def reward_fn(prompts, completions, **kw):
    return [0.0 for _ in completions]


def child(provider: str, args) -> dict:
    torch.set_num_threads(args.threads)
    from grpo_fast import demo

    tok = demo.build_tokenizer()
    model = build_model(args.vocab, args.hidden, args.layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied head counted once
    prompt_ids, prompt_mask, completion_ids, completion_mask, rewards = fixed_rollout(args.vocab, args.completion_length)
    dataset = [{"prompt": "1+1=", "answer": "2"} for _ in range(N)]
    out_dir = tempfile.mkdtemp(prefix=f"bench_upd_{provider}_")
    common = dict(per_device_train_batch_size=N, num_generations=N, max_completion_length=args.completion_length,
                  learning_rate=1e-6, beta=0.0, loss_type="dapo", max_grad_norm=1.0, temperature=1.0,
                  gradient_checkpointing=False, report_to="none", disable_tqdm=True, seed=0)

    if provider.startswith("ours"):
        from grpo_fast import GRPOConfig, GRPOTrainer
        from grpo_fast.rollout import Rollout

        cfg = GRPOConfig(output_dir=out_dir, max_steps=args.updates, save_steps=0, plot=False, save_final_model=False,
                         max_prompt_length=P, fused_lm_head=provider == "ours_fused", **common)
        trainer = GRPOTrainer(model, [reward_fn], dataset, config=cfg, tokenizer=tok)
        batch = Rollout(prompts=["1+1="] * N, completions=[""] * N, dataset_index=list(range(N)), columns={},
                        prompt_ids=prompt_ids, prompt_attention=prompt_mask, completion_ids=completion_ids,
                        completion_attention=completion_mask, sampled_mask=completion_mask,
                        finish_reasons=["length"] * N, group_ids=torch.zeros(N, dtype=torch.long), group_size=N)
        batch = batch.with_fields(rewards=rewards, rewards_per_func=rewards[:, None]).with_loss_mask()
        batch = trainer.algorithm.prepare(batch, 1)
        active = trainer.policy.fused_head is not None  # False: it fell back to logits
        note = f"fused_lm_head={cfg.fused_lm_head}" + ("" if active == cfg.fused_lm_head else ", FELL BACK to logits")

        def update():
            trainer.algorithm.update(batch, 1)
    else:
        import trl
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        targs = GRPOConfig(output_dir=out_dir, max_steps=args.updates, save_strategy="no", use_cpu=True, bf16=False,
                           warmup_steps=0, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1,
                           max_prompt_length=P, **common) if "max_prompt_length" in GRPOConfig.__dataclass_fields__ \
            else GRPOConfig(output_dir=out_dir, max_steps=args.updates, save_strategy="no", use_cpu=True, bf16=False,
                            warmup_steps=0, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=targs, train_dataset=Dataset.from_list(dataset),
                              processing_class=tok)
        trainer.current_gradient_accumulation_steps = 1
        std = rewards.view(-1, N).std(1, keepdim=True)
        adv = ((rewards.view(-1, N) - rewards.view(-1, N).mean(1, keepdim=True)) / (std + 1e-4)).view(-1)
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                  "completion_mask": completion_mask, "advantages": adv,
                  "num_items_in_batch": completion_mask.sum().float()}
        trainer.create_optimizer()
        opt = trainer.optimizer
        tmodel = trainer.model
        params = [p for p in tmodel.parameters() if p.requires_grad]
        note = f"trl {trl.__version__}, fused head patched by GRPOTrainer.__init__"

        def update():
            tmodel.train()
            opt.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(tmodel, inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    extras, times, cpu = [], [], []
    for _ in range(args.updates):
        before = _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        update()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        extras.append(_peak() - before)
    return {"provider": provider, "model_bytes": model_bytes, "extra_first": extras[0],
            "extra_steady": max(extras[1:]) if len(extras) > 1 else float("nan"),
            "time_first": times[0], "time_median": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "cpu_median": statistics.median(cpu[1:]) if len(cpu) > 1 else cpu[0],
            "times": times, "cpu": cpu, "extras": extras, "threads": torch.get_num_threads(), "note": note}


def free_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--completion-length", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--updates", type=int, default=4, help="updates per provider (the first is not timed)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return 0

    logits_bytes = N * args.completion_length * args.vocab * 4
    rows = []
    for prov in args.providers.split(","):
        avail = free_gib()
        if avail < 1.5 * logits_bytes / 2**30 + 2:
            print(f"[bench] {prov}: skipped, only {avail:.1f} GiB available", file=sys.stderr)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", prov] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "providers")]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536",
                   MALLOC_TRIM_THRESHOLD_="0")
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        res = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not res:
            print(f"[bench] {prov} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(res[-1][7:])
        r["load"] = (load0, os.getloadavg()[0])
        r["wall"] = wall
        rows.append(r)
        print(f"[bench] {prov}: {json.dumps(r)}", file=sys.stderr, flush=True)

    gb = lambda b: b / 1e9  # noqa: E731
    trl_row = next((r for r in rows if r["provider"] == "trl"), None)
    logits_row = next((r for r in rows if r["provider"] == "ours_logits"), None)
    print(f"One GRPO update, {N} completions x {args.completion_length} tokens (+{P}-token prompt), V = {args.vocab}, "
          f"Qwen2 backbone hidden {args.hidden}, {args.layers} layer(s), tied head, fp32, CPU "
          f"({platform.processor() or platform.machine()}), {args.threads} thread(s), torch {torch.__version__}. "
          f"One step's fp32 logits: {gb(logits_bytes):.2f} GB.\n")
    print("| provider | model (GB) | peak extra, 1st update (GB) | peak extra, later updates (GB) | x TRL (later) "
          "| / logits (later) | step time, median (s) | CPU time, median (s) | x logits path (CPU time) "
          "| load avg (start, end) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        vs_trl = r["extra_steady"] / trl_row["extra_steady"] if trl_row else float("nan")
        vs_log = r["cpu_median"] / logits_row["cpu_median"] if logits_row else float("nan")
        print(f"| {r['provider']} ({r['note']}) | {gb(r['model_bytes']):.3f} | {gb(r['extra_first']):.3f} | "
              f"{gb(r['extra_steady']):.3f} | {vs_trl:.3f} | {r['extra_steady'] / logits_bytes:.3f} | "
              f"{r['time_median']:.2f} | {r['cpu_median']:.2f} | {vs_log:.2f} | {r['load'][0]:.2f}, {r['load'][1]:.2f} |")
    print("\nper-update wall / CPU times (s): " + "; ".join(
        f"{r['provider']}: " + ", ".join(f"{t:.1f}/{c:.1f}" for t, c in zip(r["times"], r["cpu"])) for r in rows))
    return 0 if len(rows) == len(args.providers.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
