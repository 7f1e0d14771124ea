"""GRPOTrainer end to end on the built-in task (tiny Llama, char tokenizer): short CPU runs."""
import copy
import json
import math
import os

import pytest
import torch

from grpo_fast import ConfigError, GRPOConfig, GRPOTrainer, RewardFunctionError
from grpo_fast.train import checkpoint as ckpt
from grpo_fast.rewards import accuracy_reward
from steps import make_rollout, prepare, produce, score

TIMING = {"tokens_per_s", "step_time", "generation_time"}


@pytest.fixture
def parts(demo_parts):
    return demo_parts


def small_config(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path / "run"), learning_rate=5e-4, lr_scheduler_type="constant",
                  max_steps=4, per_device_train_batch_size=32, num_generations=4, max_prompt_length=16,
                  max_completion_length=4, logging_steps=1, save_steps=0, seed=0, disable_tqdm=True,
                  plot=False, save_final_model=False, report_to="none")
    values.update(kw)
    return GRPOConfig(**values)


def make_trainer(parts, config, reward_funcs=None, data=None, **kw):
    return GRPOTrainer(copy.deepcopy(parts["model"]), reward_funcs or [accuracy_reward],
                       data if data is not None else parts["train_dataset"], config=config,
                       tokenizer=parts["tokenizer"], **kw)


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_grpo_learns_addition(parts, tmp_path):
    cfg = small_config(tmp_path, max_steps=250, per_device_train_batch_size=128, num_generations=8)
    history = make_trainer(parts, cfg).train()
    rewards = [h["reward"] for h in history]
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    assert first < 0.4, first
    assert last > first + 0.25, (first, last)


