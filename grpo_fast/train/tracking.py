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


# ----------------------------------------------------------------------------- completion logs
COMPLETIONS_FILE = "completions.jsonl"


class CompletionLog:
    """OUTPUT_DIR/completions.jsonl: one JSON row per logged completion
    {"step", "prompt", "completion", "rewards": {function: value}, "reward", "advantage"}, and for a
    multi-turn completion "messages": the whole conversation after the prompt (assistant turns with
    their tool_calls, tool messages); "completion" is then the last message's content.

    Opened at the start of train(): rows of steps after `start_step` (the checkpoint a run
    resumes from; 0 for a fresh run) are dropped, as metrics.jsonl drops its lines.
    """

    def __init__(self, output_dir: str, *, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, COMPLETIONS_FILE)
        keep = [r for r in read_completions(self.path) if r.get("step", 0) <= start_step] \
            if start_step > 0 and os.path.exists(self.path) else []
        with open(self.path, "w") as fh:
            for row in keep:
                fh.write(json.dumps(row) + "\n")

    def log(self, rows: List[Dict[str, Any]], echo: bool = True) -> None:
        if not self.enabled or not rows:
            return
        with open(self.path, "a") as fh:
            for row in rows:
                fh.write(json.dumps({k: _jsonable(v) if not isinstance(v, dict) else
                                     {a: _jsonable(b) for a, b in v.items()} for k, v in row.items()}) + "\n")
        if echo:
            tqdm.write(format_completions(rows))


def read_completions(path: str) -> List[Dict[str, Any]]:
    """Rows of a completions.jsonl file (or of RUN_DIR/completions.jsonl when given a directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, COMPLETIONS_FILE)
    return read_metrics(path)


def _cell(v: Any, width: int) -> str:
    text = v if isinstance(v, str) else ("-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 3] + "..."


def format_completions(rows: List[Dict[str, Any]], width: int = 40) -> str:
    """A plain-text table of completion rows: step | prompt | completion | each reward | advantage."""
    if not rows:
        return "(no completions)"
    names: List[str] = []
    for r in rows:
        for k in (r.get("rewards") or {}):
            if k not in names:
                names.append(k)
    header = ["step", "prompt", "completion"] + names + ["advantage"]
    table = [[_cell(r.get("step"), 8), _cell(r.get("prompt"), width), _cell(r.get("completion"), width)]
             + [_cell((r.get("rewards") or {}).get(n), 12) for n in names] + [_cell(r.get("advantage"), 10)]
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
    out = [line(header), "-+-".join("-" * w for w in widths)] + [line(t) for t in table]
    return "\n".join(out)


def _jsonable_messages(messages) -> List[Dict[str, Any]]:
    """Chat messages as JSON can hold them (a tool's content that is not text becomes its str())."""
    return json.loads(json.dumps(list(messages), default=str))


def format_turns(rows: List[Dict[str, Any]], width: int = 200) -> str:
    """The conversations of completion rows, turn by turn: each message's role (and tool calls),
    its content cut to `width` characters; a row without turns shows its completion."""
    out = []
    for r in rows:
        rewards = ", ".join(f"{k}={_cell(v, 10)}" for k, v in (r.get("rewards") or {}).items())
        out.append(f"--- step {r.get('step')} | reward {_cell(r.get('reward'), 10)} ({rewards}) | "
                   f"advantage {_cell(r.get('advantage'), 10)}")
        out.append(f"[prompt] {_cell(r.get('prompt'), width)}")
        for m in r.get("messages") or [{"role": "assistant", "content": r.get("completion")}]:
            calls = "".join(f" -> {c.get('function', c).get('name')}({json.dumps(c.get('function', c).get('arguments'))})"
                            for c in m.get("tool_calls") or [])
            name = f" {m['name']}" if m.get("role") == "tool" and m.get("name") else ""
            out.append(f"[{m.get('role')}{name}] {_cell(m.get('content'), width)}{calls}")
    return "\n".join(out)


def completion_rows(batch, step: int, reward_names, template, dist, limit=None) -> List[Dict[str, Any]]:
    """(step, prompt, completion, each reward, advantage, log_extra columns) of the step's samples,
    every rank's (a collective under torchrun), the first `limit` of them."""
    adv = batch.advantages
    if adv is not None and adv.dim() == 2:   # per-token advantages (PPO): their mean over the trained tokens
        m = batch.loss_mask.to(adv.dtype)
        adv = (adv * m).sum(1) / m.sum(1).clamp(min=1)
    versions = None   # asynchronous rollouts: the oldest weights version among each sample's tokens
    if batch.policy_versions is not None:
        v = batch.policy_versions.clone()
        v[v < 0] = int(v.max()) + 1
        versions = v.amin(1).tolist()
    rows = []
    for i in range(len(batch)):
        p, c = batch.prompts[i], batch.completions[i]
        turns = not isinstance(c, str) and len(c) > 1   # a multi-turn conversation: its messages are kept
        rows.append({
            "step": step,
            "prompt": p if isinstance(p, str) else template.text(p),
            "completion": c if isinstance(c, str) else c[-1]["content"],
            **({"messages": _jsonable_messages(c)} if turns else {}),
            "rewards": {n: float(batch.rewards_per_func[i, j]) for j, n in enumerate(reward_names)},
            "reward": float(batch.rewards[i]),
            "advantage": None if adv is None else float(adv[i]),
            **({} if versions is None else {"policy_version": versions[i]}),
            # the reward functions' log_extra columns, one value per completion
            **{k: v[i] for k, v in batch.extras.get("log_extra", {}).items() if i < len(v)},
        })
    if dist.enabled:
        rows = [r for part in dist.all_gather_object(rows) for r in part]
    return rows if limit is None else rows[:limit]
