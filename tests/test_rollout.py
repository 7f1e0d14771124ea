"""The rollout data model, the engine interface and the registries (engines, rewards, estimators).

The data model is what multi-turn, padding-free and asynchronous rollouts build on: per-token
sampled / loss masks apart from the attention layout, NaN engine log-probs where the policy did not
sample, the reward at the last trained token, and one rule for samples without a reward."""
import copy
import math

import pytest
import torch

from grpo_fast import ConfigError, GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, TRPOConfig, TRPOTrainer
from grpo_fast.rewards import REWARDS, accuracy_reward, register_reward, resolve_reward
from grpo_fast.rl import ESTIMATORS, group_advantages, register_estimator, token_rewards
from grpo_fast.rollout import (ENGINES, EngineSpec, Generation, HFEngine, RolloutEngine, Sample, SamplingSettings,
                               build_engine, collate, concat_rollouts, engine_name)
from grpo_fast.train.advantages import engine_correction
from steps import next_batch, prepare, produce, update

NAN = float("nan")


def small(tmp_path, cls=GRPOConfig, **kw):
    values = dict(output_dir=str(tmp_path / "run"), learning_rate=5e-4, lr_scheduler_type="constant", max_steps=1,
                  per_device_train_batch_size=16, max_prompt_length=16, max_completion_length=4, save_steps=0,
                  seed=0, disable_tqdm=True, plot=False, save_final_model=False, report_to="none")
    if cls is not PPOConfig:
        values["num_generations"] = 4
    values.update(kw)
    return cls(**values)


def make(parts, cfg, cls=GRPOTrainer, rewards=None, **kw):
    return cls(copy.deepcopy(parts["model"]), rewards or [accuracy_reward], parts["train_dataset"], config=cfg,
               tokenizer=parts["tokenizer"], **kw)


# ----------------------------------------------------------------------------- the data model
def _two_turn_samples():
    """Two samples after a prompt: one sampled span; and sampled, tool output, sampled (a hole)."""
    one = Sample(prompt_ids=[5, 6], completion_ids=[10, 11, 2], sampled=[1, 1, 1], logprobs=[-0.1, -0.2, -0.3])
    two = Sample(prompt_ids=[7], completion_ids=[12, 13, 14, 15, 2], sampled=[1, 0, 0, 1, 1],
                 logprobs=[-0.4, NAN, NAN, -0.5, -0.6], finish_reason="length")
    return [one, two]


def test_collate_keeps_the_masks_apart():
    b = collate(_two_turn_samples(), prompts=["p", "q"], dataset_index=[0, 1], columns={"x": [1, 2]}, group_size=1,
                pad_token_id=0, device="cpu")
    assert b.prompt_ids.tolist() == [[5, 6], [0, 7]] and b.prompt_attention.tolist() == [[1, 1], [0, 1]]
    assert b.completion_ids.tolist() == [[10, 11, 2, 0, 0], [12, 13, 14, 15, 2]]
    assert b.completion_attention.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]      # the layout
    assert b.sampled_mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 1, 1]]              # what the policy sampled
    lp = b.sampling_logps
    assert torch.isnan(lp[0, 3:]).all() and torch.isnan(lp[1, 1:3]).all() and float(lp[1, 3]) == pytest.approx(-0.5)
    assert b.truncated.tolist() == [False, True] and b.group_ids.tolist() == [0, 1]


def test_loss_mask_rule_and_the_last_trained_token():
    b = collate(_two_turn_samples(), prompts=["p", "q"], dataset_index=[0, 1], columns={}, group_size=1,
                pad_token_id=0, device="cpu")
    scored = b.with_fields(rewards=torch.tensor([1.0, 2.0]), rewards_per_func=torch.tensor([[1.0], [2.0]]))
    m = scored.with_loss_mask()
    assert torch.equal(m.loss_mask, b.sampled_mask) and m.last_sampled().tolist() == [2, 4]
    # no reward: out of the loss (and so of the KL, entropy and normalisers); truncated when asked
    assert scored.with_fields().with_loss_mask(True).loss_mask[1].sum() == 0
    nan = b.with_fields(rewards=torch.tensor([NAN, 2.0]), rewards_per_func=torch.tensor([[NAN], [2.0]]))
    assert nan.with_loss_mask().loss_mask[0].sum() == 0 and nan.with_loss_mask().last_sampled().tolist() == [-1, 4]
    with pytest.raises(AttributeError, match="written once"):
        m.with_fields(loss_mask=m.loss_mask)
    # the score sits at the last trained token, whatever lies before it (tool tokens included)
    r = token_rewards(torch.tensor([1.0, 2.0]), m.loss_mask)
    assert r.tolist() == [[0, 0, 1.0, 0, 0], [0, 0, 0, 0, 2.0]]