def test_metrics_logged_every_step(parts, tmp_path):
    cfg = small_config(tmp_path, max_steps=3, save_final_model=True, plot=True)
    trainer = make_trainer(parts, cfg)
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2, 3]
    expected = {"reward", "reward_std", "frac_reward_zero_std", "rewards/accuracy_reward/mean",
                "rewards/accuracy_reward/std", "kl", "entropy", "clip_ratio_low", "clip_ratio_high",
                "clip_ratio_region", "completion_length", "completion_length_min", "completion_length_max",
                "clipped_ratio", "tokens_per_s", "step_time", "learning_rate", "grad_norm", "loss"}
    assert expected <= set(history[0]), expected - set(history[0])
    for h in history:
        assert 0.0 <= h["reward"] <= 1.0 and h["entropy"] > 0 and h["tokens_per_s"] > 0
        assert 1 <= h["completion_length_min"] <= h["completion_length"] <= h["completion_length_max"] <= 4
    rows = read_jsonl(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["reward"] == history[-1]["reward"]
    assert os.path.isfile(os.path.join(cfg.output_dir, "final", "config.json"))
    assert os.path.isfile(os.path.join(cfg.output_dir, "plots", "reward.png"))
    assert ckpt.list_checkpoints(cfg.output_dir)[-1].endswith("checkpoint-3")


def test_policy_logits_match_generation(parts):
    """The policy forward (logits_to_keep, left padding) reproduces generate()'s own scores."""
    model, tok = parts["model"], parts["tokenizer"]
    enc = tok(["4+4=", "12+3=", "1+1="], return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    scores = torch.stack(out.scores, 1)                                         # (B, T, V)
    cfg = GRPOConfig(disable_tqdm=True, report_to="none")
    trainer = GRPOTrainer(model, [accuracy_reward], parts["train_dataset"], config=cfg, tokenizer=tok)
    comp = out.sequences[:, enc["input_ids"].shape[1]:]
    batch = make_rollout(enc["input_ids"], enc["attention_mask"], comp, torch.ones_like(comp))
    with torch.no_grad():
        logits = trainer.policy.logits(model, batch)
    assert logits.shape == scores.shape
    torch.testing.assert_close(logits, scores, atol=1e-4, rtol=1e-4)


def test_completion_mask_stops_at_first_eos(parts, tmp_path):
    trainer = make_trainer(parts, small_config(tmp_path))
    batch = produce(trainer, [0, 1, 2, 3])
    eos = parts["tokenizer"].eos_token_id
    assert torch.equal(batch.sampled_mask, batch.completion_attention)   # one turn: every token was sampled
    assert batch.rewards is None and batch.loss_mask is None                # not scored yet
    for ids, m, tr in zip(batch.completion_ids, batch.completion_attention, batch.truncated):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        if tr:
            assert n == len(ids) and eos not in ids.tolist()
        else:
            assert ids[n - 1] == eos and eos not in ids[: n - 1].tolist()


# ----------------------------------------------------------------------------- resume
def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
def test_resume_is_exact(parts, tmp_path):
    """Stopped at step 3 (checkpoint), resumed, the later steps equal an uninterrupted run."""
    common = dict(max_steps=6, num_iterations=2, beta=0.05, lr_scheduler_type="cosine", warmup_steps=2,
                  save_steps=3, learning_rate=1e-3, device="cpu")
    # with attention dropout on, the update draws random numbers too: the resume must restore them
    parts = dict(parts, model=copy.deepcopy(parts["model"]))
    for m in parts["model"].modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.1
    full_cfg = small_config(tmp_path / "a", **common)
    full = make_trainer(parts, full_cfg).train()

    def crash_after_4(trainer, metrics):
        if metrics["step"] == 4:
            raise KeyboardInterrupt("simulated kill")

    cfg_b = small_config(tmp_path / "b", **common)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(parts, cfg_b, callbacks=[crash_after_4]).train()
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(cfg_b.output_dir)] == ["checkpoint-3"]

    resumed = make_trainer(parts, cfg_b.replace(resume_from_checkpoint="latest")).train()
    assert _strip(resumed) == _strip(full)  # bit-equal: rewards, loss, kl, grad norms, lr
    rows_a = _strip(read_jsonl(os.path.join(full_cfg.output_dir, "metrics.jsonl")))
    rows_b = _strip(read_jsonl(os.path.join(cfg_b.output_dir, "metrics.jsonl")))
    assert rows_a == rows_b and [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]


def test_killed_save_leaves_previous_checkpoint(parts, tmp_path, monkeypatch):
    cfg = small_config(tmp_path, max_steps=2, save_steps=1)
    trainer = make_trainer(parts, cfg)
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if "checkpoint-2" in str(path):
            raise OSError("disk died mid-save")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        trainer.train()
    latest = ckpt.resolve_checkpoint("latest", cfg.output_dir)
    assert latest.endswith("checkpoint-1")
    state = ckpt.load_state(latest)
    assert state["step"] == 1 and len(state["history"]) == 1
    monkeypatch.setattr(torch, "save", real_save)
    again = make_trainer(parts, cfg.replace(resume_from_checkpoint="latest"))
    again.train()
    assert again.global_step == 2


# ----------------------------------------------------------------------------- random state
def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_trainer_leaves_the_global_rng_alone(parts, tmp_path):
    """Constructing and training neither reseeds nor advances the process's global generator."""
    torch.manual_seed(987)
    before = torch.get_rng_state()
    trainer = make_trainer(parts, small_config(tmp_path, max_steps=2))
    trainer.train()
    assert torch.equal(torch.get_rng_state(), before)


def test_user_randomness_between_steps_does_not_change_training(parts, tmp_path):
    """Draws from the global generator between steps (user code, callbacks) leave training unchanged."""
    a = make_trainer(parts, small_config(tmp_path / "a", max_steps=3))
    hist_a = a.train()

    def noisy(trainer, metrics):
        torch.rand(1000)
        torch.manual_seed(metrics["step"])
        return False

    b = make_trainer(parts, small_config(tmp_path / "b", max_steps=3), callbacks=[noisy])
    hist_b = b.train()
    assert _strip(hist_a) == _strip(hist_b)
    for x, y in zip(_params(a.model), _params(b.model)):
        assert torch.equal(x, y)


def test_checkpoint_state_is_weights_only_and_old_format_loads(parts, tmp_path):
    """trainer_state.pt loads with weights_only=True; a checkpoint in the pre-0.2 format (numpy and
    Python RNG states, global torch RNG) still resumes."""
    import random

    import numpy as np

    cfg = small_config(tmp_path, max_steps=2, save_steps=1)
    make_trainer(parts, cfg).train()
    path = os.path.join(cfg.output_dir, "checkpoint-1")
    state = torch.load(os.path.join(path, ckpt.STATE_FILE), weights_only=True)
    assert set(state["rng"]) >= {"generator", "torch"}
    # rewrite it as the previous release wrote it
    state["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": state["rng"]["torch"]}
    torch.save(state, os.path.join(path, ckpt.STATE_FILE))
    with pytest.raises(Exception):
        torch.load(os.path.join(path, ckpt.STATE_FILE), weights_only=True)  # numpy inside: not plain
    resumed = make_trainer(parts, cfg.replace(resume_from_checkpoint=path, output_dir=str(tmp_path / "r")))
    resumed.load_checkpoint(path)
    assert resumed.global_step == 1


# ----------------------------------------------------------------------------- rewards
def test_reward_function_error_names_function_and_sample(parts, tmp_path):
    def picky_reward(prompts, completions, completion_ids, **kw):
        for p in prompts:
            if p == "7+3=":
                raise ValueError("cannot score this one")
        return [0.0] * len(prompts)

    cfg = small_config(tmp_path, max_steps=30, save_steps=1, per_device_train_batch_size=16,
                       num_generations=4, shuffle_dataset=False)
    with pytest.raises(RewardFunctionError) as info:
        make_trainer(parts, cfg, reward_funcs=[picky_reward]).train()
    msg = str(info.value)
    assert "picky_reward" in msg and "7+3=" in msg and "dataset index 73" in msg
    assert "cannot score this one" in msg
    # 4 prompts per step, in order: "7+3=" (index 73) comes at step 19; checkpoint 18 is intact
    latest = ckpt.resolve_checkpoint("latest", cfg.output_dir)
    assert latest.endswith("checkpoint-18")
    assert ckpt.load_state(latest)["step"] == 18
    assert not os.path.exists(os.path.join(cfg.output_dir, "checkpoint-19"))


def test_trl_signature_extra_columns_and_none(parts, tmp_path):
    data = [dict(row, difficulty=i % 3, source=f"s{i}") for i, row in enumerate(parts["train_dataset"])]
    calls = []

    def spy_reward(prompts, completions, completion_ids, answer, difficulty, source, **kw):
        calls.append(len(prompts))
        assert len(completions) == len(completion_ids) == len(answer) == len(difficulty) == len(source)
        for p, a, ids, c in zip(prompts, answer, completion_ids, completions):
            assert str(eval(p[:-1])) == a  # columns stay aligned with their prompt
            assert isinstance(c, str) and all(isinstance(t, int) for t in ids)
        # no reward for the easy rows
        return [None if d == 0 else float(len(c)) for d, c in zip(difficulty, completions)]

    def none_reward(prompts, completions, completion_ids, **kw):
        return [None] * len(prompts)

    cfg = small_config(tmp_path, max_steps=2, reward_weights=[1.0, 0.5, 2.0])
    trainer = make_trainer(parts, cfg, reward_funcs=[accuracy_reward, spy_reward, none_reward], data=data)
    history = trainer.train()
    assert calls == [32, 32]
    h = history[-1]
    assert math.isnan(h["rewards/none_reward/mean"]) and not math.isnan(h["reward"])
    assert h["rewards/spy_reward/mean"] > 0

    # None everywhere -> NaN reward -> advantage 0; partial None -> weighted sum of the rest
    batch = prepare(trainer, score(trainer, produce(trainer, [0, 1])))
    nan_rows = torch.isnan(batch.rewards)
    assert torch.isnan(batch.rewards_per_func[:, 2]).all()
    assert (batch.advantages[nan_rows] == 0).all()
    assert torch.isfinite(batch.advantages).all()


def test_reward_weights_sum(parts, tmp_path):
    ones = lambda prompts, completions, completion_ids, **kw: [1.0] * len(prompts)  # noqa: E731
    twos = lambda prompts, completions, completion_ids, **kw: [2.0] * len(prompts)  # noqa: E731
    cfg = small_config(tmp_path, reward_weights=[0.5, 3.0])
    trainer = make_trainer(parts, cfg, reward_funcs=[ones, twos])
    batch = score(trainer, produce(trainer, [0]))
    assert torch.allclose(batch.rewards, torch.full((4,), 6.5))


def test_bad_reward_return_is_named(parts, tmp_path):
    def short_reward(prompts, completions, completion_ids, **kw):
        return [1.0]

    with pytest.raises(RewardFunctionError, match="short_reward.*returned 1 values for 32"):
        make_trainer(parts, small_config(tmp_path), reward_funcs=[short_reward]).train()


def test_reward_model(parts, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = parts["tokenizer"]
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id))
    cfg = small_config(tmp_path, max_steps=2)
    trainer = make_trainer(parts, cfg, reward_funcs=[(rm, tok), accuracy_reward])
    history = trainer.train()
    name = trainer.reward_names[0]
    assert name.startswith("reward_model")
    assert all(math.isfinite(h[f"rewards/{name}/mean"]) for h in history)
    assert history[0][f"rewards/{name}/std"] > 0  # different completions get different scores


