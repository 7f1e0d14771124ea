"""Trainer: the loop, wiring the collaborators of a run together.

    prompts --> BatchSource --------------------------------> Algorithm ------> metrics, logs,
                (producer + engine -> samples, RewardRunner    (prepare:         eval, checkpoints,
                 -> rewards, dynamic sampling, loss mask)       advantages;      callbacks
                                                                update)

It owns the cadence (log, evaluate, save, stop) and the run's resources: everything it opens is
closed by close(), which train() calls on success, on error and on Ctrl-C (the engine it built and
its temporary files, the reward runner's event loop and thread). A process group it joined lives
until the process exits (train/distributed.py says why). Each algorithm file
(grpo_fast/algorithms/) subclasses it only to name its config and algorithm classes.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..config import ConfigError, RLConfig
from ..model import Policy, Precision, accepts_index_logits_to_keep, checked_fused_head, prepare_policy
from ..rewards import RewardRunner, prepare_reward_funcs
from ..rollout import EngineSpec, PromptTemplate, RolloutEngine, TurnSpec, build_engine
from . import checkpoint as ckpt
from .algorithm import AlgorithmContext
from .async_batches import batch_source
from .callbacks import Callbacks
from .data import PromptSampler, check_dataset
from .distributed import init_from_env, pick_device
from .evaluation import Evaluator
from .metrics import NoSignalWarning, rollout_metrics
from .plot import plot_run
from .rng import TrainerRNG
from .state import Checkpoints, Progress, open_output_dir, wants_resume
from .tracking import CompletionLog, MetricsTracker, completion_rows

__all__ = ["Trainer", "resolve_alias"]


def resolve_alias(name: str, value, alias: str, alias_value):
    """A constructor argument that TRL spells differently (config / args, tokenizer / processing_class)."""
    if value is not None and alias_value is not None and value is not alias_value:
        raise TypeError(f"give {name}= or {alias}= (TRL's name for it), not both")
    return value if value is not None else alias_value


class Trainer:
    """The loop of every algorithm. `config_class` and `algorithm_class` come from the algorithm's file."""

    config_class = RLConfig
    algorithm_class: Any = None

    def __init__(self, model, reward_funcs=None, train_dataset=None, *, config: Optional[RLConfig] = None,
                 args: Optional[RLConfig] = None, tokenizer=None, processing_class=None, peft_config=None,
                 callbacks: Optional[Sequence[Any]] = None, engine: Optional[RolloutEngine] = None,
                 eval_dataset=None, tools=None, rollout_func=None, environment_factory=None, **algorithm_kwargs):
        config = resolve_alias("config", config, "args", args)
        tokenizer = resolve_alias("tokenizer", tokenizer, "processing_class", processing_class)
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            kind = type(self.config)
            raise TypeError(f"config: expected grpo_fast's {self.config_class.__name__}, got {kind.__module__}."
                            f"{kind.__name__}" + (" (import the config from grpo_fast as well: from grpo_fast import "
                                                  f"{self.config_class.__name__})" if kind.__module__.startswith("trl")
                                                  else ""))
        self.closed = False
        self._resources = contextlib.ExitStack()   # closed in one place: close()
        try:
            # TRL's multi-turn arguments (rollout/turns.py): checked now, they pick the producer
            turns = TurnSpec(tools, environment_factory, rollout_func, tool_call_timeout=self.config.tool_call_timeout)
            self._resources.callback(turns.close)
            self._build(model, tokenizer, reward_funcs, train_dataset, eval_dataset, peft_config, callbacks, engine,
                        algorithm_kwargs, turns)
        except BaseException:
            self.close()
            raise

    def _build(self, model, tokenizer, reward_funcs, train_dataset, eval_dataset, peft_config, callbacks, engine,
               algorithm_kwargs, turns) -> None:
        cfg = self.config
        ckpt.check_writable(cfg.output_dir)  # fails now, not after the model has loaded and a step has run
        # torchrun: join the process group (it lives until the process ends: train/distributed.py)
        self.dist = init_from_env(cfg.distributed, cfg.ddp_timeout)
        self.device = pick_device(cfg.device, self.dist)
        # the same seed on every rank until the policy is replicated: identical initialisation (LoRA...)
        self.rng = TrainerRNG(cfg.seed, self.device)
        self.train_dataset = check_dataset(turns.train_dataset(train_dataset, cfg.prompts_per_step))
        self.eval_dataset = None if eval_dataset is None else check_dataset(eval_dataset, "eval_dataset")
        if cfg.eval_strategy != "no" and self.eval_dataset is None:
            raise ConfigError(f"eval_strategy={cfg.eval_strategy!r} needs an eval_dataset (the trainer's argument)")
        model, tokenizer = prepare_policy(model, tokenizer, cfg, device=self.device, peft_config=peft_config,
                                          init_scope=self.rng.scope)
        self.template = PromptTemplate(tokenizer, cfg.max_prompt_length)
        ids = self.template.encode([self.train_dataset[0]["prompt"]])[0]
        check_ids = torch.tensor([ids[-16:] or [tokenizer.eos_token_id]], device=self.device)   # (1, L)
        index = accepts_index_logits_to_keep(model)  # decided once, from the forward's signature
        head = checked_fused_head(model, name="policy", dist=self.dist, index_logits_to_keep=index,
                                  check_ids=check_ids) if cfg.fused_lm_head else None
        self.policy = Policy(model, tokenizer, temperature=cfg.temperature, fused_head=head,
                             index_logits_to_keep=index, precision=Precision.from_config(cfg, self.device))
        self.callbacks = Callbacks(callbacks, cfg, is_main=self.dist.is_main)
        reward_funcs, weights = turns.reward_funcs(reward_funcs, cfg.reward_weights)   # + environments' get_reward
        funcs, names = prepare_reward_funcs(reward_funcs, device=self.device)
        self.rewards = RewardRunner(funcs, names, weights, trainer_state=self.callbacks.state)
        self._resources.callback(self.rewards.close)
        if engine is None:  # an engine the caller passed is theirs to close
            engine = build_engine(EngineSpec(model, tokenizer, cfg, self.device, self.dist.rank,
                                             self.dist.world_size, fsdp2=self.dist.mode == "fsdp2"))
            self._resources.callback(engine.close)
        self.engine = engine
        self.producer = turns.producer(engine, self.template, cfg, device=self.device, trainer=self, dist=self.dist)
        self._resources.callback(self.producer.close)
        self.sampler = PromptSampler(len(self.train_dataset), cfg.seed, cfg.shuffle_dataset)
        # max_staleness > 0: a producer thread generates ahead of the trainer (train/async_batches.py)
        self.batches = batch_source(self.producer, self.rewards, self.sampler, self.train_dataset, cfg, self.dist, engine)
        self._resources.callback(self.batches.close)
        self.evaluator = None if self.eval_dataset is None else \
            Evaluator(self.producer, self.rewards, self.eval_dataset, cfg, self.rng)
        self.no_signal = NoSignalWarning(self.dist)
        ctx = AlgorithmContext(cfg, self.dist, self.device, self.rng, self.policy, check_ids)
        self.algorithm = self.algorithm_class(ctx, **algorithm_kwargs)
        self.checkpoints = Checkpoints(cfg, self.dist, policy=self.policy, algorithm=self.algorithm, rng=self.rng,
                                       sampler=self.sampler, engine=engine, batches=self.batches)
        self.progress = Progress()
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.final_dir: Optional[str] = None
        self.plot_paths: List[str] = []
        self.last_batch = None

    # ------------------------------------------------------------------ what users and callbacks read
    model = property(lambda self: self.policy.model, doc="The policy (unwrapped).")
    tokenizer = processing_class = property(lambda self: self.policy.tokenizer)
    args = property(lambda self: self.config, doc="TRL's name for the config (rollout_func reads trainer.args).")
    wrapped_model = property(lambda self: self.policy.wrapped, doc="The module gradient forwards run through.")
    ref_model = property(lambda self: self.policy.ref_model)
    optimizer = property(lambda self: self.algorithm.optimizer)
    scheduler = property(lambda self: self.algorithm.scheduler)
    reward_names = property(lambda self: self.rewards.names)
    state = property(lambda self: self.callbacks.state, doc="TRL's TrainerState.")
    last_checkpoint = property(lambda self: self.checkpoints.last)
    history = property(lambda self: self.progress.history)

    @property
    def global_step(self) -> int:
        return self.progress.step

    @property
    def num_tokens(self) -> int:
        return self.progress.num_tokens

    # ------------------------------------------------------------------ the run
    def train(self, resume_from_checkpoint: Optional[str] = None) -> List[Dict[str, Any]]:
        """Train for config.max_steps steps; returns the metrics history (one dict per logged step).

        resume_from_checkpoint (TRL's train() argument): a checkpoint directory, or "latest"/True for
        the newest complete one in output_dir; overrides config.resume_from_checkpoint.

        The output folder is locked for the run (OUTPUT_DIR/.grpo_fast.lock, fcntl.flock: the OS
        drops it when the process dies). A folder that already holds a run is refused unless the
        run resumes or config.overwrite_output_dir clears it (docs/trl_migration.md, "Output folders").
        The trainer is closed afterwards (close()), whatever happened.
        """
        if self.closed:
            raise RuntimeError("this trainer is closed (train() releases its engine and workers when it ends); "
                               "build a new one, resume_from_checkpoint='latest' continues the run")
        spec = wants_resume(resume_from_checkpoint if resume_from_checkpoint is not None
                            else self.config.resume_from_checkpoint)
        try:
            lock = open_output_dir(self.config, self.dist, spec)
            try:
                if spec is not None:
                    self.checkpoints.resume(spec, self.progress)
                    self.engine.sync_weights(self.model)  # an engine with its own copy samples the resumed weights
                self.callbacks.run("on_train_begin", self)
                self._loop()
                self.callbacks.run("on_train_end", self)
            finally:
                if lock is not None:
                    lock.release()
            return self.history
        finally:
            self.close()

    def _loop(self) -> None:
        cfg, main = self.config, self.dist.is_main   # only rank 0 writes logs, the bar, plots and final/
        if main:
            cfg.to_yaml(os.path.join(cfg.output_dir, "config.yaml"))
        tracker = MetricsTracker(cfg.output_dir, max_steps=cfg.max_steps, start_step=self.global_step,
                                 history=self.history, report_to=cfg.report_to, disable_tqdm=cfg.disable_tqdm,
                                 desc=self.algorithm.name, enabled=main)
        completions = CompletionLog(cfg.output_dir, start_step=self.global_step, enabled=main and cfg.log_completions)
        stopped = False
        try:
            if cfg.eval_strategy == "steps" and self.global_step == 0:  # the curve's starting point
                first = {"step": 0, **self.evaluate()}
                self.history.append(first)
                tracker.log(first)
            while self.global_step < cfg.max_steps:
                metrics = self.training_step()
                tracker.advance()
                step = self.global_step
                logged = step % cfg.logging_steps == 0 or step == cfg.max_steps
                if cfg.log_completions and logged:  # collective: every rank's rows reach rank 0
                    completions.log(completion_rows(self.last_batch, step, self.reward_names, self.template,
                                                    self.dist, cfg.num_completions_to_print))
                if cfg.eval_strategy == "steps" and (step % (cfg.eval_steps or cfg.logging_steps) == 0
                                                     or step == cfg.max_steps):
                    metrics.update(self.evaluate())
                    logged = True
                self.last_batch = None
                if logged:
                    self.history.append(metrics)
                    tracker.log(metrics)
                epoch = self.sampler.epoch + self.sampler.position / self.sampler.size
                stop = self.dist.any(self.callbacks.step_end(self, metrics, logged=logged, step=step, epoch=epoch,
                                                             num_tokens=self.num_tokens))
                if cfg.writes_checkpoints and cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
                    self.save_checkpoint()
                if stop:
                    stopped = True
                    break
        finally:
            tracker.close()
        # reached only when no error was raised: a failing step never overwrites a checkpoint
        if cfg.writes_checkpoints and (self.last_checkpoint is None
                                       or not self.last_checkpoint.endswith(f"checkpoint-{self.global_step}")):
            self.save_checkpoint()
        if not stopped:
            if cfg.writes_final_model:
                self.save_final()
            if cfg.writes_plots and main:
                self.write_plots()
        self.dist.barrier()  # no rank returns before rank 0 has written everything

    def training_step(self) -> Dict[str, Any]:
        """One step: the scored rollout, the algorithm's prepare and update, the weight sync, metrics."""
        cfg, dist = self.config, self.dist
        step = self.global_step + 1
        self.rewards.begin_step()
        self.state.global_step = step - 1   # TRL's state while scoring: the steps done so far
        t0 = time.perf_counter()
        with self.rng.scope():  # sampling and dropout draw from the trainer's random state
            batch, t_gen, sampling_metrics = self.batches.next(step)
            self.no_signal.check(batch, step)
            with self.policy.autocast():  # bf16 / fp16: every trainer forward (model/precision.py)
                batch = self.algorithm.prepare(batch, step)
                update_metrics = self.algorithm.update(batch, step)
            self.engine.sync_weights(self.model)
        self.progress.step = step
        self.last_batch = batch if cfg.log_completions else None  # for the completion log
        dt = time.perf_counter() - t0
        tokens = int(batch.prompt_attention.sum() + batch.sampled_mask.sum())   # TRL: tool tokens not counted
        if dist.enabled:  # global tokens; the slowest rank's times
            tokens = int(dist.sum_floats([tokens])[0])
            dt, t_gen = dist.all_reduce(torch.tensor([dt, t_gen], dtype=torch.float64), "max").tolist()
        self.progress.num_tokens += tokens
        metrics: Dict[str, Any] = {"step": step}
        metrics.update(rollout_metrics(batch, self.reward_names, dist))
        metrics.update(update_metrics)
        metrics.update(dist.mean_metrics(batch.extras.get("metrics", {})))
        metrics.update(sampling_metrics)
        metrics.update(num_tokens=self.num_tokens, tokens_per_s=tokens / dt, generation_time=t_gen, step_time=dt)
        metrics.update(self.rewards.step_metrics())
        return metrics

    def evaluate(self) -> Dict[str, float]:
        """eval_* metrics on eval_dataset at the current step (train/evaluation.py)."""
        if self.evaluator is None:
            raise ValueError("evaluate() needs an eval_dataset (the trainer's argument)")
        return self.evaluator.evaluate(self.global_step)

    # ------------------------------------------------------------------ files
    def save_checkpoint(self) -> str:
        """Collective under torchrun: every rank calls it (rank 0 writes, FSDP2 ranks write their shards)."""
        return self.checkpoints.save(self.progress)

    def load_checkpoint(self, path: str) -> None:
        self.checkpoints.load(path, self.progress)

    def save_final(self) -> str:
        """OUTPUT_DIR/final: the policy (merged when PEFT), its tokenizer, and what the algorithm adds.
        Collective under torchrun (FSDP2 gathers the full weights); rank 0 writes."""
        self.final_dir = self.checkpoints.save_final()
        return self.final_dir

    def write_plots(self) -> List[str]:
        try:
            self.plot_paths = plot_run(self.config.output_dir)
        except ImportError as e:  # matplotlib missing: the JSONL has the numbers
            print(f"[grpo_fast] plots skipped: {e}")
            self.plot_paths = []
        return self.plot_paths

    # ------------------------------------------------------------------ resources
    def close(self) -> None:
        """Release what the trainer opened: the engine it built (and its temporary files), the reward
        runner's loop and thread. Idempotent; train() calls it."""
        if not self.closed:
            self.closed = True
            self._resources.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
