"""PNG plots of a run's metric curves: `grpo-fast plot RUN_DIR` or plot_run(run_dir).

Reads RUN_DIR/metrics.jsonl and writes RUN_DIR/plots/<metric>.png for each curve plus
RUN_DIR/plots/overview.png (a grid of the main ones). matplotlib runs on the Agg backend.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

from .tracking import read_metrics

# the curves of the overview grid, in order
OVERVIEW = ["reward", "eval_reward", "tools/call_frequency", "kl", "entropy", "completion_length", "clip_ratio_region",
            "loss", "grad_norm", "learning_rate", "tokens_per_s"]   # tools/: multi-turn runs
_SKIP = {"step", "num_tokens"}


def _series(rows: List[Dict], key: str):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r.get("step", len(xs) + 1))
            ys.append(v)
    return xs, ys


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> List[str]:
    """Write the PNGs; returns their paths, reward.png first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    keys = []
    for r in rows:
        for k in r:
            if k not in keys and k not in _SKIP:
                keys.append(k)
    keys.sort(key=lambda k: (k != "reward", k))
    paths = []
    for key in keys:
        xs, ys = _series(rows, key)
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(xs, ys, lw=1.5)
        if key == "reward" and "reward_std" in keys:
            _, sd = _series(rows, "reward_std")
            if len(sd) == len(ys):
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2,
                                label="± mean group std")
                ax.legend(loc="lower right", fontsize=8)
        if key == "reward":  # the held-out curve beside the training reward (eval_strategy=steps)
            ex, ey = _series(rows, "eval_reward")
            if ex:
                ax.plot(ex, ey, lw=1.5, marker="o", ms=3, label="eval_reward (held-out)")
                ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, _safe(key.replace("/", "_")) + ".png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    present = [k for k in OVERVIEW if _series(rows, k)[0]]
    if present:
        cols = 3
        nrows = math.ceil(len(present) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), dpi=100, squeeze=False)
        for ax, key in zip(axes.flat, present):
            xs, ys = _series(rows, key)
            ax.plot(xs, ys, lw=1.3)
            ax.set_title(key, fontsize=10)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(out_dir, "overview.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
