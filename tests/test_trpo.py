"""TRPOTrainer on the built-in task: the KL bound, exact rollback, Fisher products, LoRA, runs."""
import copy
import os

import pytest
import torch

from grpo_fast import demo
from grpo_fast.rl.natural_gradient import fisher_vector_product, flat_grad, get_flat, set_flat
from grpo_fast.rewards import accuracy_reward
from grpo_fast import ConfigError
from grpo_fast.train import checkpoint as ckpt
from grpo_fast import TRPOConfig, TRPOTrainer
from steps import prepared_batch

TIMING = {"tokens_per_s", "step_time", "generation_time"}


@pytest.fixture
def parts(demo_parts):
    return demo_parts


def small_config(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path / "run"),
                  max_steps=3, per_device_train_batch_size=32, num_generations=4, max_prompt_length=16,
                  max_completion_length=4, logging_steps=1, save_steps=0, seed=0, disable_tqdm=True,
                  plot=False, save_final_model=False, report_to="none")
    values.update(kw)
    return TRPOConfig(**values)


def make_trainer(parts, config, model=None, **kw):
    return TRPOTrainer(model if model is not None else copy.deepcopy(parts["model"]), [accuracy_reward],
                       parts["train_dataset"], config=config, tokenizer=parts["tokenizer"], **kw)


def kl_checked(trainer, log):
    """Wrap the update: after each step, recompute the KL to the rollout policy independently."""
    inner = trainer.algorithm.update

    def update(batch, step):
        metrics = inner(batch, step)
        with torch.no_grad():
            trainer.model.eval()
            old = batch.extras["old_log_softmax"]
            logits = trainer.policy.logits(trainer.model, batch)
            new = torch.log_softmax(logits.double() / trainer.config.temperature, -1)
            kl = (old.double().exp() * (old.double() - new)).sum(-1)
            m = batch.loss_mask.double()
            log.append((metrics, float((kl * m).sum() / m.sum())))
        return metrics

    trainer.algorithm.update = update


# ----------------------------------------------------------------------------- the constraint
@pytest.mark.parametrize("estimator", ["group", "gae"])
def test_accepted_steps_respect_the_kl_bound(parts, tmp_path, estimator):
    delta = 0.005
    cfg = small_config(tmp_path, max_kl=delta, advantage_estimator=estimator,
                       num_generations=4 if estimator == "group" else 1)
    trainer = make_trainer(parts, cfg)
    log = []
    kl_checked(trainer, log)
    history = trainer.train()
    assert len(log) == 3
    for metrics, kl in log:
        if metrics["step_accepted"]:
            assert kl <= delta * (1 + 1e-3) + 1e-7, (kl, delta)
            assert abs(kl - metrics["kl"]) <= 1e-4 * delta + 1e-7  # the reported KL is the real one
            assert metrics["surrogate_gain"] > 0 and 1 <= metrics["line_search_steps"] <= cfg.backtrack_iters
        else:
            assert kl == 0.0
    assert sum(m["step_accepted"] for m, _ in log) >= 2  # the demo's steps are normally accepted
    assert history[-1]["accepted_fraction"] == sum(m["step_accepted"] for m, _ in log) / 3
    if estimator == "gae":
        assert {"value_loss", "explained_variance", "return_mean", "value_mean"} <= set(history[-1])


