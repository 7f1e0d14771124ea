"""Command line: `grpo-fast train` and `grpo-fast plot`.

    grpo-fast train                                  # the built-in demo task, offline, a few minutes on CPU
    grpo-fast train --task tools                     # the built-in multi-turn task: a calculator tool (docs/multi_turn.md)
    grpo-fast train --config run.yaml --max_steps 200 --learning_rate 1e-6
    grpo-fast train --algorithm grpo --model ./my-model --dataset_path prompts.jsonl \\
                    --reward_funcs accuracy format --reward_weights 1.0 0.2
    grpo-fast plot runs/demo                         # PNGs of the metric curves into runs/demo/plots
    grpo-fast show runs/demo [--step N]              # the completions logged at a step (log_completions)
    grpo-fast vllm-serve --model PATH --port 8000    # a vLLM rollout server (use_vllm, vllm_mode=server)
    torchrun --nproc_per_node 4 -m grpo_fast train --config run.yaml [--distributed fsdp2]   # docs/distributed.md

Every field of the algorithm's config is an option (--FIELD VALUE; booleans also as a bare --FIELD);
command-line values override the YAML file, which overrides the defaults.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
import time
import typing
from typing import Any, Dict, List, Optional

from . import demo, demo_tools
from .config import TRL_ALIASES, TRL_REFUSED, ConfigError, load_yaml
from .rewards import RewardFunctionError, resolve_reward
from .rollout import vllm_server
from .train import CorruptCheckpointError, NonFiniteUpdateError
from .train.plot import plot_run
from .train.tracking import COMPLETIONS_FILE, format_completions, format_turns, read_completions

# algorithm -> (module, trainer class); the trainer names its config class
ALGORITHMS = {
    "grpo": ("grpo_fast.algorithms", "GRPOTrainer"),
    "ppo": ("grpo_fast.algorithms", "PPOTrainer"),
    "trpo": ("grpo_fast.algorithms", "TRPOTrainer"),
}


class CLIError(Exception):
    pass


def load_algorithm(name: str):
    """(config class, trainer class) of an algorithm by name."""
    if name not in ALGORITHMS:
        raise CLIError(f"--algorithm {name!r}: expected one of {', '.join(ALGORITHMS)}")
    module, trainer_name = ALGORITHMS[name]
    trainer_cls = getattr(importlib.import_module(module), trainer_name)
    return trainer_cls.config_class, trainer_cls


def _field_parser(config_cls) -> argparse.ArgumentParser:
    # allow_abbrev=False: an option matches a field exactly, as a YAML key does (--learning matches nothing)
    p = argparse.ArgumentParser(prog="grpo-fast train", add_help=False, argument_default=argparse.SUPPRESS,
                                allow_abbrev=False)
    docs = config_cls.field_help()
    hints = typing.get_type_hints(config_cls)
    for name in config_cls.field_names():
        hint = hints[name]
        args = typing.get_args(hint)
        base = [a for a in args if a is not type(None)][0] if typing.get_origin(hint) is typing.Union else hint
        flags = [f"--{name}"] + (["--model"] if name == "model_name_or_path" else [])
        kwargs: Dict[str, Any] = {"help": docs.get(name, ""), "dest": name}
        if base is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif typing.get_origin(base) in (list, List):
            kwargs.update(nargs="+", metavar="VALUE")
        elif typing.get_origin(base) in (dict, Dict):
            kwargs.update(metavar="JSON")
        else:
            kwargs.update(metavar=getattr(base, "__name__", "VALUE").upper())
        p.add_argument(*flags, **kwargs)
    # TRL's names that are not fields here: mapped (--bf16) or refused with a message naming them
    for name in sorted(set(TRL_ALIASES) | set(TRL_REFUSED)):
        if name not in config_cls.field_names():
            p.add_argument(f"--{name}", dest=name, nargs="?", const="true", help=argparse.SUPPRESS)
    return p


def parse_train_args(argv: List[str]):
    """-> (algorithm, config class, trainer class, dict of values from YAML + command line)."""
    pre = argparse.ArgumentParser(prog="grpo-fast train", add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--algorithm", default=None)
    pre.add_argument("-h", "--help", action="store_true")
    known, rest = pre.parse_known_args(argv)
    values: Dict[str, Any] = {}
    if known.config:
        values = load_yaml(known.config)  # a syntax error names the file and line
    algorithm = known.algorithm or values.pop("algorithm", None) or "grpo"
    values.pop("algorithm", None)
    config_cls, trainer_cls = load_algorithm(algorithm)
    fields = _field_parser(config_cls)
    if known.help:
        full = argparse.ArgumentParser(prog="grpo-fast train", parents=[fields], allow_abbrev=False,
                                       description="Train a causal LM with RL. Without --model: the built-in demo.")
        full.add_argument("--config", help="YAML file of field: value pairs")
        full.add_argument("--algorithm", help=f"one of {', '.join(ALGORITHMS)} (default grpo)")
        full.print_help()
        raise SystemExit(0)
    ns, unknown = fields.parse_known_args(rest)
    if unknown:
        bad = [u for u in unknown if u.startswith("--")] or unknown
        hints = []
        for u in bad:
            close = difflib.get_close_matches(u.lstrip("-"), config_cls.field_names(), n=1)
            hints.append(u + (f" (did you mean --{close[0]}?)" if close else ""))
        raise CLIError(f"unknown option(s) for {config_cls.__name__}: {', '.join(hints)}")
    values.update(vars(ns))
    return algorithm, config_cls, trainer_cls, values


def _load_dataset(path: str):
    if os.path.isdir(path):
        from datasets import load_from_disk

        return load_from_disk(path)
    with open(path) as fh:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in fh if line.strip()]
        data = json.load(fh)
    if isinstance(data, dict) and "prompt" in data:  # column-oriented
        keys = list(data)
        return [dict(zip(keys, row)) for row in zip(*(data[k] for k in keys))]
    return data


def _load_reward(spec: str):
    """A --reward_funcs entry: a registered name, module:function, file.py:function or a
    reward-model directory (grpo_fast.rewards.resolve_reward)."""
    try:
        return resolve_reward(spec)
    except ValueError as e:
        raise CLIError(f"--reward_funcs {spec!r}: {e}") from None


def _is_rank0() -> bool:
    """Under torchrun only rank 0 prints the run's summary lines."""
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(argv: List[str]) -> int:
    return _train(argv)