def test_concat_pads_engine_logprobs_with_nan_and_keeps_groups_apart():
    a = collate(_two_turn_samples()[:1] * 2, prompts=["p"] * 2, dataset_index=[0, 0], columns={}, group_size=2,
                pad_token_id=0, device="cpu")
    b = collate(_two_turn_samples()[1:] * 2, prompts=["q"] * 2, dataset_index=[1, 1], columns={}, group_size=2,
                pad_token_id=0, device="cpu")
    c = concat_rollouts([a, b], 0)
    assert c.group_ids.tolist() == [0, 0, 1, 1]
    assert torch.isnan(c.sampling_logps[:2, 3:]).all() and c.sampled_mask[:2, 3:].sum() == 0


def test_importance_correction_covers_sampled_tokens_only():
    """NaN at the tokens the policy did not sample changes nothing: the weights are those of the
    sampled tokens alone, for every mode."""
    b = collate(_two_turn_samples(), prompts=["p", "q"], dataset_index=[0, 1], columns={}, group_size=1,
                pad_token_id=0, device="cpu")
    b = b.with_fields(rewards=torch.ones(2), rewards_per_func=torch.ones(2, 1)).with_loss_mask()
    trainer_lp = torch.full(b.completion_ids.shape, -0.25)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        cfg = GRPOConfig(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5)
        w, metrics = engine_correction(b, trainer_lp, cfg)
        assert torch.isfinite(w).all() and math.isfinite(metrics["rollout_logp_diff_max"])
        d = (trainer_lp - torch.nan_to_num(b.sampling_logps)) * b.sampled_mask
        expected = torch.exp(d.sum(-1, keepdim=True) if mode.startswith("sequence") else d)
        if mode.endswith("truncate"):
            expected = expected.clamp(0.5, 3.0)
        else:
            expected = expected.masked_fill((expected < 0.5) | (expected > 3.0), 0.0)
        torch.testing.assert_close(w, expected)


# ----------------------------------------------------------------------------- engines
def test_hf_engine_one_completion_per_prompt_and_stops(demo_parts):
    tok, model = demo_parts["tokenizer"], demo_parts["model"]
    engine = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, device="cpu",
                      tokenizer=tok)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("3+5=", "9+9=", "12+3=")]
    gen = engine.generate(prompts, SamplingSettings(max_tokens=4))
    assert len(gen.completion_ids) == 3 and set(gen.finish_reasons) <= {"stop", "length"}
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    torch.manual_seed(0)
    gen = engine.generate(prompts * 4, SamplingSettings(max_tokens=4, stop_token_ids=tuple(digits)))
    for ids, reason, why in zip(gen.completion_ids, gen.finish_reasons, gen.stop_reasons):
        if reason == "stop" and why is not None:   # a digit ended it: the ids end with that digit
            assert ids[-1] == why and why in digits and not any(t in digits for t in ids[:-1])
    assert any(r == "stop" and w in digits for r, w in zip(gen.finish_reasons, gen.stop_reasons))
    torch.manual_seed(0)
    gen = engine.generate(prompts * 8, SamplingSettings(max_tokens=4, temperature=1.5, stop=("1",)))
    hits = 0
    for ids, reason, why in zip(gen.completion_ids, gen.finish_reasons, gen.stop_reasons):
        text = tok.decode(ids)
        if why == "1":
            hits += 1
            assert reason == "stop" and text.endswith("1") and "1" not in text[:-1]
        else:
            assert "1" not in text
    assert hits > 0


def test_producer_expands_groups_once(demo_parts, tmp_path):
    tr = make(demo_parts, small(tmp_path))
    seen = []

    class Recording(RolloutEngine):
        def generate(self, prompt_ids, settings):
            seen.append([list(p) for p in prompt_ids])
            return Generation([[2]] * len(prompt_ids), ["stop"] * len(prompt_ids))

    tr.producer.engine = Recording()
    b = produce(tr, [3, 7])
    assert len(seen[0]) == 8 and seen[0][0] == seen[0][3] != seen[0][4]   # each prompt 4 times, in order
    assert b.group_ids.tolist() == [0] * 4 + [1] * 4 and b.dataset_index == [3] * 4 + [7] * 4
    assert b.columns["answer"] == [demo_parts["train_dataset"][3]["answer"]] * 4 + \
        [demo_parts["train_dataset"][7]["answer"]] * 4


