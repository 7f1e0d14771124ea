"""GRPOTrainer (grpo_fast) against TRL's GRPOTrainer on the built-in task, side by side, one process.

Same warmed-up tiny Llama (deep copies), same tokenizer, prompts, reward and settings:
128 completions per step (16 prompts x G=8), max_completion_length 4, temperature 1, top_p 1,
lr 5e-4 constant, beta 0, loss dapo, scale_rewards group, no gradient checkpointing, fp32, CPU.
Both trainers run the same number of steps; we time the training loop only (model building and
the supervised warm-up are shared and excluded) and compare steps/s and the reward curves.

    python bench/bench_trainer.py --steps 200            # prints a markdown table, writes a PNG
    python -m pytest bench/bench_trainer.py -q -s        # the same at fewer steps; skips without trl

Skips cleanly (with the reason) when trl is not installed or fails to import.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SETTINGS = dict(learning_rate=5e-4, per_device_train_batch_size=128, num_generations=8, max_completion_length=4,
                temperature=1.0, top_p=1.0, beta=0.0, loss_type="dapo", scale_rewards="group", seed=0)


def trl_status():
    """(trl module or None, reason)."""
    try:
        import trl  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as e:  # ImportError, or a version clash raised at import
        return None, f"trl unavailable: {type(e).__name__}: {e}"
    return trl, "ok"


def run_ours(parts, steps: int, out_dir: str, seed: int = 0, fused_lm_head: bool = True):
    from grpo_fast import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(output_dir=out_dir, max_steps=steps, lr_scheduler_type="constant", logging_steps=1,
                     save_steps=0, disable_tqdm=True, report_to="none", plot=False, save_final_model=False,
                     max_prompt_length=16, fused_lm_head=fused_lm_head, **dict(SETTINGS, seed=seed))
    stamps = []
    trainer = GRPOTrainer(copy.deepcopy(parts["model"]), parts["reward_funcs"], parts["train_dataset"],
                          config=cfg, tokenizer=parts["tokenizer"],
                          callbacks=[lambda tr, m: stamps.append(time.perf_counter())])
    t0 = time.perf_counter()
    history = trainer.train()
    elapsed = time.perf_counter() - t0  # includes the final checkpoint our train() always writes
    return [h["reward"] for h in history], elapsed, [t0] + stamps


def run_trl(parts, steps: int, out_dir: str, seed: int = 0):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    s = dict(SETTINGS, seed=seed)
    args = GRPOConfig(output_dir=out_dir, max_steps=steps, lr_scheduler_type="constant", logging_steps=1,
                      save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                      gradient_checkpointing=False, disable_tqdm=True, warmup_steps=0, weight_decay=0.0,
                      **s)
    from transformers import TrainerCallback

    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    trainer = GRPOTrainer(model=copy.deepcopy(parts["model"]), reward_funcs=parts["reward_funcs"],
                          args=args, train_dataset=Dataset.from_list(parts["train_dataset"]),
                          processing_class=parts["tokenizer"], callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return rewards, elapsed, [t0] + stamps


def compare(steps: int, png: str = None, threads: int = 1, seeds: int = 1, fused_lm_head: bool = True):
    trl, reason = trl_status()
    if trl is None:
        return {"skipped": reason}
    import transformers

    from grpo_fast import demo

    torch.set_num_threads(threads)
    parts = demo.build_demo(0, verbose=False)
    tmp = tempfile.mkdtemp(prefix="bench_trainer_")
    ours_r, ours_t, ours_s, trl_r, trl_t, trl_s = [], 0.0, [], [], 0.0, []
    curves = []
    for seed in range(seeds):  # the training seed; the warmed-up starting model is the same
        r1, t1, s1 = run_ours(parts, steps, os.path.join(tmp, f"ours{seed}"), seed, fused_lm_head)
        r2, t2, s2 = run_trl(parts, steps, os.path.join(tmp, f"trl{seed}"), seed)
        curves.append((r1, r2))
        ours_r.append(r1), trl_r.append(r2)
        ours_t, trl_t = ours_t + t1, trl_t + t2
        ours_s += [b - a for a, b in zip(s1, s1[1:])]
        trl_s += [b - a for a, b in zip(s2, s2[1:])]
    # The machine is shared: other jobs stall either run at random. The median time between two
    # step ends is robust to those stalls; the totals are reported too.
    ours_m, trl_m = statistics.median(ours_s), statistics.median(trl_s)
    mean_curve = lambda rs: [sum(x) / len(x) for x in zip(*rs)]  # noqa: E731
    ours_r, trl_r = mean_curve(ours_r), mean_curve(trl_r)
    k = max(1, steps // 5)
    res = {
        "steps": steps, "seeds": seeds, "ours_steps_per_s": 1.0 / ours_m, "trl_steps_per_s": 1.0 / trl_m,
        "speedup": trl_m / ours_m, "speedup_total": trl_t / ours_t, "ours_time": ours_t, "trl_time": trl_t,
        "ours_ms": 1000 * ours_m, "trl_ms": 1000 * trl_m,
        "ours_first": sum(ours_r[:k]) / k, "ours_last": sum(ours_r[-k:]) / k,
        "trl_first": sum(trl_r[:k]) / k, "trl_last": sum(trl_r[-k:]) / k, "window": k,
        "ours_all": sum(ours_r) / len(ours_r), "trl_all": sum(trl_r) / len(trl_r),
        "per_seed_last": [(sum(a[-k:]) / k, sum(b[-k:]) / k) for a, b in curves],
        "versions": f"grpo_fast (this repo), trl {trl.__version__}, transformers {transformers.__version__}, "
                    f"torch {torch.__version__}, python {platform.python_version()}",
        "threads": torch.get_num_threads(), "fused_lm_head": fused_lm_head,
    }
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(range(1, len(ours_r) + 1), ours_r, label=f"grpo_fast ({res['ours_steps_per_s']:.1f} steps/s)", lw=1.2)
        ax.plot(range(1, len(trl_r) + 1), trl_r, label=f"TRL {trl.__version__} ({res['trl_steps_per_s']:.1f} steps/s)",
                lw=1.2, alpha=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward")
        ax.set_title(f"GRPO on the built-in addition task (CPU), mean of {seeds} seed(s)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
        fig.savefig(png)
        plt.close(fig)
        res["png"] = png
    return res


def markdown(res) -> str:
    if "skipped" in res:
        return f"skipped: {res['skipped']}"
    k = res["window"]
    return "\n".join([
        f"{res['versions']}; {res['threads']} thread(s); {res['steps']} steps x {res['seeds']} training seed(s) each; "
        "rewards are averaged over the seeds, times summed",
        "",
        "| trainer | median step (ms) | steps/s (median) | total train time (s) | mean reward, first {k} steps "
        "| mean reward, last {k} steps | mean reward, all steps |".format(k=k),
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| grpo_fast GRPOTrainer (fused_lm_head={res['fused_lm_head']}) | {res['ours_ms']:.1f} | {res['ours_steps_per_s']:.1f} | {res['ours_time']:.1f} "
        f"| {res['ours_first']:.3f} | {res['ours_last']:.3f} | {res['ours_all']:.3f} |",
        f"| TRL GRPOTrainer | {res['trl_ms']:.1f} | {res['trl_steps_per_s']:.1f} | {res['trl_time']:.1f} "
        f"| {res['trl_first']:.3f} | {res['trl_last']:.3f} | {res['trl_all']:.3f} |",
        "",
        f"speed-up (median step): {res['speedup']:.2f}x; (total time): {res['speedup_total']:.2f}x",
        "last-window reward per seed (grpo_fast, TRL): "
        + ", ".join(f"({a:.3f}, {b:.3f})" for a, b in res["per_seed_last"]),
    ])


def test_trainer_vs_trl():
    import pytest

    before = torch.get_num_threads()
    try:
        res = compare(40)
    finally:
        torch.set_num_threads(before)
    if "skipped" in res:
        pytest.skip(res["skipped"])
    print("\n" + markdown(res))
    assert res["ours_steps_per_s"] > 0 and res["trl_steps_per_s"] > 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both trainers")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per trainer (curves are averaged)")
    p.add_argument("--png", default=os.path.join(HERE, "..", "docs", "bench_trainer_rewards.png"))
    p.add_argument("--fused_lm_head", type=int, choices=(0, 1), default=1,
                   help="1: grpo_fast through the fused LM head (the default); 0: the logits path")
    a = p.parse_args(argv)
    res = compare(a.steps, os.path.normpath(a.png) if a.png else None, a.threads, a.seeds, bool(a.fused_lm_head))
    print(markdown(res))
    if "png" in res:
        print(f"reward curves: {res['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
