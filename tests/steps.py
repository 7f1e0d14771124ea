"""The pieces of one training step, for tests that look inside a step (trainer internals), and a
vLLM server process for the server-mode tests."""
import contextlib
import os
import subprocess
import sys

import torch

from grpo_fast.train.batches import sampling_settings


def produce(trainer, indices, settings=None, group_size=None):
    """The samples of dataset rows `indices` (group_size each), as the trainer's producer makes them."""
    cfg = trainer.config
    with trainer.rng.scope():
        return trainer.producer.produce([trainer.train_dataset[i] for i in indices], list(indices),
                                        settings or sampling_settings(cfg), group_size or cfg.num_generations)


def score(trainer, batch, step=1):
    """Rewards and the loss mask, as the loop gives them to the algorithm."""
    return trainer.rewards.score(batch, step).with_loss_mask(trainer.config.mask_truncated_completions)


def prepare(trainer, batch, step=1):
    with trainer.rng.scope():
        return trainer.algorithm.prepare(batch, step)


def next_batch(trainer, step=1):
    """The step's scored rollout, as training_step draws it (dynamic sampling included)."""
    with trainer.rng.scope():
        batch, _, _ = trainer.batches.next(step)
    return batch


def prepared_batch(trainer, indices=None, step=1):
    """A prepared rollout (advantages, old / reference log-probs): of `indices`, or the step's."""
    batch = next_batch(trainer, step) if indices is None else score(trainer, produce(trainer, indices), step)
    return prepare(trainer, batch, step)


def update(trainer, batch, step=1):
    with trainer.rng.scope():
        return trainer.algorithm.update(batch, step)


def update_grads(trainer, batch, step=1):
    """(the flat gradient the (last) optimiser step saw, update()'s metrics): the step frees the
    gradients afterwards (as TRL's does), so they are read by an optimiser pre-step hook."""
    seen = {}

    def grab(optimizer, args, kwargs):
        seen["grad"] = torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]
                                  if p.grad is not None])

    handle = trainer.optimizer.register_step_pre_hook(grab)
    try:
        metrics = update(trainer, batch, step)
    finally:
        handle.remove()
    return seen["grad"], metrics


def make_rollout(prompt_ids, prompt_attention, completion_ids, completion_attention, **fields):
    """A hand-made Rollout of one-turn samples (everything after the prompt was sampled)."""
    from grpo_fast.rollout import Rollout

    N = completion_ids.shape[0]
    values = dict(prompts=[""] * N, completions=[""] * N, dataset_index=list(range(N)), columns={},
                  prompt_ids=prompt_ids, prompt_attention=prompt_attention, completion_ids=completion_ids,
                  completion_attention=completion_attention, sampled_mask=completion_attention,
                  finish_reasons=["stop"] * N, group_ids=torch.arange(N))
    values.update(fields)
    return Rollout(**values)


@contextlib.contextmanager
def vllm_server(path, port, log_path):
    """`grpo-fast vllm-serve` of the model directory `path` on 127.0.0.1:port (fp32, a small KV
    cache, one thread), its output in log_path; stopped (killed if it does not stop) on exit."""
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "grpo_fast", "vllm-serve", "--model", str(path), "--host",
                               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--kv-cache-gib", "0.25",
                               "--num-threads", "1"], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
