"""Memory once the trainer is built, and after its first step: grpo_fast's GRPOTrainer vs TRL 1.16's,
one model loaded by path (beta 0, the HF engine, CPU, float32 parameters).

The model: a Llama with SmolLM2-135M-Instruct's shape (hidden 576, 30 layers, 9 heads / 3 KV heads,
intermediate 1536, vocabulary 49152, tied embeddings: 134.5M parameters), randomly initialised in
code and saved in --save-dtype (nothing is downloaded). Both trainers load it by path in float32
(TRL's default and ours).

Each trainer runs in a FRESH subprocess (one after the other). After the imports and the dataset,
the child writes "5" to /proc/self/clear_refs (resets VmHWM to the current RSS), reads the RSS,
builds the trainer, reads it again, then trains one step (8 completions of at most 8 tokens,
save_strategy="no") and reads it once more. Every number is the growth since before construction:
RSS, its anonymous part (RssAnon: allocations) and its file-backed part (RssFile: pages of mapped
files, here the checkpoint), and the peak (VmHWM). The children run with
MALLOC_MMAP_THRESHOLD_=65536 (freed buffers go back to the OS) and one thread. One float32 copy of
the weights is 134.5M x 4 B = 513 MiB.

What it shows (bench/RESULTS.md): with a float32 checkpoint transformers maps the weights from the
file instead of copying them; they become resident when a forward first reads them. grpo_fast's
fused-LM-head check (one forward on 16 tokens at construction) reads them all, TRL's first read is
its first step: after construction grpo_fast holds one copy's worth of file pages more (no extra
anonymous memory), after the first step the two are level. With a bfloat16 checkpoint both convert
to float32 at load (one anonymous copy each).

    python bench/bench_construct_memory.py                          # both checkpoint dtypes
    python bench/bench_construct_memory.py --layers 4 --no-step     # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PROVIDERS = ("ours", "trl")


_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def _status_mib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in _KEYS:
                out[key] = int(line.split()[1]) / 1024
    return out


def build_model_dir(path: str, layers: int, dtype: str) -> int:
    """Save the SmolLM2-135M-shaped Llama (bf16) and a tokenizer into `path`; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_fast import demo

    tok = demo.build_tokenizer()
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def child(provider: str, model_dir: str, out_dir: str, step: bool) -> dict:
    import gc

    import torch

    torch.set_num_threads(1)
    data = [{"prompt": f"{a}+{b}="} for a in range(4) for b in range(4)]

    def reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    if provider == "ours":
        from grpo_fast import GRPOConfig, GRPOTrainer

        args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=8, num_generations=4, max_steps=1,
                          max_completion_length=8, report_to="none", disable_tqdm=True, beta=0.0,
                          save_strategy="no", save_final_model=False, plot=False)
    else:
        from trl import GRPOConfig, GRPOTrainer

        from datasets import Dataset

        args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=8, num_generations=4, max_steps=1,
                          max_completion_length=8, report_to="none", disable_tqdm=True, beta=0.0,
                          save_strategy="no", use_cpu=True, bf16=False)
        data = Dataset.from_list(data)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=data)
    gc.collect()
    grow = lambda now: {k: now[k] - before["VmRSS" if k == "VmHWM" else k] for k in _KEYS}  # noqa: E731
    out = {"provider": provider, "built": grow(_status_mib()), "dtype": str(next(trainer.model.parameters()).dtype)}
    if step:
        trainer.train()
        gc.collect()
        out["step"] = grow(_status_mib())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--save-dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--no-step", action="store_true", help="measure after construction only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--step", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.model_dir, a.out_dir, a.step)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    rows, n = [], 0
    for save_dtype in a.save_dtype:
        with tempfile.TemporaryDirectory(prefix="grpo_fast_construct_") as tmp:
            model_dir = os.path.join(tmp, "model")
            n = build_model_dir(model_dir, a.layers, save_dtype)
            for provider in PROVIDERS:
                cmd = [sys.executable, __file__, "--child", provider, "--model-dir", model_dir,
                       "--out-dir", os.path.join(tmp, provider)] + ([] if a.no_step else ["--step"])
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{provider} failed:\n{out.stderr[-3000:]}")
                rows.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), checkpoint=save_dtype))
    copy_mib = n * 4 / 2 ** 20
    print(f"model: {n / 1e6:.1f}M parameters (one float32 copy = {copy_mib:.0f} MiB), {a.layers} layers, loaded by "
          f"path in float32; growth in MiB since before construction\n")
    print("| checkpoint | trainer | when | RSS | anonymous | file-backed | peak |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        for when in ("built", "step"):
            if when in r:
                m = r[when]
                print(f"| {r['checkpoint']} | {r['provider']} | {'built' if when == 'built' else 'after step 1'} | "
                      f"{m['VmRSS']:.0f} | {m['RssAnon']:.0f} | {m['RssFile']:.0f} | {m['VmHWM']:.0f} |")


if __name__ == "__main__":
    main()
