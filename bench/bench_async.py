"""Asynchronous rollouts against the synchronous loop, side by side, on the built-in task (CPU).

A vLLM server (`grpo-fast vllm-serve`) runs in its own process pinned to one core, the trainer in
another process pinned to the other core (taskset; one torch thread each). The same server serves
every run; runs alternate sync (max_staleness=0) and async (max_staleness=1), `--repeats` times
each, every run in a fresh trainer process. The task is the demo's (`grpo-fast train` with no model:
single-digit addition, the warmed-up tiny Llama with 2 heads of 32 as the demo uses with vLLM, the
accuracy reward, the demo's GRPO settings: 16 prompts x 8 completions of at most 4 tokens per step,
lr 5e-4 constant), without its held-out evaluation.

Reported per mode (median over the repeats): steps/s after `--warmup` steps (wall clock between
the end of step `warmup` and of the last step), the speed-up, the mean reward over the second half
of the steps (and its difference to the synchronous run's), the trainer's idle time waiting for
rollouts and the producer's generation time per step; a plot of reward against wall-clock time.

    python bench/bench_async.py                              # 2 x 2 runs of 150 steps (the measurement)
    python bench/bench_async.py --steps 12 --repeats 1       # a quick check that it works

The load average before and after is printed with the results: measure on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- one trainer run (child)
def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_fast import GRPOConfig, GRPOTrainer, demo
    from grpo_fast.rewards import accuracy_reward

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    values = demo.demo_config_defaults()
    values.update(output_dir=tempfile.mkdtemp(prefix="bench_async_"), max_steps=args.steps, eval_strategy="no",
                  save_steps=0, save_final_model=False, plot=False, report_to="none", disable_tqdm=True,
                  max_staleness=args.staleness)
    if args.engine == "server":
        values.update(use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=args.port)
    elif args.engine == "colocate":
        values.update(use_vllm=True, vllm_mode="colocate", vllm_kv_cache_gib=0.25)
    stamps = []
    trainer = GRPOTrainer(model, [accuracy_reward], demo.addition_dataset(), config=GRPOConfig(**values),
                          tokenizer=tokenizer, callbacks=[lambda tr, m: stamps.append((time.perf_counter(), m))])
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        shutil.rmtree(values["output_dir"], ignore_errors=True)
    keys = ("reward", "step_time", "generation_time", "perf/rollout_wait_s", "rollout/generation_s",
            "sample/staleness_mean", "sample/staleness_max", "sample/dropped_stale", "rollout_logp_diff_max")
    rows = [{"t": t - t0, **{k: m[k] for k in keys if k in m}} for t, m in stamps]
    print("RESULT " + json.dumps({"staleness": args.staleness, "rows": rows}), flush=True)


# ----------------------------------------------------------------------------- the measurement (parent)
def start_server(model_dir: str, port: int, cpu: int, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND=str(cpu))
    cmd = ["taskset", "-c", str(cpu), sys.executable, "-m", "grpo_fast", "vllm-serve", "--model", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--kv-cache-gib", "0.25",
           "--num-threads", "1"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited ({proc.returncode}); its log: {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the vLLM server did not answer within 300 s; its log: {log_path}")


def warm_up(port: int, prompt_ids) -> None:
    """One generate call, so that no timed run pays for the server's first request."""
    body = json.dumps({"prompt_ids": prompt_ids, "settings": {"max_tokens": 4}, "seeds": list(range(len(prompt_ids)))})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


