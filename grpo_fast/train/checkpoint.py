"""Atomic checkpoints: model (save_pretrained), tokenizer, optimiser, scheduler, the trainer's RNG
state, step, sampler state, metrics history and config (trainer_state.pt, loaded weights-only),
plus the files an algorithm adds (e.g. critic.safetensors).

A checkpoint is written into a temporary sibling directory, every file is fsynced, and only
then is the directory renamed to checkpoint-N (rename is atomic on POSIX). A process killed
during a save leaves a `.tmp-*` directory that loaders ignore, and the previous checkpoint
untouched. The last file written into the temporary directory is COMPLETE, which lists every
file with its size: a checkpoint-N directory counts as complete when COMPLETE is there and every
file has its listed size, or (checkpoints written before the marker existed) when it holds
trainer_state.pt and no COMPLETE. Only the process that made a `.tmp-checkpoint-STEP-PID`
directory removes it; those of processes that no longer run are cleaned at the next save.

The output folder of a run is locked (OutputDirLock: fcntl.flock on OUTPUT_DIR/.grpo_fast.lock,
released by the OS when the process ends, so a killed run leaves no stale lock).

Under torchrun (see grpo_fast.trainer.distributed): with DDP rank 0 writes the unwrapped model and the
state as above (every rank's RNG state inside it); with FSDP2 every rank writes its shards of
the model and optimiser with torch.distributed.checkpoint into checkpoint-N/sharded/, and rank 0
adds the model config, tokenizer and trainer_state.pt, then renames the directory. Either way
the rename happens after all ranks have finished writing, so the atomicity holds.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from transformers.utils import logging as hf_logging

from ..config import ConfigError
from ..model.policy import is_peft

STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "sharded"
COMPLETE_FILE = "COMPLETE"
LOCK_FILE = ".grpo_fast.lock"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^\.(tmp|old)-checkpoint-(\d+)-(\d+)$")


class OutputDirError(ConfigError):
    """The output folder cannot take this run: in use, holding another run, or not writable."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or unreadable; the message names it."""


class CheckpointMismatchError(ConfigError):
    """A checkpoint that reads fine but does not fit this run (other optimiser parameter groups, PEFT
    on one side only, other weights); the message names what differs. Not corrupt: an older
    checkpoint of the same run would not fit either, so none is tried."""