def test_engines_by_name(demo_parts, tmp_path):
    assert {"hf", "vllm-colocate", "vllm-server"} <= set(ENGINES)
    assert engine_name(GRPOConfig()) == "hf"
    assert engine_name(GRPOConfig(use_vllm=True, vllm_mode="server")) == "vllm-server"
    with pytest.raises(ConfigError, match="ask for different engines"):
        engine_name(GRPOConfig(use_vllm=True, engine="hf"))
    made = []

    class Echo(RolloutEngine):
        name = "echo"

        def generate(self, prompt_ids, settings):
            return Generation([list(p[-1:]) for p in prompt_ids], ["length"] * len(prompt_ids))

    ENGINES["echo-test"] = lambda spec: made.append(spec) or Echo()
    try:
        tr = make(demo_parts, small(tmp_path, engine="echo-test"))
        assert isinstance(tr.engine, Echo) and made[0].config is tr.config and made[0].model is tr.model
        assert produce(tr, [0]).completion_ids.shape == (4, 1)
    finally:
        del ENGINES["echo-test"]
    spec = EngineSpec(demo_parts["model"], demo_parts["tokenizer"], GRPOConfig(engine="nope"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="engine='nope'.*module:factory"):
        build_engine(spec)
    spec.config = GRPOConfig(engine="tests_engine_factory:build")
    with pytest.raises(ConfigError, match="cannot import"):
        build_engine(spec)


def test_rewards_and_estimators_by_name(demo_parts, tmp_path):
    assert resolve_reward("accuracy") is accuracy_reward and {"format", "boxed_format"} <= set(REWARDS)
    register_reward("always_one_test", lambda prompts, completions, **kw: [1.0] * len(prompts))

    @register_estimator("median_test")
    def median(r, valid):     # a new estimator: one function
        med = torch.where(valid, r, float("nan")).nanmedian(1, keepdim=True).values
        return r - med

    try:
        r = torch.tensor([0.0, 1.0, 3.0, 1.0, 1.0, 1.0])
        adv = group_advantages(r, 3, estimator="median_test", scale="none")
        assert adv.tolist() == [-1.0, 0.0, 2.0, 0.0, 0.0, 0.0]      # the flat group gets 0
        cfg = small(tmp_path, advantage_estimator="median_test")
        tr = make(demo_parts, cfg, rewards=["always_one_test", "accuracy"])
        assert tr.reward_names == ["<lambda>", "accuracy_reward"]
        batch = prepare(tr, next_batch(tr))
        torch.testing.assert_close(batch.advantages, group_advantages(batch.rewards, 4, estimator="median_test",
                                                                      scale="group"))
    finally:
        del ESTIMATORS["median_test"], REWARDS["always_one_test"]
    with pytest.raises(ConfigError, match="advantage_estimator='nope'"):
        GRPOConfig(advantage_estimator="nope")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_builtin_estimators_in_torch_equal_the_core(estimator, scale):
    g = torch.Generator().manual_seed(3)
    r = torch.randint(0, 4, (60,), generator=g).float()
    r[torch.randperm(60, generator=g)[:9]] = NAN
    r[12:18] = 2.0
    core = group_advantages(r, 6, estimator=estimator, scale=scale)
    torch_ = group_advantages(r, 6, estimator=estimator, scale=scale, use_core=False)
    torch.testing.assert_close(core, torch_, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- the one rule for no reward
def _half_none(prompts, completions, completion_ids, **kw):
    """No reward for the first sample of each group of 4; the others are scored by correctness."""
    scores = accuracy_reward(prompts, completions, **kw)
    return [None if i % 4 == 0 else s for i, s in enumerate(scores)]


@pytest.mark.parametrize("cls,cfg_cls,kw", [(GRPOTrainer, GRPOConfig, dict(beta=0.1)),
                                            (PPOTrainer, PPOConfig, dict(beta=0.1, ppo_epochs=1)),
                                            (TRPOTrainer, TRPOConfig, dict())])
def test_samples_without_a_reward_are_out_of_every_loss(demo_parts, tmp_path, cls, cfg_cls, kw):
    tr = make(demo_parts, small(tmp_path, cfg_cls, **kw), cls, rewards=[_half_none])
    batch = next_batch(tr)
    none = torch.isnan(batch.rewards)
    assert none.any() and (batch.loss_mask[none] == 0).all() and (batch.loss_mask[~none].sum(1) > 0).all()
    assert torch.equal(batch.loss_mask[~none], batch.sampled_mask[~none])


def test_grpo_step_equals_the_step_without_the_unscored_samples(demo_parts, tmp_path):
    """dapo's normaliser, the KL and the entropy count only scored samples: the gradient of a step
    equals the gradient on the batch with the unscored samples removed."""
    cfg = small(tmp_path, beta=0.1, max_grad_norm=0.0, loss_type="dapo")
    a = make(demo_parts, cfg, rewards=[_half_none])
    b = make(demo_parts, cfg.replace(output_dir=str(tmp_path / "b")), rewards=[_half_none])
    batch = prepare(a, next_batch(a))
    keep = torch.nonzero(~torch.isnan(batch.rewards)).flatten().tolist()
    ma, mb = update(a, batch), update(b, batch.select(keep))
    ga = torch.cat([p.grad.flatten() for p in a.model.parameters() if p.grad is not None])
    gb = torch.cat([p.grad.flatten() for p in b.model.parameters() if p.grad is not None])
    assert ga.abs().max() > 0
    torch.testing.assert_close(ga, gb, atol=1e-6 * float(ga.abs().max()), rtol=1e-5)
    for key in ("kl", "entropy"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-7), key