# the built-in tasks (no --model): --task NAME -> (config defaults, run function)
TASKS = {"addition": (demo.demo_config_defaults, demo.run_demo),
         "tools": (demo_tools.tools_config_defaults, demo_tools.run_tools_demo)}


def _pop_task(argv: List[str]):
    """(--task value or None, argv without it)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.task is not None and known.task not in TASKS:
        raise CLIError(f"--task {known.task!r}: expected one of {', '.join(TASKS)}")
    return known.task, rest


def _train(argv: List[str]) -> int:
    task, argv = _pop_task(argv)
    algorithm, config_cls, trainer_cls, values = parse_train_args(argv)
    if values.get("model_name_or_path") is None:
        defaults_of, run = TASKS[task or "addition"]
        defaults = {k: v for k, v in defaults_of().items()
                    if k in config_cls.field_names() and k not in config_cls.UNUSED_FIELDS}
        defaults.update(values)
        config = config_cls.from_dict(defaults, source="command line")
        if _is_rank0():
            print(f"[grpo-fast] no --model given: running the built-in {task or 'demo'} task ({algorithm}) "
                  f"into {config.output_dir}")
        run(config, trainer_cls=trainer_cls)
        return 0
    if task is not None:
        raise CLIError("--task picks a built-in task, which brings its own model: drop --model or --task")
    config = config_cls.from_dict(values, source="command line")
    if not config.dataset_path:
        raise ConfigError("dataset_path: needed with --model (a .json/.jsonl file or a datasets directory)")
    if not config.reward_funcs:
        raise ConfigError("reward_funcs: needed with --model (e.g. --reward_funcs accuracy format)")
    data = _load_dataset(config.dataset_path)
    funcs = [_load_reward(s) for s in config.reward_funcs]
    t0 = time.perf_counter()
    trainer = trainer_cls(config.model_name_or_path, funcs, data, config=config)
    history = trainer.train()
    rewards = [h["reward"] for h in history if h.get("reward") is not None]
    if rewards and _is_rank0():
        print(f"[grpo-fast] reward {rewards[0]:.3f} -> {rewards[-1]:.3f} over {trainer.global_step} steps "
              f"in {time.perf_counter() - t0:.0f}s; metrics {trainer.metrics_path}; model {trainer.final_dir}")
    return 0


def cmd_plot(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo-fast plot", description="PNG plots of RUN_DIR/metrics.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.run_dir, "metrics.jsonl")):
        raise CLIError(f"{a.run_dir}: no metrics.jsonl there")
    paths = plot_run(a.run_dir, a.out)
    print(f"[grpo-fast] wrote {len(paths)} plots to {os.path.dirname(paths[0]) if paths else a.out}")
    return 0


def cmd_show(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo-fast show",
                                description="print the completions logged at a step (RUN_DIR/completions.jsonl)")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None, help="the step (default: the last one logged)")
    p.add_argument("--width", type=int, default=60, help="characters shown of each prompt / completion")
    a = p.parse_args(argv)
    path = os.path.join(a.run_dir, COMPLETIONS_FILE)
    if not os.path.isfile(path):
        raise CLIError(f"{a.run_dir}: no {COMPLETIONS_FILE} there (train with --log_completions)")
    rows = read_completions(path)
    steps = sorted({r.get("step") for r in rows if r.get("step") is not None})
    if not steps:
        raise CLIError(f"{path}: no completions logged")
    step = steps[-1] if a.step is None else a.step
    if step not in steps:
        raise CLIError(f"step {step}: no completions logged at it; logged steps: "
                       f"{', '.join(map(str, steps[:20]))}{' ...' if len(steps) > 20 else ''}")
    shown = [r for r in rows if r.get("step") == step]
    if any("messages" in r for r in shown):   # multi-turn: the turns, one message a line
        print(format_turns(shown, width=max(a.width, 120)))
    else:
        print(format_completions(shown, width=a.width))
    return 0


USAGE = """usage: grpo-fast {train,plot,show} ...

  train [--config FILE.yaml] [--algorithm grpo|ppo|trpo] [--task addition|tools] [--FIELD VALUE ...]
        train a model (no --model: the built-in task, addition or tools); `grpo-fast train --help` lists the fields
  plot RUN_DIR [--out DIR]
        write PNG plots of RUN_DIR/metrics.jsonl
  show RUN_DIR [--step N]
        print the completions logged at step N (default: the last) by log_completions
  vllm-serve --model PATH [--host 127.0.0.1] [--port 8000] [...]
        serve rollouts from vLLM for a trainer with use_vllm and vllm_mode=server (docs/vllm.md)
"""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "train":
            return cmd_train(rest)
        if cmd == "plot":
            return cmd_plot(rest)
        if cmd == "show":
            return cmd_show(rest)
        if cmd == "vllm-serve":
            return vllm_server.main(rest)
        if cmd in ("-h", "--help", "help"):
            print(USAGE)
            return 0
        raise CLIError(f"unknown command {cmd!r}\n{USAGE}")
    except (CLIError, ConfigError) as e:
        print(f"grpo-fast: error: {e}", file=sys.stderr)
        return 2
    except (RewardFunctionError, NonFiniteUpdateError, CorruptCheckpointError) as e:
        print(f"grpo-fast: training stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