# --------------------------------------------------------------------------- the output folder
def check_writable(output_dir: str) -> None:
    """Raise OutputDirError when output_dir (or, if it does not exist yet, its nearest existing
    parent) cannot be written: checked before the model loads, not at the first save."""
    probe = os.path.abspath(output_dir)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise OutputDirError(f"output_dir {output_dir!r}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".grpo_fast-write-test-", dir=probe)
        os.close(fd)
        os.remove(name)
    except OSError as e:
        raise OutputDirError(f"output_dir {output_dir!r} is not writable ({probe}: {e.strerror}); pick a folder "
                             "you can write to") from None


class OutputDirLock:
    """An exclusive lock on OUTPUT_DIR for one run (flock: dropped by the OS when the process dies).
    The file holds the owner's pid and host, for the message a second run gets."""

    def __init__(self, output_dir: str):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            self._fd = None
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            try:
                with open(self.path) as fh:
                    owner = json.load(fh)
                who = f"process {owner.get('pid')} on {owner.get('host')}"
            except (OSError, ValueError):
                who = "another process"
            raise OutputDirError(f"output_dir {os.path.abspath(output_dir)!r} is in use by another run ({who}); "
                                 "wait for it to end or use another output_dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# what a run writes into its output folder (overwrite_output_dir deletes exactly these)
RUN_FILES = ("metrics.jsonl", "config.yaml", "completions.jsonl", "final", "plots", "tensorboard")


def previous_run(output_dir: str) -> List[str]:
    """Names of the files and folders of an earlier run in output_dir (metrics, checkpoints)."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    found = [n for n in names if n == "metrics.jsonl" or _CKPT.match(n)]
    if found:
        found += [n for n in names if n in RUN_FILES and n not in found]
    return found


def clear_run(output_dir: str) -> List[str]:
    """overwrite_output_dir: delete what a run wrote (RUN_FILES, checkpoint-N, our temporary folders);
    any other file in the folder stays. Returns the names deleted."""
    gone = []
    for name in sorted(os.listdir(output_dir)):
        if name in RUN_FILES or _CKPT.match(name) or _TMP.match(name):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            gone.append(name)
    return gone


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _fsync_tree(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def quiet_progress():
    """Hide transformers' per-save progress bars (they would break the training bar)."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_checkpoint(output_dir: str, step: int, model, tokenizer, state: Dict[str, Any],
                    save_total_limit: Optional[int] = None, *, dist=None, optimizer=None,
                    write_extra: Optional[Callable[[str], None]] = None) -> str:
    """Write OUTPUT_DIR/checkpoint-STEP atomically; returns its path.

    dist: a grpo_fast.distributed.DistContext; under torchrun every rank must call this.
    optimizer: needed for FSDP2 (its sharded state is saved with the model's shards).
    write_extra: called with the directory being built, to add files (e.g. the critic's weights).
    """
    if dist is None or not dist.enabled:
        return _write(output_dir, step, model, tokenizer, state, save_total_limit, write_extra)
    if dist.mode == "fsdp2":
        return _save_sharded(output_dir, step, model, tokenizer, state, save_total_limit, dist, optimizer,
                             write_extra)
    final = None
    if dist.is_main:  # DDP: the replicas are identical, rank 0 writes
        final = _write(output_dir, step, model, tokenizer, state, save_total_limit, write_extra)
    return dist.broadcast_object(final)  # also a barrier: the checkpoint exists when any rank returns


def _prepare_dirs(output_dir: str, step: int):
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # leftovers of saves that were killed: ours, or of dead processes
        m = _TMP.match(name)
        if m and (int(m.group(3)) == os.getpid() or not _pid_alive(int(m.group(3)))):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{os.getpid()}")
    os.makedirs(tmp)
    return final, tmp


@contextlib.contextmanager
def _disk_errors(output_dir: str, step: int, tmp: str) -> Iterator[None]:
    """A failed save removes its temporary folder; a full disk gets a message that says so."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            previous = list_checkpoints(output_dir)
            raise OSError(e.errno, f"no space left on the device of {os.path.abspath(output_dir)!r} while writing "
                          f"checkpoint-{step} (the partial copy was removed; "
                          + (f"{os.path.basename(previous[-1])} is intact" if previous else "no earlier checkpoint")
                          + "): free some space or set save_total_limit") from e
        raise


def _write(output_dir, step, model, tokenizer, state, save_total_limit, write_extra=None) -> str:
    final, tmp = _prepare_dirs(output_dir, step)
    with _disk_errors(output_dir, step, tmp):
        with quiet_progress():
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if write_extra is not None:
            write_extra(tmp)
        return _commit(output_dir, step, final, tmp, state, save_total_limit)


def _write_marker(tmp: str, step: int) -> None:
    """COMPLETE, written last: every file of the checkpoint with its size."""
    files = {}
    for root, _, names in os.walk(tmp):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, tmp)] = os.path.getsize(p)
    with open(os.path.join(tmp, COMPLETE_FILE), "w") as fh:
        json.dump({"step": step, "files": files}, fh)


def _commit(output_dir, step, final, tmp, state, save_total_limit) -> str:
    torch.save(state, os.path.join(tmp, STATE_FILE))
    _fsync_tree(tmp)
    _write_marker(tmp, step)
    fd = os.open(os.path.join(tmp, COMPLETE_FILE), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    old = None
    if os.path.exists(final):  # re-saving a step (e.g. after a resume): swap, then delete
        old = os.path.join(output_dir, f".old-checkpoint-{step}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if save_total_limit:
        for path in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _save_sharded(output_dir, step, model, tokenizer, state, save_total_limit, dist, optimizer,
                  write_extra=None) -> str:
    paths = _prepare_dirs(output_dir, step) if dist.is_main else None
    final, tmp = dist.broadcast_object(paths)
    model_sd, optim_sd = get_state_dict(model, optimizer)          # collective: DTensor shards
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(tmp, SHARDED_DIR))
    dist.barrier()                                                   # every shard is on disk
    out = None
    if dist.is_main:
        with quiet_progress():
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if write_extra is not None:
            write_extra(tmp)
        with _disk_errors(output_dir, step, tmp):
            out = _commit(output_dir, step, final, tmp, state, save_total_limit)
    return dist.broadcast_object(out)


def is_sharded(path: str) -> bool:
    return os.path.isdir(os.path.join(path, SHARDED_DIR))


def load_sharded(path: str, model, optimizer) -> None:
    """Restore an FSDP2 model and optimiser from checkpoint-N/sharded (same world size); collective."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(path, SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model) -> Dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model on CPU; collective, rank 0 gets the tensors."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def list_checkpoints(output_dir: str):
    """Checkpoints in output_dir (COMPLETE, or trainer_state.pt in those written before it), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        path = os.path.join(output_dir, name)
        if m and (os.path.isfile(os.path.join(path, COMPLETE_FILE)) or os.path.isfile(os.path.join(path, STATE_FILE))):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str) -> Optional[str]:
    """None when `path` is a complete checkpoint; else what is wrong, naming the file."""
    marker = os.path.join(path, COMPLETE_FILE)
    if not os.path.isfile(marker):
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return None  # written before the marker existed
        return f"checkpoint {path} is incomplete (no {COMPLETE_FILE} and no {STATE_FILE})"
    try:
        with open(marker) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"checkpoint {path}: {marker} is unreadable"
    for name, size in sorted(files.items()):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"checkpoint {path}: {p} is missing"
        if os.path.getsize(p) != size:
            return f"checkpoint {path}: {p} is truncated or changed ({os.path.getsize(p)} bytes, {size} written)"
    return None


@contextlib.contextmanager
def reading(path: str, what: str) -> Iterator[None]:
    """Errors while reading `what` from checkpoint `path` -> CorruptCheckpointError naming them
    (a CheckpointMismatchError raised inside passes as it is)."""
    try:
        yield
    except (CorruptCheckpointError, CheckpointMismatchError):
        raise
    except Exception as e:
        raise CorruptCheckpointError(f"checkpoint {path}: {what} could not be read ({type(e).__name__}: "
                                     f"{str(e)[:200]})") from e


def resume_candidates(spec, output_dir: str) -> List[str]:
    """Checkpoints to try, in order: 'latest' / 'true' -> every checkpoint in output_dir, newest
    first (empty when there is none); a path -> [path] (FileNotFoundError when it is not a checkpoint)."""
    if spec is None or str(spec).lower() in ("", "false", "none"):
        return []
    if str(spec).lower() in ("latest", "true", "last"):
        return list_checkpoints(output_dir)[::-1]
    if not os.path.isdir(spec) or not (os.path.isfile(os.path.join(spec, COMPLETE_FILE))
                                       or os.path.isfile(os.path.join(spec, STATE_FILE))):
        raise FileNotFoundError(f"resume_from_checkpoint={spec!r}: not a checkpoint directory (no {COMPLETE_FILE} "
                                f"or {STATE_FILE} there)")
    return [spec]


def resolve_checkpoint(spec: Optional[str], output_dir: str) -> Optional[str]:
    """'latest' / 'true' -> newest checkpoint in output_dir (None if there is none); else the path."""
    if spec is None or str(spec).lower() in ("", "false", "none"):
        return None
    if str(spec).lower() in ("latest", "true", "last"):
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(spec, STATE_FILE)):
        raise FileNotFoundError(f"resume_from_checkpoint={spec!r}: no {STATE_FILE} there (not a complete checkpoint)")
    return spec


_ADAPTER = "adapter_model.safetensors"


def _holds_full_weights(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def load_model_weights(model, path: str) -> None:
    """Load the weights that save_pretrained wrote in `path` into `model`, exactly. Reading a file
    fails as CorruptCheckpointError; weights that do not fit the model (PEFT on one side only,
    other names or shapes) as CheckpointMismatchError."""
    peft_run, adapter = is_peft(model), os.path.isfile(os.path.join(path, _ADAPTER))
    if peft_run and not adapter and _holds_full_weights(path):
        raise CheckpointMismatchError(f"checkpoint {path} holds full model weights, but this run trains a PEFT adapter "
                                      "(peft_config): resume without peft_config, or start a new run")
    if not peft_run and adapter and not _holds_full_weights(path):
        raise CheckpointMismatchError(f"checkpoint {path} holds a PEFT adapter ({_ADAPTER}), but this run trains "
                                      "the full model: pass the same peft_config to resume it")
    if peft_run:
        from peft import set_peft_model_state_dict

        with reading(path, _ADAPTER):
            state = load_file(os.path.join(path, _ADAPTER))
        with fitting(path, "the adapter weights"):
            set_peft_model_state_dict(model, state)
        return
    single = os.path.join(path, "model.safetensors")
    with reading(path, "the model weights"):
        if os.path.isfile(single):
            state = load_file(single)
        else:
            with open(os.path.join(path, "model.safetensors.index.json")) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(os.path.join(path, shard)))
    with fitting(path, "the model weights"):
        missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    bad = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if unexpected or bad:
        raise CheckpointMismatchError(f"checkpoint {path} does not match the model: missing {bad[:5]}, "
                                      f"unexpected {unexpected[:5]}")


@contextlib.contextmanager
def fitting(path: str, what: str) -> Iterator[None]:
    """Errors while putting `what`, read from checkpoint `path`, into this run's objects (a state
    dict of other shapes, other parameter groups, missing entries) -> CheckpointMismatchError."""
    try:
        yield
    except (CorruptCheckpointError, CheckpointMismatchError):
        raise
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
        raise CheckpointMismatchError(f"checkpoint {path}: {what} does not fit this run ({type(e).__name__}: "
                                      f"{str(e)[:300]})") from e


def _numpy_rng_globals():
    # what numpy's RNG state (np.random.get_state()) pickles to: an ndarray of uint32
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(path: str) -> Dict[str, Any]:
    """trainer_state.pt, loaded weights-only (tensors, numbers, strings, lists, dicts).

    Checkpoints written before 0.2 also hold numpy's and Python's RNG states; for those exactly
    the numpy types that state pickles to are allowed, nothing else.
    """
    f = os.path.join(path, STATE_FILE)
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(f, map_location="cpu", weights_only=True)
