"""The training loop and the collaborators it composes.

    trainer.py      Trainer: the loop, cadence (log, evaluate, save, stop) and the run's resources
    algorithm.py    the interface an algorithm implements (prepare, update, state)
    batches.py      the step's scored rollout: producer -> rewards -> dynamic sampling -> loss mask
    advantages.py   group advantages over ranks, GAE with whitening, the rollout-engine correction
    optim.py        the optimiser, its schedule, one optimiser step (norm, clip, finite guard)
    metrics.py      the metric accumulator, rollout statistics, the no-signal warning
    evaluation.py   evaluation on held-out prompts
    callbacks.py    TrainerCallback objects and plain callables
    state.py        checkpoint contents, resume, the output folder's rules
    checkpoint.py   atomic checkpoint files and the output-folder lock
    data.py         the prompt sampler and the dataset check
    rng.py          the trainer's own random state
    distributed.py  torchrun: DDP / FSDP2 and the few collectives used
    tracking.py     metrics.jsonl, TensorBoard, the progress bar, completion logs; plot.py plots
"""
from .algorithm import Algorithm, AlgorithmContext
from .checkpoint import CheckpointMismatchError, CorruptCheckpointError, OutputDirError
from .optim import NonFiniteUpdateError
from .trainer import Trainer

__all__ = ["Algorithm", "AlgorithmContext", "CheckpointMismatchError", "CorruptCheckpointError",
           "NonFiniteUpdateError", "OutputDirError", "Trainer"]