def test_chat_prompts_and_model_from_path(parts, tmp_path):
    path = tmp_path / "policy"
    parts["model"].save_pretrained(path)
    parts["tokenizer"].save_pretrained(path)
    data = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in parts["train_dataset"][:20]]
    seen = []

    def chat_reward(prompts, completions, completion_ids, **kw):
        seen.append((prompts[0], completions[0]))
        return accuracy_reward(prompts, completions, **kw)

    trainer = GRPOTrainer(str(path), [chat_reward], data,
                          config=small_config(tmp_path, max_steps=1, max_prompt_length=64))
    trainer.train()
    prompt, completion = seen[0]
    assert prompt[0]["role"] == "user" and completion[0]["role"] == "assistant"
    batch = produce(trainer, [0])
    text = parts["tokenizer"].decode(batch.prompt_ids[0], skip_special_tokens=True)
    assert text.startswith("user: ") and text.endswith("assistant: ")


def test_ref_model_only_with_beta(parts, tmp_path):
    assert make_trainer(parts, small_config(tmp_path)).ref_model is None
    t = make_trainer(parts, small_config(tmp_path, beta=0.1, max_steps=2, learning_rate=2e-3))
    assert t.ref_model is not None and not any(p.requires_grad for p in t.ref_model.parameters())
    history = t.train()
    assert abs(history[0]["kl"]) < 1e-6  # policy == reference during the first update
    assert history[-1]["kl"] > 0


