"""Issue 11 §2 and §4: an output folder never loses or mixes a run; resume survives bad checkpoints,
changed settings and a full disk. Tiny batches, 1-3 steps each."""
import copy
import errno
import json
import os
import subprocess
import sys

import pytest
import yaml

from grpo_fast.rewards import accuracy_reward
from grpo_fast import CorruptCheckpointError, GRPOConfig, GRPOTrainer, OutputDirError
from grpo_fast.train import checkpoint as ckpt


def cfg(out, **kw):
    values = dict(output_dir=str(out), learning_rate=1e-4, lr_scheduler_type="constant", max_steps=2,
                  per_device_train_batch_size=8, num_generations=4, max_prompt_length=16, max_completion_length=3,
                  save_steps=1, seed=0, disable_tqdm=True, plot=False, save_final_model=False, report_to="none")
    values.update(kw)
    return GRPOConfig(**values)


def make(parts, config):
    return GRPOTrainer(copy.deepcopy(parts["model"]), accuracy_reward, parts["train_dataset"][:8], args=config,
                       processing_class=parts["tokenizer"])


def steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(x)["step"] for x in fh if x.strip()]


# ----------------------------------------------------------------------------- locking
def _hold_lock(out):
    # what OutputDirLock does, without importing torch (a second of start-up instead of twenty)
    code = ("import fcntl, json, os, socket, sys, time; os.makedirs(sys.argv[1], exist_ok=True); "
            "fd = os.open(os.path.join(sys.argv[1], '.grpo_fast.lock'), os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); "
            "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode()); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_into_the_same_folder_is_refused_and_a_killed_run_leaves_no_lock(demo_parts, tmp_path):
    out = tmp_path / "run"
    proc = _hold_lock(out)
    try:
        trainer = make(demo_parts, cfg(out, max_steps=1))
        with pytest.raises(OutputDirError, match=rf"{out}.*in use by another run \(process {proc.pid} on "):
            trainer.train()
        assert not os.path.exists(out / "metrics.jsonl")        # the refused run wrote nothing
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RuntimeError, match="trainer is closed"):   # train() released what it opened
        trainer.train()
    make(demo_parts, cfg(out, max_steps=1)).train()              # killed: the OS dropped the lock
    assert steps(out) == [1]
    ckpt.OutputDirLock(str(out)).release()                       # and train() released its own


# ----------------------------------------------------------------------------- a folder with a run
def test_folder_with_a_run_is_refused_then_overwritten(demo_parts, tmp_path):
    out = tmp_path / "run"
    make(demo_parts, cfg(out)).train()
    (out / "notes.txt").write_text("mine")
    before = sorted(os.listdir(out))
    with pytest.raises(OutputDirError, match=r"already holds a run.*--resume_from_checkpoint latest.*"
                                             r"--overwrite_output_dir"):
        make(demo_parts, cfg(out, max_steps=1)).train()
    assert sorted(os.listdir(out)) == before and steps(out) == [1, 2]      # nothing touched
    make(demo_parts, cfg(out, max_steps=1, overwrite_output_dir=True)).train()
    assert steps(out) == [1]
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(out))] == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "mine"                       # not ours: kept


def test_resume_keeps_metrics_up_to_the_checkpoint_and_appends(demo_parts, tmp_path):
    out = tmp_path / "run"
    make(demo_parts, cfg(out, max_steps=3)).train()
    assert steps(out) == [1, 2, 3]
    trainer = make(demo_parts, cfg(out, max_steps=3))
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))      # TRL's train() argument
    assert steps(out) == [1, 2, 3] and trainer.global_step == 3


def test_only_dead_processes_temporary_checkpoints_are_cleaned(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, alive.pid, os.getpid()):
            (out / f".tmp-checkpoint-7-{pid}").mkdir()
        final, tmp = ckpt._prepare_dirs(str(out), 8)
        left = sorted(n for n in os.listdir(out) if n.startswith(".tmp-checkpoint-7"))
        assert left == [f".tmp-checkpoint-7-{alive.pid}"]
        assert tmp.endswith(f".tmp-checkpoint-8-{os.getpid()}")
    finally:
        alive.kill()
        alive.wait()