def test_rejected_step_leaves_parameters_bit_identical(parts, tmp_path):
    # a gain 1e9 times the first-order prediction is never reached: every line-search try is undone
    cfg = small_config(tmp_path, accept_ratio=1e9, backtrack_iters=4, max_steps=1)
    trainer = make_trainer(parts, cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    tried = []
    real_kl = trainer.algorithm.mean_kl

    def spy(batch):
        out = real_kl(batch)
        if not torch.is_grad_enabled():  # a line-search evaluation, at moved parameters
            tried.append(float(out))
        return out

    trainer.algorithm.mean_kl = spy
    history = trainer.train()
    h = history[0]
    assert h["step_accepted"] == 0.0 and h["kl"] == 0.0 and h["line_search_steps"] == 4
    assert len(tried) == 4 and max(tried) > 0  # the parameters did move during the search
    after = trainer.model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_fisher_vector_product_through_the_trainer_kl(parts, tmp_path):
    """The trainer's KL function gives F v equal to central differences of its gradient (float64)."""
    tok = parts["tokenizer"]
    model = demo.build_model(tok, hidden_size=16, num_layers=1, seed=5).double()
    trainer = make_trainer(parts, small_config(tmp_path, per_device_train_batch_size=8, num_generations=4),
                           model=model)
    batch = prepared_batch(trainer, [3, 17])
    assert batch.extras["old_log_softmax"].dtype == torch.float64
    trainer.model.eval()
    params = trainer.algorithm.trainable_parameters()
    kl_fn = lambda: trainer.algorithm.mean_kl(batch)  # noqa: E731
    assert abs(float(kl_fn().detach())) < 1e-12  # KL(old || old) = 0 at the rollout parameters
    theta = get_flat(params)
    g = torch.Generator().manual_seed(0)
    # move away from θ_old a little, so the check is not only at the KL's minimum
    set_flat(params, theta + 0.01 * torch.randn(theta.shape, generator=g, dtype=theta.dtype))
    here = get_flat(params)
    v = torch.randn(theta.shape, generator=g, dtype=theta.dtype)
    fv = fisher_vector_product(kl_fn, params, damping=0.0)(v)
    eps = 1e-4

    def grad_at(t):
        set_flat(params, t)
        return flat_grad(kl_fn(), params)

    fd = (grad_at(here + eps * v) - grad_at(here - eps * v)) / (2 * eps)
    set_flat(params, theta)
    # Llama's RMSNorm computes in float32 even in a float64 model: the differences carry float32
    # rounding, so compare norms (as tests/test_natural_gradient.py does)
    assert (fv - fd).norm() <= 1e-4 * fd.norm(), ((fv - fd).norm(), fd.norm())
    assert float(v.dot(fv)) > 0


def test_lora_parameters_only(parts, tmp_path):
    peft = pytest.importorskip("peft")
    tok = parts["tokenizer"]
    # a wider model than the demo's, with the LoRA adapter the only trainable part
    model = demo.build_model(tok, hidden_size=128, num_layers=2, seed=1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False)  # non-zero B: the adapter's gradient is not zero
    cfg = small_config(tmp_path, max_steps=2, max_kl=0.01, save_steps=1)
    trainer = make_trainer(parts, cfg, model=model, peft_config=lora)
    params = trainer.algorithm.trainable_parameters()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert params and all("lora_" in names[id(p)] for p in params)
    n_lora = sum(p.numel() for p in params)
    assert n_lora < 0.2 * sum(p.numel() for p in trainer.model.parameters())
    frozen = {n: p.clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    adapter = [p.clone() for p in params]
    log = []
    kl_checked(trainer, log)
    trainer.train()
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(m["step_accepted"] for m, _ in log)
    assert any(not torch.equal(a, p) for a, p in zip(adapter, params))
    for metrics, kl in log:
        assert kl <= cfg.max_kl * (1 + 1e-3) + 1e-7
    # resume from the adapter checkpoint
    again = make_trainer(parts, cfg.replace(max_steps=3, resume_from_checkpoint="latest"),
                         model=demo.build_model(tok, hidden_size=128, num_layers=2, seed=1), peft_config=lora)
    again.train()
    assert again.global_step == 3


def test_config_validation():
    with pytest.raises(ConfigError, match="advantage_estimator"):
        TRPOConfig(advantage_estimator="rloo")
    with pytest.raises(ConfigError, match="num_generations"):
        TRPOConfig(num_generations=1)  # a group of one
    TRPOConfig(num_generations=1, advantage_estimator="gae")
    with pytest.raises(ConfigError, match="max_kl"):
        TRPOConfig(max_kl=0)
    with pytest.raises(ConfigError, match="backtrack_ratio"):
        TRPOConfig(backtrack_ratio=1.5)
    docs = TRPOConfig.field_help()
    assert not [f for f in TRPOConfig.field_names() if not docs.get(f)]


# ----------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_trpo_learns_addition(parts, tmp_path):
    cfg = small_config(tmp_path, max_steps=40, per_device_train_batch_size=128, num_generations=8, max_kl=0.01)
    history = make_trainer(parts, cfg).train()
    rewards = [h["reward"] for h in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10  # seed 0: about 0.25 -> 0.40
    assert first < 0.35, rewards
    assert last > first + 0.1, (first, last, rewards)
    assert history[-1]["accepted_fraction"] >= 0.8


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_is_exact_with_a_critic(parts, tmp_path):
    common = dict(max_steps=3, save_steps=2, advantage_estimator="gae", num_generations=1, save_final_model=True)
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
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.critic.model.parameters(), resumed.critic.model.parameters()):
        assert torch.equal(a, b)
    assert os.path.isfile(os.path.join(cfg_b.output_dir, "final", "value_model", "value_head.safetensors"))


def test_cli_runs_trpo_on_the_demo(tmp_path, capsys):
    from grpo_fast import cli

    rc = cli.main(["train", "--algorithm", "trpo", "--max_steps", "2", "--output_dir", str(tmp_path / "cli"),
                   "--per_device_train_batch_size", "32", "--disable_tqdm", "--report_to", "none",
                   "--plot", "false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(trpo)" in out and "mean reward" in out
    assert ckpt.list_checkpoints(str(tmp_path / "cli"))[-1].endswith("checkpoint-2")
    state = ckpt.load_state(ckpt.list_checkpoints(str(tmp_path / "cli"))[-1])
    assert state["algorithm"] == "trpo" and state["extra"]["steps_tried"] == 2
