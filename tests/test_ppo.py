"""PPOTrainer on the built-in task (tiny Llama, char tokenizer): GAE, value loss, KL control, runs."""
import copy
import math
import os

import pytest
import torch

from grpo_fast.rl import AdaptiveKLController, masked_whiten, token_rewards
from grpo_fast import PPOConfig, PPOTrainer
from grpo_fast.rewards import accuracy_reward
from grpo_fast import ConfigError
from grpo_fast.train import checkpoint as ckpt
from grpo_fast.model.critic import ValueModel
from steps import prepared_batch, update

TIMING = {"tokens_per_s", "step_time", "generation_time"}


@pytest.fixture
def parts(demo_parts):
    return demo_parts


def small_config(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path / "run"), learning_rate=5e-4, lr_scheduler_type="constant",
                  max_steps=2, per_device_train_batch_size=16, num_mini_batches=2, ppo_epochs=2,
                  max_prompt_length=16, max_completion_length=4, logging_steps=1, save_steps=0, seed=0,
                  disable_tqdm=True, plot=False, save_final_model=False, report_to="none")
    values.update(kw)
    return PPOConfig(**values)


def make_trainer(parts, config, **kw):
    return PPOTrainer(copy.deepcopy(parts["model"]), [accuracy_reward], parts["train_dataset"], config=config,
                      tokenizer=parts["tokenizer"], **kw)


def rollout(trainer, n=16):
    return prepared_batch(trainer, list(range(n)))


