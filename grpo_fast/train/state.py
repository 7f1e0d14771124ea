"""A run's state on disk: what a checkpoint holds, saving, loading and resuming it, and the output
folder's rules (one run at a time; a folder that holds a run is continued or overwritten, never
mixed). The files themselves are written atomically by train/checkpoint.py."""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from . import checkpoint as ckpt
from .optim import NonFiniteUpdateError

__all__ = ["Checkpoints", "Progress", "open_output_dir", "wants_resume"]


@dataclass
class Progress:
    """Where a run is: steps done, the logged metrics, tokens seen."""

    step: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    num_tokens: int = 0


# settings whose value lives in the optimiser's state (param_groups) and the scheduler's base_lrs
_OPTIMIZER_FIELDS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay")
# where and how a run is driven, not what it trains
_NOT_SETTINGS = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir", "device", "disable_tqdm",
                 "report_to", "plot")


def wants_resume(spec) -> Optional[str]:
    """The resume_from_checkpoint value as a spec ("latest" or a path), or None for a fresh run."""
    if isinstance(spec, bool):
        spec = "latest" if spec else None
    if spec is None or str(spec).lower() in ("", "false", "none"):
        return None
    return str(spec)


def open_output_dir(config, dist, resume: Optional[str]) -> Optional[ckpt.OutputDirLock]:
    """Lock the output folder for this run (rank 0) and apply its rules; every rank stops when rank
    0 cannot. A folder holding an earlier run is refused unless the run resumes, or
    overwrite_output_dir clears that run's files (docs/trl_migration.md, "Output folders")."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = ckpt.OutputDirLock(config.output_dir)
            found = ckpt.previous_run(config.output_dir)
            if found and resume is None:
                if not config.overwrite_output_dir:
                    raise ckpt.OutputDirError(
                        f"output_dir {config.output_dir!r} already holds a run ({', '.join(found[:4])}"
                        f"{', ...' if len(found) > 4 else ''}): continue it with --resume_from_checkpoint latest "
                        "(resume_from_checkpoint='latest'), or start afresh with --overwrite_output_dir "
                        "(overwrite_output_dir=True, which deletes that run's files), or pick another output_dir")
                ckpt.clear_run(config.output_dir)
        except ckpt.OutputDirError as e:
            if lock is not None:
                lock.release()
                lock = None
            error = e
    if dist.any(error is not None):  # every rank stops, not only rank 0
        raise error or ckpt.OutputDirError(f"output_dir {config.output_dir!r} cannot take this run (see rank 0)")
    return lock


class Checkpoints:
    """Saves and restores everything a run needs to continue exactly: the policy's weights, the
    algorithm's optimiser, scheduler, state and files (critic, ...), the random state, the prompt
    sampler, the engine's state, and the progress."""

    def __init__(self, config, dist, *, policy, algorithm, rng, sampler, engine, batches=None, say=print):
        self.config, self.dist = config, dist
        self.policy, self.algorithm, self.rng, self.sampler, self.engine = policy, algorithm, rng, sampler, engine
        self.batches = batches   # asynchronous rollouts: where each rank's producer stands (train/async_batches.py)
        self.say = say
        self.last: Optional[str] = None

    def _state(self, progress: Progress) -> Dict[str, Any]:
        alg, sharded = self.algorithm, self.dist.enabled and self.dist.mode == "fsdp2"
        state = {"step": progress.step, "rng": self.rng.state_dict(), "sampler": self.sampler.state_dict(),
                 "history": progress.history, "num_tokens": progress.num_tokens, "config": self.config.to_dict(),
                 "algorithm": alg.name, "extra": alg.state_dict(), "engine": self.engine.state_dict()}
        if alg.scheduler is not None:
            state["scheduler"] = alg.scheduler.state_dict()
        if alg.optimizer is not None and not sharded:  # FSDP2: the optimiser state is in the sharded files
            state["optimizer"] = alg.optimizer.state_dict()
        stream = None if self.batches is None else self.batches.state_dict()
        if stream is not None:   # every rank's: each rank's producer draws its own rounds
            state["batches"] = self.dist.all_gather_object(stream)
        if self.dist.enabled:  # every rank's generators, so each rank resumes its own sampling exactly
            state["rng_per_rank"] = self.dist.all_gather_object(state["rng"])
            state["world_size"] = self.dist.world_size
            state["distributed"] = self.dist.mode
        return state

    def save(self, progress: Progress) -> str:
        """Collective under torchrun: every rank calls it (rank 0 writes, FSDP2 ranks their shards)."""
        model = self.policy.model
        bad = next((n for n, p in model.named_parameters()
                    if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())), None)
        if self.dist.any(bad is not None):
            raise NonFiniteUpdateError(f"step {progress.step}: parameter {bad or '(on another rank)'} holds "
                                       "NaN/inf; no checkpoint written (the previous one is intact)")
        self.last = ckpt.save_checkpoint(self.config.output_dir, progress.step, model, self.policy.tokenizer,
                                         self._state(progress), self.config.save_total_limit, dist=self.dist,
                                         optimizer=self.algorithm.optimizer, write_extra=self.algorithm.save_files)
        return self.last

    def load(self, path: str, progress: Progress) -> None:
        """Restore checkpoint `path` (an unreadable file raises ckpt.CorruptCheckpointError naming it;
        state that reads fine but does not fit this run ckpt.CheckpointMismatchError naming what).
        Settings that differ from the checkpoint's are listed in a warning; the optimiser's and the
        scheduler's state win, so the optimiser fields (learning_rate, betas, eps, weight decay) take
        the checkpoint's values in the config (and config.yaml), the others the new ones."""
        alg, dist, model = self.algorithm, self.dist, self.policy.model
        with ckpt.reading(path, ckpt.STATE_FILE):
            state = ckpt.load_state(path)
        if state.get("algorithm", alg.name) != alg.name:
            raise ckpt.CheckpointMismatchError(f"checkpoint {path} was written by the {state['algorithm']} trainer, "
                                               f"not {alg.name}")
        saved_world = int(state.get("world_size", 1))
        fsdp2 = dist.enabled and dist.mode == "fsdp2"
        if ckpt.is_sharded(path):
            if not fsdp2 or saved_world != dist.world_size:
                raise ckpt.CheckpointMismatchError(f"checkpoint {path} is an FSDP2 checkpoint sharded over {saved_world} processes: "
                                 f"resume it with distributed=fsdp2 on {saved_world} processes (this run: "
                                 f"{dist.mode} on {dist.world_size})")
            ckpt.load_sharded(path, model, alg.optimizer)
        else:
            if fsdp2:
                raise ckpt.CheckpointMismatchError(f"checkpoint {path} is not sharded: resume it with distributed=ddp")
            ckpt.load_model_weights(model, path)
            if alg.optimizer is not None:
                with ckpt.fitting(path, f"the optimiser state in {ckpt.STATE_FILE}"):
                    alg.optimizer.load_state_dict(state["optimizer"])
        if alg.scheduler is not None:
            with ckpt.fitting(path, f"the scheduler state in {ckpt.STATE_FILE}"):
                alg.scheduler.load_state_dict(state["scheduler"])
        self._reconcile_config(state.get("config") or {}, path)
        self.sampler.load_state_dict(state["sampler"])
        progress.step = int(state["step"])
        progress.history = list(state["history"])
        progress.num_tokens = int(state.get("num_tokens", 0))
        with ckpt.reading(path, "the algorithm's files"), ckpt.fitting(path, "the algorithm's state"):
            alg.load_state_dict(state.get("extra", {}), path)
        if state.get("engine"):
            self.engine.load_state_dict(state["engine"])
        streams = state.get("batches")
        if streams and self.batches is not None:   # what was generated ahead is generated again
            if len(streams) != dist.world_size and dist.is_main:
                self.say(f"[grpo_fast] {path} was written by {len(streams)} process(es): every rank resumes the "
                         "prompt stream where rank 0's stood")
            self.batches.load_state_dict(streams[dist.rank] if len(streams) == dist.world_size else streams[0])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == dist.world_size:
            self.rng.load_state_dict(per_rank[dist.rank])
        elif not dist.enabled:
            self.rng.load_state_dict(state["rng"] if per_rank is None else per_rank[0])
        else:  # another world size: the weights, optimiser and data order carry over, sampling restarts
            if dist.is_main:
                self.say(f"[grpo_fast] {path} was written by {saved_world} process(es), this run has "
                         f"{dist.world_size}: random generators reseeded per rank")
            self.rng.reseed(self.config.seed + 1_000_003 * progress.step + dist.rank)
        self.last = path

    def _reconcile_config(self, saved: Dict[str, Any], path: str) -> None:
        now = self.config.to_dict()
        changed = [k for k in now if k in saved and k not in _NOT_SETTINGS and saved[k] != now[k]]
        if not changed:
            return
        kept = {k: saved[k] for k in changed if k in _OPTIMIZER_FIELDS}
        lines = [f"  {k}: {saved[k]!r} in the checkpoint, {now[k]!r} now -> "
                 + ("the checkpoint's (optimiser state)" if k in kept else "the new value") for k in changed]
        if self.dist.is_main:
            warnings.warn(f"resuming {path} with changed settings:\n" + "\n".join(lines)
                          + "\nconfig.yaml records the values in effect", RuntimeWarning, stacklevel=4)
        for k, v in kept.items():  # in place: every collaborator holds this config
            setattr(self.config, k, v)

    def resume(self, spec: str, progress: Progress) -> None:
        """Load the checkpoint `spec` names ("latest": the newest loadable one in output_dir, falling
        back past corrupt ones with a warning each; a path: that one or an error)."""
        output_dir = self.config.output_dir
        candidates = ckpt.resume_candidates(spec, output_dir)
        if not candidates:
            if self.dist.is_main:
                warnings.warn(f"resume_from_checkpoint={spec!r}: no checkpoint in {output_dir!r}, starting fresh "
                              "from step 0", RuntimeWarning, stacklevel=4)
            return
        explicit = str(spec).lower() not in ("latest", "true", "last")
        for path in candidates:
            try:
                problem = ckpt.verify_checkpoint(path)
                if problem is not None:
                    raise ckpt.CorruptCheckpointError(problem)
                self.load(path, progress)
                return
            except ckpt.CorruptCheckpointError as e:
                if explicit:
                    raise
                if self.dist.is_main:
                    warnings.warn(f"{e}; trying the next older checkpoint", RuntimeWarning, stacklevel=4)
        raise ckpt.CorruptCheckpointError(f"no checkpoint in {output_dir!r} could be loaded (each is named in a "
                                          "warning above); move them away to start fresh")

    def save_final(self) -> str:
        """OUTPUT_DIR/final: the policy (merged when PEFT), its tokenizer, and what the algorithm
        adds (the value model). Collective under torchrun (FSDP2 gathers the full weights); rank 0
        writes."""
        path = os.path.join(self.config.output_dir, "final")
        model = self.policy.model
        state = ckpt.full_model_state(model) if self.dist.enabled and self.dist.mode == "fsdp2" else None
        if self.dist.is_main:
            if state is None and hasattr(model, "merge_and_unload"):
                model = copy.deepcopy(model).merge_and_unload()
            with ckpt.quiet_progress():
                model.save_pretrained(path, safe_serialization=True, **({} if state is None else {"state_dict": state}))
                self.policy.tokenizer.save_pretrained(path)
                self.algorithm.export(path)
        return path