def test_peft_adapter_reference(parts, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    t = make_trainer(parts, small_config(tmp_path, beta=0.1, max_steps=2, save_steps=1), peft_config=lora)
    assert t.ref_model is None and hasattr(t.model, "peft_config")
    t.train()
    resumed = make_trainer(parts, small_config(tmp_path, beta=0.1, max_steps=3, resume_from_checkpoint="latest"),
                           peft_config=lora)
    resumed.train()
    assert resumed.global_step == 3


# ----------------------------------------------------------------------------- config
def test_config_validation_names_fields():
    with pytest.raises(ConfigError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ConfigError, match="num_generations"):
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(ConfigError, match="max_steps"):
        GRPOConfig(max_steps="many")
    with pytest.raises(ConfigError, match="lerning_rate.*did you mean 'learning_rate'"):
        GRPOConfig.from_dict({"lerning_rate": 1e-3})
    with pytest.raises(ConfigError, match="delta"):
        GRPOConfig(delta=1.1)
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(learning_rate="1e-5").learning_rate == 1e-5  # YAML reads 1e-5 as a string


def test_every_field_has_a_docstring_line():
    docs = GRPOConfig.field_help()
    missing = [f for f in GRPOConfig.field_names() if not docs.get(f)]
    assert not missing, missing


def test_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 3e-6\nmax_steps: 7\nreward_weights: [1, 0.5]\nloss_type: bnpo\nalgorithm: grpo\n")
    cfg = GRPOConfig.from_yaml(str(p), max_steps=9)
    assert cfg.learning_rate == 3e-6 and cfg.max_steps == 9 and cfg.reward_weights == [1.0, 0.5]
    p.write_text("num_generation: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*num_generation.*did you mean 'num_generations'"):
        GRPOConfig.from_yaml(str(p))
    p.write_text("temperature: hot\n")
    with pytest.raises(ConfigError, match="temperature"):
        GRPOConfig.from_yaml(str(p))
