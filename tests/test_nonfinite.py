"""Issue 11 §3: non-finite values never reach the weights. NaN reward = no reward, ±inf reward =
an error naming the function and sample; a non-finite loss or gradient norm skips the update
(counted, warned, N in a row stop training); a checkpoint never holds non-finite weights; a
step without learning signal warns once. Tiny batches, 1-3 steps each."""
import copy
import math
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from grpo_fast import group_advantages
from grpo_fast import (GRPOConfig, GRPOTrainer, NonFiniteUpdateError, PPOConfig, PPOTrainer,
                               RewardFunctionError, TRPOConfig, TRPOTrainer)
from grpo_fast.train import checkpoint as ckpt

COMMON = dict(learning_rate=1e-3, lr_scheduler_type="constant", max_steps=1, per_device_train_batch_size=8,
              max_prompt_length=16, max_completion_length=3, save_steps=0, seed=0, disable_tqdm=True, plot=False,
              save_final_model=False, report_to="none")


def grpo_cfg(tmp_path, **kw):
    return GRPOConfig(**{**COMMON, "output_dir": str(tmp_path / "run"), "num_generations": 4, **kw})


def make(parts, config, reward, cls=GRPOTrainer):
    return cls(copy.deepcopy(parts["model"]), reward, parts["train_dataset"][:8], args=config,
               processing_class=parts["tokenizer"])


def varied(completions, **kw):
    return [float(len(c) % 3) for c in completions]


# ----------------------------------------------------------------------------- rewards
def inf_on_sample_2(completions, **kw):
    return [math.inf if i == 2 else 0.0 for i in range(len(completions))]


@pytest.mark.parametrize("cls,config", [
    (GRPOTrainer, lambda p: grpo_cfg(p, advantage_estimator="rloo", scale_rewards="none")),
    (PPOTrainer, lambda p: PPOConfig(**{**COMMON, "output_dir": str(p / "run")}))])
def test_inf_reward_is_an_error_naming_function_and_sample(demo_parts, tmp_path, cls, config):
    trainer = make(demo_parts, config(tmp_path), inf_on_sample_2, cls)
    with pytest.raises(RewardFunctionError, match=r"'inf_on_sample_2' returned inf for sample 2 of the step"):
        trainer.train()
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == []


def test_nan_reward_means_no_reward(demo_parts, tmp_path):
    def half_nan(completions, **kw):
        return [math.nan if i % 2 else float(len(c)) for i, c in enumerate(completions)]

    trainer = make(demo_parts, grpo_cfg(tmp_path, scale_rewards="batch"), half_nan)
    history = trainer.train()
    assert math.isfinite(history[0]["reward"]) and math.isfinite(history[0]["loss"])
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    r = torch.tensor([1.0, math.nan, 2.0, 4.0, math.nan, 0.0, 0.0, 0.0])
    adv = group_advantages(r, 4)
    assert adv[1] == 0 and adv[4] == 0 and bool(torch.isfinite(adv).all())


@pytest.mark.parametrize("estimator,scale", [("grpo", "group"), ("grpo", "batch"), ("rloo", "none")])
def test_group_advantages_refuses_inf(estimator, scale):
    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0, -math.inf, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"rewards\[5\] = -inf"):
        group_advantages(r, 4, estimator=estimator, scale=scale)
    with pytest.raises(ValueError, match=r"rewards\[5\]"):
        group_advantages(r.double(), group_offsets=torch.tensor([0, 3, 8]), estimator=estimator, scale=scale)


# ----------------------------------------------------------------------------- non-finite updates
def _poison_gradients(model):
    p = next(model.parameters())
    return p.register_hook(lambda g: g * float("nan"))


@pytest.mark.parametrize("cls,config", [
    (GRPOTrainer, lambda p: grpo_cfg(p)),
    (PPOTrainer, lambda p: PPOConfig(**{**COMMON, "output_dir": str(p / "run"), "ppo_epochs": 1}))])
def test_nonfinite_update_is_skipped_and_counted(demo_parts, tmp_path, cls, config):
    trainer = make(demo_parts, config(tmp_path), varied, cls)
    before = copy.deepcopy(trainer.model.state_dict())
    handle = _poison_gradients(trainer.model)
    with pytest.warns(RuntimeWarning, match=r"step 1: non-finite loss .* or gradient norm .*skipped"):
        history = trainer.train()
    handle.remove()
    assert history[0]["skipped_updates"] == 1
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)           # no step was taken
    assert ckpt.list_checkpoints(str(tmp_path / "run"))                     # the finite weights were saved


def test_consecutive_nonfinite_updates_stop_training(demo_parts, tmp_path):
    trainer = make(demo_parts, grpo_cfg(tmp_path, max_steps=3, save_steps=1, max_consecutive_nonfinite=2), varied)
    _poison_gradients(trainer.model)
    with pytest.warns(RuntimeWarning, match="step 1"), \
            pytest.raises(NonFiniteUpdateError, match=r"step 2: 2 optimiser updates in a row.*max_consecutive_nonfinite=2"):
        trainer.train()
    saved = ckpt.list_checkpoints(str(tmp_path / "run"))
    assert [os.path.basename(p) for p in saved] == ["checkpoint-1"]         # nothing after the failure
    state = load_file(os.path.join(saved[0], "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


def test_finite_updates_reset_the_count(demo_parts, tmp_path):
    trainer = make(demo_parts, grpo_cfg(tmp_path, max_steps=3, max_consecutive_nonfinite=2), varied)
    handle = None
    seen = []

    def poison_odd_steps(tr, metrics):
        nonlocal handle
        seen.append(metrics["skipped_updates"])
        if handle is not None:
            handle.remove()
            handle = None
        else:
            handle = _poison_gradients(tr.model)
        return False

    handle = _poison_gradients(trainer.model)
    trainer.callbacks.append(poison_odd_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()                           # skip, step, skip: never two in a row
    assert seen == [1, 0, 1]


def test_checkpoint_never_holds_nonfinite_weights(demo_parts, tmp_path):
    trainer = make(demo_parts, grpo_cfg(tmp_path), varied)
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteUpdateError, match="holds NaN/inf; no checkpoint written"):
        trainer.save_checkpoint()
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == []


def test_trpo_rejects_a_nonfinite_step(demo_parts, tmp_path):
    trpo = {k: v for k, v in COMMON.items() if k not in ("learning_rate", "lr_scheduler_type")}   # TRPO has neither
    config = TRPOConfig(**{**trpo, "output_dir": str(tmp_path / "run"), "num_generations": 4})
    trainer = make(demo_parts, config, varied, TRPOTrainer)
    before = copy.deepcopy(trainer.model.state_dict())
    _poison_gradients(trainer.model)
    history = trainer.train()
    assert history[0]["step_accepted"] == 0.0
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- no learning signal
@pytest.mark.parametrize("reward,why", [(lambda completions, **kw: [1.0] * len(completions), "zero std"),
                                        (lambda completions, **kw: [None] * len(completions), "None/NaN")])
def test_step_without_learning_signal_warns_once(demo_parts, tmp_path, reward, why):
    trainer = make(demo_parts, grpo_cfg(tmp_path, max_steps=3), reward)
    with pytest.warns(RuntimeWarning) as record:
        trainer.train()
    msgs = [str(w.message) for w in record if "no learning signal" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("step 1:") and why in msgs[0]


def test_informative_step_does_not_warn(demo_parts, tmp_path):
    def one_per_group(completions, **kw):
        return [1.0 if i % 4 == 0 else 0.0 for i in range(len(completions))]

    trainer = make(demo_parts, grpo_cfg(tmp_path), one_per_group)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.train()