def run(args, model_dir: str, port: int, staleness: int) -> dict:
    # server: the trainer on its own core; in-process engines: the trainer's process gets both cores
    cpus = str(args.trainer_cpu) if args.engine == "server" else f"{args.server_cpu},{args.trainer_cpu}"
    cmd = ["taskset", "-c", cpus, sys.executable, os.path.abspath(__file__), "--worker", "--engine", args.engine,
           "--model", model_dir, "--port", str(port), "--steps", str(args.steps), "--staleness", str(staleness)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    res = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not res:
        raise RuntimeError(f"max_staleness={staleness} run failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(res[-1][len("RESULT "):])


def summarise(r: dict, warmup: int) -> dict:
    rows = r["rows"]
    n = len(rows)
    timed = rows[warmup:]
    half = rows[n // 2:]
    mean = lambda key, rs: statistics.mean(x[key] for x in rs if key in x) if any(key in x for x in rs) else None
    return {"staleness": r["staleness"], "steps_per_s": (n - warmup) / (rows[-1]["t"] - rows[warmup - 1]["t"]),
            "reward_second_half": mean("reward", half), "reward_all": mean("reward", rows),
            "step_time": statistics.median(x["step_time"] for x in timed),
            "trainer_wait": mean("perf/rollout_wait_s", timed) if r["staleness"] else mean("generation_time", timed),
            "generation": mean("rollout/generation_s", timed) if r["staleness"] else mean("generation_time", timed),
            "staleness_max": max((x.get("sample/staleness_max", 0.0) for x in rows), default=0.0),
            "dropped": sum(x.get("sample/dropped_stale", 0.0) for x in rows)}


def plot(results, path: str, engine: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {0: "tab:blue", 1: "tab:orange"}
    for i, r in enumerate(results):
        t = [x["t"] for x in r["rows"]]
        rw = [x["reward"] for x in r["rows"]]
        k = 10
        smooth = [statistics.mean(rw[max(0, j - k + 1):j + 1]) for j in range(len(rw))]
        label = None if i >= 2 else ("synchronous (max_staleness=0)" if r["staleness"] == 0
                                     else "asynchronous (max_staleness=1)")
        ax.plot(t, smooth, color=colours[r["staleness"]], alpha=0.9 if i < 2 else 0.4, label=label)
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("mean reward (10-step moving average)")
    ax.set_title("GRPO on the built-in task, " + ("vLLM server on its own core" if engine == "server"
                                                   else f"{engine} engine, producer thread"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating")
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed (start-up, first generate)")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--trainer-cpu", type=int, default=1)
    ap.add_argument("--engine", choices=("server", "colocate", "hf"), default="server",
                    help="server: a vLLM server process (the measurement); colocate / hf: the engine in the trainer's "
                         "process, the producer a thread, the process on both cores")
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "async_reward_wallclock.png"))
    ap.add_argument("--json", default=None, help="write every run's rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--staleness", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        print("needs taskset and two cores", file=sys.stderr)
        return 2
    if args.warmup >= args.steps:
        ap.error("--warmup must be below --steps")
    import torch

    from grpo_fast import demo

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench_async_")
    try:
        parts = demo.build_demo(0, verbose=False, num_heads=2)
        model_dir = os.path.join(work, "policy")
        parts["model"].save_pretrained(model_dir)
        parts["tokenizer"].save_pretrained(model_dir)
        port = free_port()
        load0 = os.getloadavg()
        server = None
        if args.engine == "server":
            server = start_server(model_dir, port, args.server_cpu, os.path.join(work, "server.log"))
        results = []
        try:
            tok = parts["tokenizer"]
            if server is not None:
                warm_up(port, [tok(r["prompt"])["input_ids"] for r in demo.addition_dataset()[:16] for _ in range(8)])
            for _ in range(args.repeats):
                for s in (0, 1):
                    results.append(run(args, model_dir, port, s))
                    print("[bench] " + json.dumps(summarise(results[-1], args.warmup)), file=sys.stderr, flush=True)
        finally:
            if server is not None:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
        load1 = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    sums = [summarise(r, args.warmup) for r in results]
    med = {s: {k: statistics.median(x[k] for x in sums if x["staleness"] == s)
               for k in ("steps_per_s", "reward_second_half", "reward_all", "step_time", "trainer_wait", "generation")}
           for s in (0, 1)}
    where = (f"vLLM server on CPU {args.server_cpu}, trainer on CPU {args.trainer_cpu}" if args.engine == "server"
             else f"engine {args.engine!r} in the trainer's process (the producer a thread), CPUs {args.server_cpu},"
                  f"{args.trainer_cpu}")
    print(f"GRPO on the built-in task: {args.steps} steps per run ({args.warmup} not timed), {args.repeats} run(s) "
          f"per mode alternating; {where}, torch intra-op threads 1. Load average (1, 5, 15 min) before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}.\n")
    print("| mode | steps/s | speed-up | step time (s) | trainer waits for rollouts (s/step) | generation (s/step) "
          "| reward, 2nd half | reward, all steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s, name in ((0, "synchronous (max_staleness=0)"), (1, "asynchronous (max_staleness=1)")):
        m = med[s]
        print(f"| {name} | {m['steps_per_s']:.2f} | {m['steps_per_s'] / med[0]['steps_per_s']:.2f}x | "
              f"{m['step_time']:.3f} | {m['trainer_wait']:.3f} | {m['generation']:.3f} | "
              f"{m['reward_second_half']:.3f} | {m['reward_all']:.3f} |")
    diff = med[1]["reward_second_half"] - med[0]["reward_second_half"]
    print(f"\nasync / sync steps/s: {med[1]['steps_per_s'] / med[0]['steps_per_s']:.2f}x (target >= 1.5x); reward "
          f"difference over the second half: {diff:+.3f} (target within 0.05); async staleness max "
          f"{max(x['staleness_max'] for x in sums):.0f}, samples dropped {sum(x['dropped'] for x in sums):.0f}")
    print("per run: " + "; ".join(f"s={x['staleness']}: {x['steps_per_s']:.2f} steps/s, reward "
                                  f"{x['reward_second_half']:.3f}" for x in sums))
    try:
        plot(results, args.plot, args.engine)
        print(f"plot: {args.plot}")
    except ImportError as e:
        print(f"plot skipped ({e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
