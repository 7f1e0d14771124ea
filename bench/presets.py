"""GRPO, DAPO and CISPO presets on the built-in task: reward and held-out accuracy against steps
and wall time (bench/RESULTS.md, "GRPO presets").

    OMP_NUM_THREADS=1 .venv/bin/python bench/presets.py [--steps 100] [--eval_steps 10] [--only dapo]

One run at a time, in this process, 1 torch thread. Every preset starts from the same warmed-up
model (demo.build_demo(0, holdout=True): 80 training pairs, 20 held out) and differs from the demo
defaults only in the fields listed in PRESETS. Held-out accuracy = eval_rewards/accuracy_reward/mean
(greedy, the 20 held-out pairs). "Sampled reward" = the mean accuracy reward of every completion
sampled in a step (for DAPO the reward before dynamic sampling's filter, the overlong term left out),
so the three columns compare alike. Wall time = the sum of step_time (training only, evaluation left out).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch

from grpo_fast import demo
from grpo_fast.rewards import accuracy_reward, soft_overlong_punishment
from grpo_fast import GRPOConfig, GRPOTrainer

PRESETS = {
    "grpo": dict(loss_type="grpo", epsilon=0.2),
    # clip-higher, dynamic sampling, overlong shaping (reward below), token-level loss
    "dapo": dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, dynamic_sampling=True,
                 dynamic_sampling_max_batches=10),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
}
# completions here are at most 4 tokens; answers take 2-3 (digits + EOS): only a 4th token is punished
OVERLONG_CACHE = 1


def reward_funcs(name: str, max_completion_length: int):
    if name == "dapo":
        return [accuracy_reward, soft_overlong_punishment(max_completion_length, OVERLONG_CACHE)]
    return [accuracy_reward]


def run(name: str, parts, steps: int, eval_steps: int, out_dir: str):
    values = demo.demo_config_defaults()
    values.update(output_dir=os.path.join(out_dir, name), max_steps=steps, eval_strategy="steps",
                  eval_steps=eval_steps, save_steps=0, save_final_model=False, plot=False, report_to="none",
                  disable_tqdm=True)
    values.update(PRESETS[name])
    cfg = GRPOConfig(**values)
    funcs = reward_funcs(name, cfg.max_completion_length)
    trainer = GRPOTrainer(copy.deepcopy(parts["model"]), funcs, parts["train_dataset"], config=cfg,
                          tokenizer=parts["tokenizer"], eval_dataset=parts["eval_dataset"])
    t0 = time.perf_counter()
    history = trainer.train()
    total = time.perf_counter() - t0
    rows, wall = [], 0.0
    for h in history:
        wall += h.get("step_time") or 0.0
        if "dynamic_sampling/rewards_sampled/accuracy_reward/mean" in h:  # before the filter
            sampled = h["dynamic_sampling/rewards_sampled/accuracy_reward/mean"]
        else:
            sampled = h.get("rewards/accuracy_reward/mean")
        rows.append({"step": h["step"], "wall_s": wall, "sampled_reward": sampled,
                     "held_out_acc": h.get("eval_rewards/accuracy_reward/mean"),
                     "rounds": h.get("dynamic_sampling/rounds"),
                     "frac_reward_zero_std": h.get("frac_reward_zero_std")})
    return {"name": name, "settings": PRESETS[name], "rows": rows, "total_s": total}


def summary(results) -> str:
    out = ["| preset | settings | steps | train wall time (s) | total incl. eval (s) | held-out accuracy, start -> end "
           "(best) | max frac_reward_zero_std of a trained batch | generation rounds per step (mean) |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ev = [x["held_out_acc"] for x in r["rows"] if x["held_out_acc"] is not None]
        train = [x for x in r["rows"] if x["frac_reward_zero_std"] is not None]
        rounds = [x["rounds"] for x in train if x["rounds"] is not None]
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        if r["name"] == "dapo":
            settings += f", + soft_overlong_punishment(L_max, {OVERLONG_CACHE})"
        out.append(f"| {r['name']} | {settings} | {len(train)} | {r['rows'][-1]['wall_s']:.1f} | {r['total_s']:.1f} | "
                   f"{ev[0]:.2f} -> {ev[-1]:.2f} ({max(ev):.2f}) | {max(x['frac_reward_zero_std'] for x in train):.3f} | "
                   f"{(sum(rounds) / len(rounds)) if rounds else 1:.2f} |")
    return "\n".join(out)


def table(results, eval_steps: int) -> str:
    out = ["| preset | step | wall time (s) | sampled reward (mean of the last 10 steps) | held-out accuracy |",
           "|---|---:|---:|---:|---:|"]
    for r in results:
        steps = [x for x in r["rows"] if x["held_out_acc"] is not None]
        train = [x for x in r["rows"] if x["sampled_reward"] is not None]
        for e in steps:
            recent = [x["sampled_reward"] for x in train if e["step"] - 10 < x["step"] <= e["step"]]
            rew = f"{sum(recent) / len(recent):.3f}" if recent else "-"
            out.append(f"| {r['name']} | {e['step']} | {e['wall_s']:.1f} | {rew} | {e['held_out_acc']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval_steps", type=int, default=10)
    p.add_argument("--only", nargs="*", default=list(PRESETS))
    p.add_argument("--json", default=None, help="also write the curves to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    parts = demo.build_demo(0, verbose=False, holdout=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for name in a.only:
            r = run(name, parts, a.steps, a.eval_steps, tmp)
            results.append(r)
            print(f"[presets] {name}: {r['total_s']:.0f}s", file=sys.stderr, flush=True)
    print(summary(results))
    print()
    print(table(results, a.eval_steps))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