def gae_loop(rewards, values, mask, gamma, lam):
    """Textbook GAE over each sequence's masked-in tokens, in plain Python floats."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        last_gae, next_value = 0.0, 0.0
        for t in reversed(range(T)):
            if not mask[b][t]:
                continue
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last_gae = delta + gamma * lam * last_gae
            adv[b][t], ret[b][t] = last_gae, last_gae + values[b][t]
            next_value = values[b][t]
    return torch.tensor(adv), torch.tensor(ret)


# ----------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("share", [False, True])
def test_gae_through_the_trainer_matches_a_python_loop(parts, tmp_path, share):
    cfg = small_config(tmp_path, beta=0.1, gamma=0.9, lam=0.8, whiten_advantages=False, share_policy_trunk=share)
    trainer = make_trainer(parts, cfg)
    if share:
        with torch.no_grad():  # a non-zero head, so the values are not all 0
            trainer.critic.head.summary.weight.normal_(0, 0.3)
    else:
        with torch.no_grad():
            trainer.critic.model.head.summary.weight.normal_(0, 0.3)
    batch = rollout(trainer)
    mask = batch.loss_mask.bool()
    values = batch.extras["values"]
    assert values[mask].abs().sum() > 0
    # the token rewards: -beta * (logp - ref) everywhere, plus the score on the last token
    kl = batch.old_logps - batch.ref_logps
    expected_r = torch.zeros_like(kl)
    for b in range(len(batch)):
        n = int(mask[b].sum())
        for t in range(n):
            expected_r[b, t] = -0.1 * kl[b, t] + (float(batch.rewards[b]) if t == n - 1 else 0.0)
    torch.testing.assert_close(batch.extras["token_rewards"], expected_r, atol=1e-6, rtol=1e-6)
    adv, ret = gae_loop(expected_r.tolist(), values.tolist(), mask.tolist(), 0.9, 0.8)
    torch.testing.assert_close(batch.advantages, adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.extras["returns"], ret, atol=1e-5, rtol=1e-5)
    # the policy starts equal to the reference: the rollout KL is (numerically) 0
    assert abs(batch.extras["metrics"]["kl"]) < 1e-5


def test_whitening_and_token_rewards():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g) * 3 + 2
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    w = masked_whiten(x, mask)
    sel = w[mask.bool()]
    assert abs(float(sel.mean())) < 1e-5 and abs(float(sel.std()) - 1) < 1e-4
    assert (w[~mask.bool()] == 0).all()
    r = token_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), mask)
    assert r[1, 3] == 2.0 and r[3, 0] == 4.0 and r[0, 6] == 1.0 and float(r.sum()) == 15.0


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, n=100)   # error clipped at +0.2: beta *= 1 + 0.2 * 100 / 1000
    assert math.isclose(ctl.value, 0.1 * 1.02)
    ctl.update(3.0, n=100)    # error -0.5 clipped at -0.2
    assert math.isclose(ctl.value, 0.1 * 1.02 * 0.98)
    ctl.update(6.0, n=100)    # on target: unchanged
    assert math.isclose(ctl.value, 0.1 * 1.02 * 0.98)


def test_clipped_value_loss_formula(parts, tmp_path):
    trainer = make_trainer(parts, small_config(tmp_path, cliprange_value=0.2))
    new = torch.tensor([[1.0, 0.0, 0.5]])
    old = torch.tensor([[0.5, 0.1, 0.5]])
    ret = torch.tensor([[2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, n_clipped = trainer.algorithm.value_loss(new, old, ret, mask, denom=2.0)
    # token 0: unclipped (1-2)^2 = 1, clipped 0.7 -> (0.7-2)^2 = 1.69 (larger); token 1: |0-0.1| < 0.2 -> 1
    assert math.isclose(float(loss), 0.5 * (1.69 + 1.0) / 2.0, rel_tol=1e-6)
    assert n_clipped == 1.0


# ----------------------------------------------------------------------------- the update
@pytest.mark.parametrize("share", [False, True])
def test_value_loss_falls_on_a_fixed_batch(parts, tmp_path, share):
    cfg = small_config(tmp_path, cliprange_value=None, vf_coef=1.0, learning_rate=2e-3, ppo_epochs=1,
                       num_mini_batches=1, per_device_train_batch_size=32, share_policy_trunk=share, beta=0.0)
    trainer = make_trainer(parts, cfg)
    batch = rollout(trainer, 32)
    returns, mask = batch.extras["returns"], batch.loss_mask.float()

    def mse():
        with torch.no_grad():
            _, v = trainer.algorithm.forward(batch, slice(None))
        return float((((v - returns) ** 2) * mask).sum() / mask.sum())

    before = mse()
    losses = [update(trainer, batch)["value_loss"] for _ in range(16)]
    after = mse()
    # the returns are noisy, and a shared trunk also moves with the policy term: part of the error stays
    assert after < 0.85 * before, (before, after, losses)
    assert losses[-1] < losses[0], losses


def test_metrics_and_kl_in_loss(parts, tmp_path):
    cfg = small_config(tmp_path, beta=0.1, kl_penalty="loss", clip_ratio_c=3.0, entropy_coef=0.01)
    history = make_trainer(parts, cfg).train()
    expected = {"reward", "reward_std", "approx_kl", "clip_fraction", "clip_ratio_low", "clip_ratio_high",
                "value_loss", "pg_loss", "explained_variance", "return_mean", "value_mean", "kl", "kl_coef",
                "kl_loss", "entropy", "grad_norm", "loss", "completion_length", "tokens_per_s",
                "value_clip_fraction", "learning_rate"}
    assert expected <= set(history[-1]), expected - set(history[-1])
    h = history[-1]
    assert h["approx_kl"] >= 0 and 0 <= h["clip_fraction"] <= 1 and h["kl_loss"] >= 0
    assert "non_score_reward" not in h  # the KL went into the loss, not the reward
    assert history[0]["value_mean"] == 0.0  # fresh zero head


def test_adaptive_kl_moves_beta_and_resumes(parts, tmp_path):
    cfg = small_config(tmp_path, beta=0.2, adaptive_kl=True, target_kl=1e-6, kl_horizon=100, max_steps=3,
                       save_steps=2)
    trainer = make_trainer(parts, cfg)
    history = trainer.train()
    assert history[0]["kl_coef"] == 0.2
    assert trainer.kl_coef > 0.2  # the KL is above the tiny target: beta rises
    state = ckpt.load_state(ckpt.list_checkpoints(cfg.output_dir)[0])
    assert state["extra"]["kl_coef"] == history[2]["kl_coef"]


def test_config_validation():
    with pytest.raises(ConfigError, match="kl_penalty"):
        PPOConfig(kl_penalty="both")
    with pytest.raises(ConfigError, match="num_generations"):
        PPOConfig(per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(ConfigError, match="share_policy_trunk"):
        PPOConfig(share_policy_trunk=True, value_model="/x")
    with pytest.raises(ConfigError, match="ppo_epochs"):
        PPOConfig(ppo_epochs=0)
    docs = PPOConfig.field_help()
    assert not [f for f in PPOConfig.field_names() if not docs.get(f)]


# ----------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_ppo_learns_addition(parts, tmp_path):
    cfg = small_config(tmp_path, max_steps=20, per_device_train_batch_size=64, num_mini_batches=2, ppo_epochs=4)
    history = make_trainer(parts, cfg).train()
    rewards = [h["reward"] for h in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5  # seed 0: about 0.26 -> 0.45
    assert first < 0.35, rewards
    assert last > first + 0.1, (first, last, rewards)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_is_exact_and_critic_is_saved(parts, tmp_path):
    common = dict(max_steps=3, save_steps=2, beta=0.05, lr_scheduler_type="cosine", save_final_model=True)
    full = make_trainer(parts, small_config(tmp_path / "a", **common))
    full_hist = full.train()

    def crash_after_2(trainer, metrics):
        if metrics["step"] == 2:
            raise KeyboardInterrupt("simulated kill")

    cfg_b = small_config(tmp_path / "b", **common)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(parts, cfg_b, callbacks=[crash_after_2]).train()
    resumed = make_trainer(parts, cfg_b.replace(resume_from_checkpoint="latest"))
    assert _strip(resumed.train()) == _strip(full_hist)
    assert resumed.global_step == 3
    for a, b in zip(full.critic.model.parameters(), resumed.critic.model.parameters()):
        assert torch.equal(a, b)
    # the final critic loads back with the same weights
    critic = ValueModel.from_pretrained(os.path.join(cfg_b.output_dir, "final", "value_model"))
    for a, b in zip(resumed.critic.model.state_dict().values(), critic.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_runs_ppo_on_the_demo(tmp_path, capsys):
    from grpo_fast import cli

    rc = cli.main(["train", "--algorithm", "ppo", "--max_steps", "2", "--output_dir", str(tmp_path / "cli"),
                   "--per_device_train_batch_size", "32", "--ppo_epochs", "1", "--disable_tqdm",
                   "--report_to", "none", "--plot", "false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(ppo)" in out and "mean reward" in out
    assert ckpt.list_checkpoints(str(tmp_path / "cli"))[-1].endswith("checkpoint-2")
    assert os.path.isdir(tmp_path / "cli" / "final" / "value_model")


@pytest.mark.parametrize("share", [False, True])
def test_peft_policy(parts, tmp_path, share):
    """LoRA policy: the reference is the base with the adapter off; the base weights never move."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    cfg = small_config(tmp_path, beta=0.1, share_policy_trunk=share, save_final_model=True)
    trainer = make_trainer(parts, cfg, peft_config=lora)
    assert trainer.ref_model is None and hasattr(trainer.model, "peft_config")
    frozen = {n: p.clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    history = trainer.train()
    assert abs(history[0]["kl"]) < 1e-5 and history[-1]["kl"] != 0.0  # adapter starts at zero, then moves
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    final = os.path.join(cfg.output_dir, "final")
    assert os.path.isfile(os.path.join(final, "value_head.safetensors" if share else "value_model/config.json"))
