"""TRL's meaning where the table says "same": what a run writes (save_strategy="no", report_to="none"),
the learning rate it logs and its schedules (transformers' formulas), and metrics kept on the device
(the algorithms' host reads do not grow with the number of micro-batches)."""
import collections
import copy
import math
import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import get_scheduler

from grpo_fast import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
from grpo_fast.train.optim import build_scheduler
from steps import prepared_batch, update


def config(tmp_path, cls=GRPOConfig, **kw):
    values = dict(output_dir=str(tmp_path / "run"), learning_rate=1e-4, max_steps=2, per_device_train_batch_size=8,
                  num_generations=4, max_prompt_length=16, max_completion_length=4, seed=0, disable_tqdm=True)
    values.update(kw)
    return cls(**values)


def train(parts, cfg, cls=GRPOTrainer):
    t = cls(copy.deepcopy(parts["model"]), parts["reward_funcs"], parts["train_dataset"][:16], args=cfg,
            processing_class=parts["tokenizer"])
    t.train()
    return t


def test_save_strategy_no_writes_no_checkpoint_and_report_to_none_no_plots(demo_parts, tmp_path):
    t = train(demo_parts, config(tmp_path, save_strategy="no", report_to="none", save_steps=1))
    out = tmp_path / "run"
    assert not [p for p in os.listdir(out) if p.startswith("checkpoint-") or p in ("final", "plots")], os.listdir(out)
    assert t.last_checkpoint is None and t.final_dir is None and t.plot_paths == []
    assert (out / "metrics.jsonl").is_file()                            # the run's own log stays
    # asked for explicitly, each is written
    t = train(demo_parts, config(tmp_path / "b", save_strategy="no", report_to="none", save_final_model=True,
                                 plot=True))
    assert (tmp_path / "b" / "run" / "final" / "config.json").is_file() and t.plot_paths
    assert not [p for p in os.listdir(tmp_path / "b" / "run") if p.startswith("checkpoint-")]


def test_learning_rate_is_the_rate_the_step_used(demo_parts, tmp_path):
    """A 2-step linear run logs what transformers' schedule gives each update (TRL: 1e-5, then 5e-6)."""
    t = train(demo_parts, config(tmp_path, learning_rate=1e-5, lr_scheduler_type="linear", report_to="none",
                                 save_strategy="no"))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=2)
    expected = []
    for _ in range(2):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [h["learning_rate"] for h in t.history] == pytest.approx(expected)
    assert expected[1] == pytest.approx(expected[0] / 2)                 # 1e-5, 5e-6


@pytest.mark.parametrize("kind,warmup", [("linear", 0), ("linear", 3), ("cosine", 0), ("cosine", 2),
                                         ("constant", 0), ("constant", 3)])
def test_schedules_are_transformers(kind, warmup):
    total = 10
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = build_scheduler(ours_opt, GRPOConfig(lr_scheduler_type=kind, warmup_steps=warmup), total)
    hf_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if kind == "constant" else kind
    hf = get_scheduler(name, hf_opt, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(hf.get_last_lr()[0], abs=1e-12)
        for o, s in ((ours_opt, ours), (hf_opt, hf)):
            o.step()
            s.step()
    ratio = GRPOConfig(warmup_ratio=0.25)
    sched = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), ratio, total)
    assert sched.get_last_lr()[0] == 0.0 and math.ceil(0.25 * total) == 3    # warm-up from 0, as transformers


# ----------------------------------------------------------------------------- host reads
_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
_OURS = os.path.join("grpo_fast", "")
_OPS = os.path.join("grpo_fast", "ops", "")     # input checks: host reads on CPU only (device-side asserts on CUDA)


class HostReads(TorchFunctionMode):
    """Counts tensor -> host reads made from grpo_fast's own code (outside the ops' CPU-only checks)."""

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _READS:
            frame = traceback.extract_stack(limit=3)[-2]
            if _OURS in frame.filename and _OPS not in frame.filename:
                self.where[f"{frame.filename.split(_OURS)[-1]}:{frame.lineno}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls,cfg_cls,extra", [(GRPOTrainer, GRPOConfig, {"num_generations": 4}),
                                               (PPOTrainer, PPOConfig, {"num_generations": 1, "ppo_epochs": 1})],
                         ids=["grpo", "ppo"])
def test_update_reads_the_host_once_per_step_not_per_micro_batch(demo_parts, tmp_path, cls, cfg_cls, extra):
    reads = {}
    for micro in (8, 2):                                  # 1 and 4 micro-batches of the same 8 completions
        cfg = config(tmp_path / str(micro), cfg_cls, per_device_train_batch_size=micro,
                     gradient_accumulation_steps=8 // micro, report_to="none", **extra)
        t = cls(copy.deepcopy(demo_parts["model"]), demo_parts["reward_funcs"], demo_parts["train_dataset"][:8],
                args=cfg, processing_class=demo_parts["tokenizer"])
        batch = prepared_batch(t)
        with HostReads() as counter:
            update(t, batch)
        reads[micro] = counter.where
    assert sum(reads[2].values()) == sum(reads[8].values()), reads       # no read per micro-batch
    assert sum(reads[8].values()) <= 3, reads[8]                         # token count, finite flags, metrics