# ----------------------------------------------------------------------------- checkpoints and resume
def test_checkpoints_are_marked_complete_and_a_truncated_one_is_skipped(demo_parts, tmp_path):
    out = tmp_path / "run"
    make(demo_parts, cfg(out, max_steps=2)).train()
    newest = out / "checkpoint-2"
    marker = json.loads((newest / ckpt.COMPLETE_FILE).read_text())
    assert marker["step"] == 2 and ckpt.STATE_FILE in marker["files"]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])                      # a save cut short
    trainer = make(demo_parts, cfg(out, max_steps=3))
    with pytest.warns(RuntimeWarning, match=r"checkpoint-2.*model.safetensors is truncated"):
        trainer.train(resume_from_checkpoint="latest")
    assert steps(out) == [1, 2, 3]                                       # resumed from checkpoint-1


def test_unreadable_state_is_named_and_an_explicit_path_is_not_replaced(demo_parts, tmp_path):
    out = tmp_path / "run"
    make(demo_parts, cfg(out, max_steps=2)).train()
    state = out / "checkpoint-2" / ckpt.STATE_FILE
    state.write_bytes(b"\0" * state.stat().st_size)                      # same size, garbage
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint-2: {ckpt.STATE_FILE} could not be read"):
        make(demo_parts, cfg(out, max_steps=3)).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    trainer = make(demo_parts, cfg(out, max_steps=2))
    with pytest.warns(RuntimeWarning, match=rf"checkpoint-2: {ckpt.STATE_FILE} could not be read"):
        trainer.train(resume_from_checkpoint="latest")
    assert trainer.global_step == 2 and steps(out) == [1, 2]


def test_legacy_checkpoint_without_marker_counts_and_an_unmarked_folder_does_not(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / ckpt.STATE_FILE).write_bytes(b"x")      # written before COMPLETE existed
    (tmp_path / "checkpoint-5").mkdir()                                  # neither: not a checkpoint
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["checkpoint-3"]
    assert ckpt.verify_checkpoint(str(tmp_path / "checkpoint-3")) is None
    assert "incomplete" in ckpt.verify_checkpoint(str(tmp_path / "checkpoint-5"))


def test_latest_without_a_checkpoint_says_so_and_starts_fresh(demo_parts, tmp_path):
    out = tmp_path / "run"
    trainer = make(demo_parts, cfg(out, max_steps=1, resume_from_checkpoint="latest"))
    with pytest.warns(RuntimeWarning, match="no checkpoint in .*starting fresh"):
        trainer.train()
    assert steps(out) == [1]


def test_changed_settings_on_resume_are_listed_and_recorded(demo_parts, tmp_path):
    out = tmp_path / "run"
    make(demo_parts, cfg(out, max_steps=1)).train()
    trainer = make(demo_parts, cfg(out, max_steps=2, learning_rate=3e-3, temperature=0.7))
    with pytest.warns(RuntimeWarning, match=r"(?s)learning_rate: 0.0001 in the checkpoint, 0.003 now -> the "
                                            r"checkpoint's.*temperature: 1.0 in the checkpoint, 0.7 now -> the new"):
        trainer.train(resume_from_checkpoint="latest")
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)   # what was used
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["learning_rate"] == pytest.approx(1e-4) and recorded["temperature"] == 0.7
    assert trainer.history[-1]["learning_rate"] == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- clear messages
class _Model:
    def __init__(self, error):
        self.error = error

    def save_pretrained(self, path, **kw):
        with open(os.path.join(path, "model.safetensors"), "wb") as fh:
            fh.write(b"partial")
        raise self.error


def test_full_disk_during_a_save_says_so_and_leaves_no_partial_copy(tmp_path):
    with pytest.raises(OSError, match=r"no space left on the device of .*checkpoint-4.*partial copy was removed"):
        ckpt.save_checkpoint(str(tmp_path), 4, _Model(OSError(errno.ENOSPC, "No space left on device")), None, {})
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="other"):                        # other errors pass through unchanged
        ckpt.save_checkpoint(str(tmp_path), 4, _Model(ValueError("other")), None, {})
    assert os.listdir(tmp_path) == []


def test_unwritable_output_folder_fails_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="is a file, not a folder"):
        GRPOTrainer(str(tmp_path / "no-model"), accuracy_reward, [{"prompt": "a"}],
                    args=cfg(tmp_path / "file" / "run"))

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", denied)   # root ignores chmod, so fake the refusal
    # the model path does not exist either: the folder is checked first
    with pytest.raises(OutputDirError, match=r"not writable .*Permission denied"):
        GRPOTrainer(str(tmp_path / "no-model"), accuracy_reward, [{"prompt": "a"}], args=cfg(tmp_path / "ro"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            GRPOTrainer(str(tmp_path / "no-model"), accuracy_reward, [{"prompt": "a"}], args=cfg(ro / "run"))
    finally:
        ro.chmod(0o700)
