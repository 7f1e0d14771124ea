"""Nothing is left behind: after train() returns, raises or is interrupted, the trainer has closed
what it opened (the vLLM engine and its temporary model copy, the reward runner's thread), in the
Python API and from the command line, with vLLM for real. Each run is a subprocess with its own
temporary folder, so what it leaves there is visible."""
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

SCRIPT = textwrap.dedent('''
    import copy, json, os, sys, tempfile, threading
    import psutil, torch
    torch.set_num_threads(1)
    from grpo_fast import demo, GRPOConfig, GRPOTrainer
    from grpo_fast.rewards import accuracy_reward

    def snapshot():
        return {"threads": sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()),
                "tmp": sorted(os.listdir(tempfile.gettempdir())),
                "children": [" ".join(p.cmdline()[:4]) for p in psutil.Process().children(recursive=True)]}

    def interrupt_in_step_2(prompts, completions, trainer_state=None, **kw):
        if trainer_state.global_step >= 1:
            raise KeyboardInterrupt          # Ctrl-C in the middle of a run
        return accuracy_reward(prompts, completions, **kw)

    def fail_in_step_2(prompts, completions, trainer_state=None, **kw):
        if trainer_state.global_step >= 1:
            raise ValueError("a reward that breaks")
        return accuracy_reward(prompts, completions, **kw)

    parts = demo.build_demo(0, verbose=False, holdout=True, num_heads=2)   # head_dim 32 for vLLM's CPU attention
    out = {"start": snapshot()}
    for name, reward in (("finished", accuracy_reward), ("interrupted", interrupt_in_step_2),
                         ("failed", fail_in_step_2)):
        cfg = GRPOConfig(**{**demo.demo_config_defaults(), "output_dir": os.path.join(sys.argv[1], name),
                            "max_steps": 3, "use_vllm": True, "eval_strategy": "no", "disable_tqdm": True,
                            "save_steps": 0, "plot": False, "report_to": "none"})
        trainer = GRPOTrainer(copy.deepcopy(parts["model"]), [reward], parts["train_dataset"], config=cfg,
                              tokenizer=parts["tokenizer"])
        try:
            trainer.train()
            out[name + "_raised"] = None
        except BaseException as e:
            out[name + "_raised"] = type(e).__name__
        out[name] = snapshot()
        out[name + "_closed"] = trainer.closed and trainer.engine.llm is None
    print("RESULT " + json.dumps(out))
''')


def _run(cmd, tmp_path, marker):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1", GRPO_FAST_TEST_MARKER=marker)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc.stdout, tmpdir


def _processes_with(marker):
    """Processes still alive whose environment carries the marker (children the run left behind)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"GRPO_FAST_TEST_MARKER={marker}".encode() in fh.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def _ours(names):
    return [n for n in names if "grpo_fast" in n]


@pytest.mark.slow
def test_python_api_leaves_nothing_behind(tmp_path):
    marker = uuid.uuid4().hex
    (tmp_path / "script.py").write_text(SCRIPT)
    stdout, tmpdir = _run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "runs")], tmp_path, marker)
    out = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert out["finished_raised"] is None
    assert out["interrupted_raised"] == "KeyboardInterrupt" and out["failed_raised"] == "RewardFunctionError"
    for name in ("finished", "interrupted", "failed"):
        snap = out[name]
        assert out[name + "_closed"], name
        assert not _ours(snap["threads"]) and not _ours(snap["tmp"]), (name, snap)   # our threads, our folders
        assert snap["children"] == [], (name, snap["children"])                     # no engine process
    # what vLLM's own torch.compile keeps per process (its compile worker pool, tqdm's monitor, the
    # inductor cache folder) is made once: a second and third run add nothing
    assert out["interrupted"]["threads"] == out["finished"]["threads"] == out["failed"]["threads"]
    assert out["interrupted"]["tmp"] == out["finished"]["tmp"] == out["failed"]["tmp"]
    assert not _ours(os.listdir(tmpdir)) and not _processes_with(marker)


@pytest.mark.slow
def test_cli_with_vllm_leaves_nothing_behind(tmp_path):
    marker = uuid.uuid4().hex
    _run([sys.executable, "-m", "grpo_fast", "train", "--use_vllm", "--max_steps", "2", "--eval_strategy", "no",
          "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "--plot", "false"], tmp_path, marker)
    assert not _ours(os.listdir(tmp_path / "tmp")) and not _processes_with(marker)
    assert os.path.isdir(tmp_path / "run" / "final")
