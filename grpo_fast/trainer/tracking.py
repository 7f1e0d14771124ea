"""Where metrics go: OUTPUT_DIR/metrics.jsonl (always), TensorBoard (when installed), a tqdm bar."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

from tqdm.auto import tqdm

# what the progress bar shows, in order: metric key -> short label
_BAR = [("reward", "reward"), ("kl", "kl"), ("entropy", "ent"), ("completion_length", "len"),
        ("tokens_per_s", "tok/s")]


def _jsonable(v: Any):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null reads back as "missing"
    return v


class MetricsTracker:
    def __init__(self, output_dir: str, *, max_steps: int, start_step: int = 0,
                 history: Optional[List[Dict[str, Any]]] = None, report_to: str = "tensorboard",
                 disable_tqdm: bool = False, desc: str = "train", enabled: bool = True):
        # enabled=False (ranks other than 0 under torchrun): a tracker that writes nothing
        self.enabled = enabled
        self._tb = self._bar = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        # a fresh run starts the file again; a resumed one rewrites the history it carries, so
        # lines logged after the checkpoint by the interrupted run are dropped
        with open(self.path, "w") as fh:
            for row in history or []:
                fh.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        self._fh = open(self.path, "a")
        self._tb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))
            except Exception:  # tensorboard not installed: the JSONL file still has everything
                self._tb = None
        self._bar = None
        if not disable_tqdm:
            self._bar = tqdm(total=max_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = metrics["step"]
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            shown = {}
            for key, label in _BAR:
                v = metrics.get(key)
                if isinstance(v, (int, float)) and v is not None:
                    shown[label] = f"{v:.3g}" if key != "tokens_per_s" else f"{v:.0f}"
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.enabled and not self._fh.closed:
            self._fh.close()


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Rows of a metrics.jsonl file (or of RUN_DIR/metrics.jsonl when given a directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
