"""GRPO steps/s end to end with each rollout engine: HF generate vs vLLM colocated (issue 13).

Model: bench_rollout's ~15.7M-parameter Llama built from a config with random weights (hidden 384,
6 layers, 6 heads of 64 - vLLM's CPU attention needs head_dim in {32, 64, ...} -, MLP 1536,
vocabulary 4096, tied embeddings), fp32. Tokenizer built in code: word-level "t0".."t4095",
whitespace-split. Prompts: 16 random tokens each. Reward: the fraction of even token ids in the
completion (dense, cheap, so advantages are non-zero). One step = sample prompts x G completions
of max_completion_length new tokens (temperature 1, no EOS stop in practice), rewards,
advantages, one optimiser step (loss dapo, beta 0, lr 1e-5). With vLLM the trainer also
recomputes the old log-probs (for the IS correction and the rollout_logp_diff metrics) and syncs
the weights into the engine after the step; all of that is in its step time.
Each (engine, threads) runs in a fresh process, one at a time; the first step is a warm-up
(vLLM's first generate, allocator warm-up) and is not counted. The step time is the trainer's own
`step_time` metric (rollout + rewards + update + weight sync); the CPU time of the process per
step (all its threads, vLLM's included: it runs in-process) is measured next to it, since the
machine is shared and wall times follow the other jobs.

    python bench/bench_grpo_engines.py                          # markdown table
    python bench/bench_grpo_engines.py --threads 1 --steps 1 --prompts 2   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def build_tokenizer(V: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", pad_token="t0", eos_token=f"t{V - 1}",
                                   unk_token="t1", padding_side="left")


def even_reward(prompts, completions, completion_ids, **kw):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def run_one(engine: str, threads: int, args) -> dict:
    import torch

    torch.set_num_threads(threads)
    import bench_rollout
    from grpo_fast import GRPOConfig, GRPOTrainer

    model = bench_rollout.build_model("float32").train()
    V = model.config.vocab_size
    tok = build_tokenizer(V)
    prompts = bench_rollout.make_prompts(args.prompts * 4, args.prompt_len, V)
    dataset = [{"prompt": " ".join(f"t{i}" for i in p)} for p in prompts]
    G = args.generations
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix=f"bench_eng_{engine}{threads}_"), max_steps=args.steps + 1,
                     per_device_train_batch_size=args.prompts * G // args.micro_batches,
                     gradient_accumulation_steps=args.micro_batches, num_generations=G,
                     max_completion_length=args.new_tokens, max_prompt_length=args.prompt_len, temperature=1.0,
                     learning_rate=1e-5, lr_scheduler_type="constant", beta=0.0, loss_type="dapo", seed=0,
                     use_vllm=engine == "vllm", vllm_max_model_length=args.prompt_len + args.new_tokens,
                     save_steps=0, save_final_model=False, plot=False, report_to="none", disable_tqdm=True,
                     logging_steps=1)
    t0 = time.perf_counter()
    stamps = [(time.perf_counter(), time.process_time())]   # after each step: wall, process CPU time
    trainer = GRPOTrainer(model, [even_reward], dataset, config=cfg, tokenizer=tok,
                          callbacks=[lambda tr, m: stamps.append((time.perf_counter(), time.process_time()))])
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    stamps[0] = (t0, time.process_time())
    history = trainer.train()
    total = time.perf_counter() - t0
    timed = history[1:]
    steps = [h["step_time"] for h in timed]
    gens = [h["generation_time"] for h in timed]
    cpu = [b[1] - a[1] for a, b in zip(stamps[1:], stamps[2:])]   # steps 2.. (after the warm-up step)
    out = dict(engine=engine, threads=threads, startup_s=startup, train_s=total, step_times=steps,
               step_cpu=cpu, cpu_median=statistics.median(cpu) if cpu else float("nan"),
               gen_times=gens, step_median=statistics.median(steps), gen_median=statistics.median(gens),
               tokens_per_s=statistics.median([h["tokens_per_s"] for h in timed]),
               rewards=[h["reward"] for h in history], torch_threads=torch.get_num_threads(),
               load=os.getloadavg()[0])
    for k in ("rollout_logp_diff_max", "rollout_logp_diff_mean"):
        vals = [h[k] for h in timed if k in h]
        if vals:
            out[k] = max(vals) if k.endswith("max") else statistics.mean(vals)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child[0], int(args.child[1]), args)), flush=True)
        return 0
    rows = []
    for threads in args.threads:
        for engine in args.engines:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, str(threads),
                   "--prompts", str(args.prompts), "--generations", str(args.generations), "--new-tokens",
                   str(args.new_tokens), "--prompt-len", str(args.prompt_len), "--micro-batches",
                   str(args.micro_batches), "--steps", str(args.steps)]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_ENABLE_V1_MULTIPROCESSING="0")
            load0 = os.getloadavg()[0]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            res = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not res:
                print(f"[bench] {engine} x{threads} failed (rc {p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(res[-1][7:])
            r["load_start"] = load0
            rows.append(r)
            print("[bench] " + json.dumps(r), file=sys.stderr, flush=True)
    print(f"GRPO end to end, {args.prompts} prompts x {args.generations} generations x {args.new_tokens} new tokens "
          f"(prompt {args.prompt_len} tokens), {args.micro_batches} micro-batches per step, ~15.7M-param Llama fp32, "
          f"CPU; {args.steps} timed steps after 1 warm-up step.\n")
    print("| engine | threads | step (s, median) | steps/s | step CPU time (s, median) | generation (s, median) "
          "| tokens / step time | start-up (s) | logp diff max | load avg (start, end) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        d = r.get("rollout_logp_diff_max")
        print(f"| {r['engine']} | {r['threads']} | {r['step_median']:.2f} | {1 / r['step_median']:.3f} | "
              f"{r['cpu_median']:.2f} | {r['gen_median']:.2f} | {r['tokens_per_s']:.0f} | {r['startup_s']:.1f} | "
              f"{'' if d is None else f'{d:.1e}'} | {r['load_start']:.1f}, {r['load']:.1f} |")
    for t in args.threads:
        hf = next((r for r in rows if r["engine"] == "hf" and r["threads"] == t), None)
        vl = next((r for r in rows if r["engine"] == "vllm" and r["threads"] == t), None)
        if hf and vl:
            print(f"\n{t} thread(s): vLLM / HF steps/s = {hf['step_median'] / vl['step_median']:.2f}x, "
                  f"generation {hf['gen_median'] / vl['gen_median']:.2f}x")
    print("\nstep times (s): " + "; ".join(f"{r['engine']}x{r['threads']}: " + ", ".join(
        f"{s:.2f}" for s in r["step_times"]) for r in rows))
    return 0 if len(rows) == len(args.engines) * len(args.threads) else 1


if __name__ == "__main__":
    sys.exit(main())
