"""The built-in multi-turn task's learning figures: `grpo-fast train --task tools`.

The demo's tiny character-level Llama (hidden 64, 2 layers), a Qwen2-style chat template and one tool,
add(a, b), on two-digit additions it cannot do alone (grpo_fast/demo_tools.py). A supervised
warm-up teaches the format; GRPO with the tool then raises the tool-call frequency and the reward.
This script runs the task as the CLI does (one intra-op thread, GRPO_FAST_DEMO_THREADS), and prints
a markdown row: the reward and tools/call_frequency as the means of the first and last 10 logged
steps, their rise, and the wall time including the warm-up; with the device and the load average
(say it: a loaded machine is slower, the curves are the same). The plots are in OUTPUT/plots
(reward.png, tools_call_frequency.png).

    python bench/bench_tools_task.py                       # the task's defaults (300 GRPO steps)
    python bench/bench_tools_task.py --max_steps 20        # a short check that it runs
    python bench/bench_tools_task.py --use_vllm            # the same with vLLM colocated (make vllm-cpu)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import device_name  # noqa: E402


def summary(history, k: int = 10):
    rows = [h for h in history if "reward" in h]
    k = min(k, len(rows))
    mean = lambda key, part: sum(h[key] for h in part) / len(part)  # noqa: E731
    first, last = rows[:k], rows[-k:]
    return {"steps": len(rows), "reward_first": mean("reward", first), "reward_last": mean("reward", last),
            "calls_first": mean("tools/call_frequency", first), "calls_last": mean("tools/call_frequency", last),
            "failures_last": mean("tools/failure_frequency", last), "turns_last": mean("tools/turns", last)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_steps", type=int, default=None, help="GRPO steps (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use_vllm", action="store_true")
    p.add_argument("--output_dir", default=None, help="default: a temporary folder, kept and printed")
    a = p.parse_args(argv)
    import torch

    from grpo_fast.demo_tools import run_tools_demo

    out = a.output_dir or tempfile.mkdtemp(prefix="bench_tools_")
    overrides = dict(output_dir=out, overwrite_output_dir=True, seed=a.seed, disable_tqdm=True, report_to="none",
                     save_final_model=False)
    if a.max_steps is not None:
        overrides["max_steps"] = a.max_steps
    if a.use_vllm:
        overrides.update(use_vllm=True, vllm_kv_cache_gib=0.5)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    history = run_tools_demo(overrides=overrides)
    wall = time.perf_counter() - t0
    s = summary(history)
    threads = int(os.environ.get("GRPO_FAST_DEMO_THREADS", "1"))
    torch.set_num_threads(threads)
    print()
    print(f"device: {device_name('cpu')}; engine: {'vLLM colocated' if a.use_vllm else 'HF generate'}; "
          f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; output {out}")
    print("| GRPO steps | reward (first 10 -> last 10) | rise | tool calls per completion | failed calls (last 10) "
          "| turns (last 10) | wall time (incl. warm-up) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {s['steps']} | {s['reward_first']:.3f} -> {s['reward_last']:.3f} | {s['reward_last'] - s['reward_first']:+.3f} "
          f"| {s['calls_first']:.2f} -> {s['calls_last']:.2f} | {s['failures_last']:.2f} | {s['turns_last']:.2f} "
          f"| {wall:.0f} s |")
    with open(os.path.join(out, "bench_tools_task.json"), "w") as fh:
        json.dump(dict(s, wall_s=wall, load_before=load_before, use_vllm=a.use_vllm, seed=a.seed), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
