"""A resume that fails because the checkpoint does not fit the run is a clear error naming what
differs, not a corrupt checkpoint, and no older checkpoint is tried; a truly unreadable file is
still corrupt and the next older checkpoint is used."""
import copy
import os
import warnings

import pytest

from grpo_fast import CheckpointMismatchError, CorruptCheckpointError, GRPOConfig, GRPOTrainer


def config(out, **kw):
    values = dict(output_dir=str(out), learning_rate=1e-4, max_steps=2, per_device_train_batch_size=8,
                  num_generations=4, max_prompt_length=16, max_completion_length=4, save_steps=1, seed=0,
                  disable_tqdm=True, plot=False, save_final_model=False, report_to="none")
    values.update(kw)
    return GRPOConfig(**values)


def run(parts, cfg, model=None, **kw):
    model = model if model is not None else copy.deepcopy(parts["model"])
    return GRPOTrainer(model, parts["reward_funcs"], parts["train_dataset"][:16], args=cfg,
                       processing_class=parts["tokenizer"], **kw)


@pytest.fixture
def two_checkpoints(demo_parts, tmp_path):
    out = tmp_path / "run"
    run(demo_parts, config(out)).train()
    assert {"checkpoint-1", "checkpoint-2"} <= set(os.listdir(out))
    return out


def _resume_fails(parts, cfg, match, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointMismatchError, match=match) as err:
            run(parts, cfg, **kw).train()
    assert not isinstance(err.value, CorruptCheckpointError)
    assert not [w for w in seen if "trying the next older checkpoint" in str(w.message)]   # no fallback
    return err.value


def test_other_optimizer_param_groups_are_a_mismatch(demo_parts, two_checkpoints):
    model = copy.deepcopy(demo_parts["model"])
    model.model.embed_tokens.weight.requires_grad_(False)          # one parameter fewer in the optimiser
    err = _resume_fails(demo_parts, config(two_checkpoints, max_steps=3, resume_from_checkpoint="latest"),
                        r"checkpoint-2: the optimiser state .* does not fit this run", model=model)
    assert "corrupt" not in str(err).lower()


def test_peft_turned_on_is_a_mismatch(demo_parts, two_checkpoints):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    _resume_fails(demo_parts, config(two_checkpoints, max_steps=3, resume_from_checkpoint="latest"),
                  r"checkpoint-2 holds full model weights, but this run trains a PEFT adapter", peft_config=lora)


def test_an_unreadable_file_is_still_corrupt_and_the_older_one_is_used(demo_parts, two_checkpoints):
    weights = two_checkpoints / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)             # same size: the COMPLETE marker passes
    with pytest.raises(CorruptCheckpointError, match="model weights could not be read"):   # named: no fallback
        run(demo_parts, config(two_checkpoints, max_steps=3,
                               resume_from_checkpoint=str(two_checkpoints / "checkpoint-2"))).train()
    trainer = run(demo_parts, config(two_checkpoints, max_steps=3, resume_from_checkpoint="latest"))
    with pytest.warns(RuntimeWarning, match=r"checkpoint-2: the model weights could not be read.*next older"):
        trainer.train()
    assert trainer.history[0]["step"] == 1 and trainer.global_step == 3       # resumed from checkpoint-1
