"""Issue 14, trainer side: the new loss options reach policy_loss, TRL's adaptive entropy
coefficient, DAPO dynamic sampling, overlong shaping, evaluation during training, completion logs.

Short runs of the built-in task (tiny batches, a few steps, one thread).
"""
import copy
import dataclasses
import json
import math
import os

import pytest
import torch

from grpo_fast import cli
from grpo_fast.ops import policy_loss
from grpo_fast.rewards import accuracy_reward, soft_overlong_punishment
from grpo_fast import ConfigError, GRPOConfig, GRPOTrainer
from grpo_fast.rl import informative_groups
from grpo_fast.rollout import concat_rollouts
from grpo_fast.train.metrics import rollout_metrics
from grpo_fast.train.tracking import read_completions
from steps import next_batch, prepare, produce, score, update

_TIMING = {"tokens_per_s", "generation_time", "step_time"}


@pytest.fixture(scope="module")
def parts(demo_parts):
    return demo_parts


def config(tmp_path, name="run", **kw):
    values = dict(output_dir=str(tmp_path / name), learning_rate=5e-4, lr_scheduler_type="constant",
                  max_steps=3, per_device_train_batch_size=16, num_generations=4, max_prompt_length=16,
                  max_completion_length=4, logging_steps=1, save_steps=0, seed=0, disable_tqdm=True,
                  plot=False, save_final_model=False, report_to="none")
    values.update(kw)
    return GRPOConfig(**values)


def trainer_for(parts, cfg, reward_funcs=None, **kw):
    return GRPOTrainer(copy.deepcopy(parts["model"]), reward_funcs or [accuracy_reward], parts["train_dataset"],
                       config=cfg, tokenizer=parts["tokenizer"], **kw)


def training_metrics(history):
    return [{k: v for k, v in h.items() if k not in _TIMING and not k.startswith("eval_")}
            for h in history if "reward" in h]


# ----------------------------------------------------------------------------- config
def test_config_names_and_defaults_are_trls():
    trl = pytest.importorskip("trl")
    theirs = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for name in ("sapo_temperature_pos", "sapo_temperature_neg", "top_entropy_quantile", "use_bias_correction_kl",
                 "off_policy_mask_threshold", "use_adaptive_entropy", "entropy_target", "entropy_coef_delta",
                 "entropy_coef_min", "entropy_coef_max", "entropy_coef", "log_completions",
                 "num_completions_to_print", "num_generations_eval"):
        assert name in theirs, name
        assert ours[name] == theirs[name], (name, ours[name], theirs[name])
    assert set(GRPOConfig._CHOICES["loss_type"]) >= {"cispo", "sapo"}
    help_ = GRPOConfig.field_help()
    for name in ("top_entropy_quantile", "use_adaptive_entropy", "dynamic_sampling", "eval_strategy",
                 "log_completions", "num_generations_eval"):
        assert help_[name], name


@pytest.mark.parametrize("kw, field", [
    (dict(loss_type="cispo"), "epsilon_high"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(entropy_coef_min=0.5, entropy_coef_max=0.1), "entropy_coef_max"),
    (dict(dynamic_sampling_max_batches=-1), "dynamic_sampling_max_batches"),
    (dict(eval_strategy="epoch"), "eval_strategy"),
    (dict(num_generations_eval=0), "num_generations_eval"),
])
def test_config_refuses_bad_values_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        GRPOConfig(**kw)


def test_eval_strategy_needs_an_eval_dataset(parts, tmp_path):
    with pytest.raises(ConfigError, match="eval_dataset"):
        trainer_for(parts, config(tmp_path, eval_strategy="steps"))


# ----------------------------------------------------------------------------- options reach the loss
def _direct_loss(trainer, batch, **options):
    cfg = trainer.config
    with torch.no_grad():
        logits = trainer.policy.logits(trainer.model, batch)
        out = policy_loss(logits.float(), batch.completion_ids, batch.advantages, batch.loss_mask,
                          ref_logps=batch.ref_logps, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                          epsilon_low=cfg.epsilon, temperature=cfg.temperature,
                          max_completion_length=cfg.max_completion_length, **options)
    return float(out.loss)


WIRED = [
    dict(loss_type="cispo", epsilon_high=5.0),
    dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.3),
    dict(loss_type="dapo", top_entropy_quantile=0.4),
    dict(loss_type="grpo", entropy_coef=0.05),
    dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False),
]


@pytest.mark.parametrize("options", WIRED, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_config_fields_reach_policy_loss(parts, tmp_path, options):
    """One update's loss (one micro-batch) equals a direct policy_loss call with the same options
    on the same batch, and differs from the call without them (so the field had an effect)."""
    cfg = config(tmp_path, max_steps=1, **options)
    tr = trainer_for(parts, cfg)
    batch = prepare(tr, next_batch(tr))
    assert len(batch) == cfg.per_device_train_batch_size
    loss_opts = {k: v for k, v in options.items() if k != "beta"}
    n_items = float(batch.loss_mask.sum()) if options["loss_type"] in ("dapo", "cispo") else None
    expected = _direct_loss(tr, batch, num_items_in_batch=n_items, **loss_opts)
    plain = {"loss_type": options["loss_type"], "epsilon_high": options.get("epsilon_high")}
    if "use_bias_correction_kl" in options:
        # on-policy the ratio is 1: the bias correction changes the gradient only, so compare that option by
        # the KL term's gradient below instead of the value
        plain["use_bias_correction_kl"] = False
    default = _direct_loss(tr, batch, num_items_in_batch=n_items, **plain)
    metrics = update(tr, batch)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    if options["loss_type"] == "cispo":  # on-policy (ratio 1) cispo's value equals dapo's; its metric tells
        assert "cispo_clip_ratio" in metrics
    elif options.get("top_entropy_quantile", 1.0) < 1:
        assert 0 < metrics["entropy_masked_frac"] < 1
    if options["loss_type"] != "cispo" and "use_bias_correction_kl" not in options:
        assert abs(default - expected) > 1e-6, "the option did not change the loss: the test cannot tell"


@pytest.mark.parametrize("corrected", [True, False])
def test_use_bias_correction_kl_reaches_the_gradient(parts, tmp_path, corrected):
    """On-policy the ratio is 1, so the KL bias correction changes the gradient only (by KL * grad log pi):
    the update's gradient equals the direct call's with the same setting, not the other one."""
    cfg = config(tmp_path, max_steps=1, beta=0.5, use_bias_correction_kl=corrected, max_grad_norm=0.0)
    ref = copy.deepcopy(parts["model"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tr = trainer_for(parts, cfg, ref_model=ref)
    batch = prepare(tr, next_batch(tr))

    def direct_grad(flag):
        model = copy.deepcopy(tr.model)
        logits = tr.policy.logits(model, batch)
        out = policy_loss(logits, batch.completion_ids, batch.advantages, batch.loss_mask, ref_logps=batch.ref_logps,
                          loss_type=cfg.loss_type, beta=cfg.beta, epsilon_low=cfg.epsilon,
                          num_items_in_batch=float(batch.loss_mask.sum()), use_bias_correction_kl=flag)
        out.loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    same, other = direct_grad(corrected), direct_grad(not corrected)
    update(tr, batch)
    got = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
    scale = float(same.abs().max())
    assert float((same - other).abs().max()) > 1e-3 * scale, "the option does not change the gradient here"
    assert torch.allclose(got, same, atol=1e-4 * scale, rtol=0)


def test_ppo_keeps_the_deepseekmath_kl_term(parts, tmp_path, monkeypatch):
    """PPO's loss runs with use_bias_correction_kl=False (the ops default to TRL's ratio-weighted KL)."""
    from grpo_fast import PPOConfig, PPOTrainer
    from grpo_fast.model import Policy

    seen = []
    loss = Policy.loss
    monkeypatch.setattr(Policy, "loss", lambda self, *a, **k: seen.append(a[5]) or loss(self, *a, **k))
    cfg = PPOConfig(output_dir=str(tmp_path / "ppo"), max_steps=1, per_device_train_batch_size=8, ppo_epochs=1,
                    beta=0.1, kl_penalty="loss", max_completion_length=4, save_steps=0, disable_tqdm=True, plot=False,
                    save_final_model=False, report_to="none")
    PPOTrainer(copy.deepcopy(parts["model"]), [accuracy_reward], parts["train_dataset"], config=cfg,
               tokenizer=parts["tokenizer"]).train()
    assert seen and all(o.use_bias_correction_kl is False and o.beta == pytest.approx(0.1) for o in seen)


# ----------------------------------------------------------------------------- adaptive entropy
def test_adaptive_entropy_follows_trls_rule_and_resumes(parts, tmp_path):
    cfg = config(tmp_path, max_steps=4, use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=10.0,
                 entropy_coef_delta=0.004, entropy_coef_max=0.019, save_steps=2)
    tr = trainer_for(parts, cfg)
    history = tr.train()
    coefs = [h["entropy_coef"] for h in history]
    # step 1: last entropy is +inf > target -> 0; then H <= 10 every step: 0.014, 0.018, 0.019 (capped)
    assert coefs == pytest.approx([0.0, 0.014, 0.018, 0.019])
    assert tr.entropy_coef == pytest.approx(0.019)
    # quantile 1: the controller's H is the step's token-mean entropy
    assert tr.algorithm.entropy.last == pytest.approx(history[-1]["entropy"], rel=1e-6)
    state = tr.algorithm.state_dict()
    assert all(isinstance(v, float) for v in state.values()) and {"entropy_coef", "last_entropy"} <= set(state)
    resumed = trainer_for(parts, cfg.replace(resume_from_checkpoint=os.path.join(cfg.output_dir, "checkpoint-2"),
                                             output_dir=str(tmp_path / "resumed")))
    again = resumed.train()
    assert [h["entropy_coef"] for h in again] == pytest.approx(coefs)

    low = trainer_for(parts, config(tmp_path, "low", max_steps=3, use_adaptive_entropy=True, entropy_coef=0.01,
                                    entropy_target=0.0, entropy_coef_delta=0.004))
    low_hist = low.train()
    assert [h["entropy_coef"] for h in low_hist] == [0.0, 0.0, 0.0]   # H > target: never applied
    assert low.entropy_coef == pytest.approx(0.0)                          # 0.01 - 3 * 0.004, floored at 0


# ----------------------------------------------------------------------------- dynamic sampling
def test_informative_groups():
    r = torch.tensor([1., 1., 1., 0., 0., 0., float("nan"), 1., float("nan"), float("nan"), 1., 0.])
    assert informative_groups(r, 3).tolist() == [False, False, False, True]
    assert informative_groups(r, 2).tolist() == [False, True, False, False, False, True]


def test_concat_rollouts_pads_to_common_widths(parts, tmp_path):
    tr = trainer_for(parts, config(tmp_path))
    a = score(tr, produce(tr, [0, 1]))
    b = score(tr, produce(tr, [99, 5]))
    # make the widths differ: a longer prompt part
    b = dataclasses.replace(b, prompt_ids=torch.cat([torch.full((len(b), 2), 0), b.prompt_ids], 1),
                            prompt_attention=torch.cat([torch.zeros(len(b), 2, dtype=b.prompt_attention.dtype),
                                                        b.prompt_attention], 1))
    c = concat_rollouts([a, b], tr.tokenizer.pad_token_id)
    assert len(c) == len(a) + len(b) and c.prompts == a.prompts + b.prompts
    assert c.prompt_ids.shape[1] == max(a.prompt_ids.shape[1], b.prompt_ids.shape[1])
    assert c.completion_ids.shape[1] == max(a.completion_ids.shape[1], b.completion_ids.shape[1])
    for part, offset in ((a, 0), (b, len(a))):
        for i in range(len(part)):
            ids, mask, pos = part.model_inputs(slice(i, i + 1))
            cids, cmask, cpos = c.model_inputs(slice(offset + i, offset + i + 1))
            assert ids[mask.bool()].tolist() == cids[cmask.bool()].tolist()
            assert pos[mask.bool()].tolist() == cpos[cmask.bool()].tolist()
    assert torch.equal(c.rewards, torch.cat([a.rewards, b.rewards]))
    assert len(set(c.group_ids.tolist())) == len(c) // c.group_size        # the parts' groups stay apart
    sel = c.select([8, 9, 10, 11])
    assert sel.prompts == b.prompts[:4] and torch.equal(sel.completion_ids, c.completion_ids[8:12])
    with pytest.raises(ValueError, match="group sizes"):
        concat_rollouts([a, dataclasses.replace(b, group_size=2)], 0)


def test_dynamic_sampling_trains_only_informative_groups(parts, tmp_path):
    cfg = config(tmp_path, max_steps=3, dynamic_sampling=True, dynamic_sampling_max_batches=0)
    history = trainer_for(parts, cfg).train()
    assert len(history) == 3
    for h in history:
        assert h["frac_reward_zero_std"] == 0.0                # of the trained batch (post-filter)
        assert h["dynamic_sampling/groups_trained"] == cfg.prompts_per_step
        assert h["dynamic_sampling/rounds"] >= 1
        assert 0.0 <= h["dynamic_sampling/frac_groups_filtered"] < 1.0
        assert 0.0 <= h["dynamic_sampling/rewards_sampled/accuracy_reward/mean"] <= 1.0
        assert h["dynamic_sampling/reward_sampled"] == pytest.approx(
            h["dynamic_sampling/rewards_sampled/accuracy_reward/mean"])
    # this task at the start has many all-wrong groups: some step needed a second round
    assert any(h["dynamic_sampling/rounds"] > 1 for h in history)
    rows = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert all(r["frac_reward_zero_std"] == 0.0 for r in rows)


def test_dynamic_sampling_limit_trains_on_what_there_is(parts, tmp_path, capsys):
    def coin(prompts, completions, completion_ids=None, **kw):
        # informative at most for the prompts "a+b=" with a < 5: fewer groups than the step wants
        return [float(len(c) % 2) if int(p[0]) < 5 else 1.0 for p, c in zip(prompts, completions)]

    cfg = config(tmp_path, max_steps=3, dynamic_sampling=True, dynamic_sampling_max_batches=1)
    history = trainer_for(parts, cfg, reward_funcs=[coin]).train()
    trained = [h["dynamic_sampling/groups_trained"] for h in history]
    assert all(h["dynamic_sampling/rounds"] == 1 for h in history)
    assert any(0 < n < cfg.prompts_per_step for n in trained), trained   # the path under test was taken
    for h, n in zip(history, trained):
        assert n <= cfg.prompts_per_step
        if n > 0:
            assert h["frac_reward_zero_std"] == 0.0
    assert "dynamic sampling stopped after 1 round" in capsys.readouterr().out


# ----------------------------------------------------------------------------- overlong shaping
@pytest.mark.parametrize("L, cache", [(100, 20), (8, 3), (5, 0), (4, 4)])
def test_soft_overlong_punishment_matches_trl(L, cache):
    trl_rewards = pytest.importorskip("trl.rewards")
    theirs = trl_rewards.get_soft_overlong_punishment(max_completion_len=L, soft_punish_cache=cache)
    ours = soft_overlong_punishment(L, cache)
    ids = [[7] * n for n in range(0, L + 4)]
    assert ours(completion_ids=ids) == theirs(completion_ids=ids)
    assert ours(["p"] * len(ids), ["c"] * len(ids), ids) == theirs(completion_ids=ids)
    assert ours.__name__ == "soft_overlong_punishment"
    # float64 reference of DAPO's eq. 13
    for row, r in zip(ids, ours(completion_ids=ids)):
        n = len(row)
        ref = 0.0 if n <= L - cache else (-1.0 if n > L else ((L - cache) - n) / cache)
        assert r == pytest.approx(ref, abs=1e-12)


def test_soft_overlong_punishment_refuses_bad_arguments():
    with pytest.raises(ValueError, match="soft_punish_cache"):
        soft_overlong_punishment(10, 11)
    with pytest.raises(ValueError, match="max_completion_length"):
        soft_overlong_punishment(0, 0)


def test_mask_truncated_completions_through_the_trainer(parts, tmp_path):
    """Truncated completions get no gradient (the update's gradient equals the one on the batch
    without them), and the metrics still count them."""
    # 2 tokens: "8<eos>" ends, "12<eos>" is truncated
    cfg = config(tmp_path, max_steps=1, max_completion_length=2, mask_truncated_completions=True,
                 max_grad_norm=0.0, per_device_train_batch_size=32)
    tr = trainer_for(parts, cfg)
    batch = prepare(tr, next_batch(tr))
    trunc = batch.truncated.cpu()
    assert 0 < int(trunc.sum()) < len(batch), "need both truncated and finished completions"
    assert float(batch.loss_mask[trunc].sum()) == 0.0 and float(batch.loss_mask[~trunc].sum()) > 0
    assert torch.equal(batch.sampled_mask[trunc].sum(1) > 0, torch.ones(int(trunc.sum()), dtype=torch.bool))
    metrics = rollout_metrics(batch, tr.reward_names)
    assert metrics["clipped_ratio"] == pytest.approx(float(trunc.double().mean()))

    other = trainer_for(parts, cfg.replace(output_dir=str(tmp_path / "other")))
    keep = torch.nonzero(~trunc).flatten().tolist()
    update(tr, batch)
    update(other, batch.select(keep))
    g_all = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
    g_kept = torch.cat([p.grad.flatten() for p in other.model.parameters() if p.grad is not None])
    assert g_all.abs().max() > 0
    assert torch.allclose(g_all, g_kept, atol=1e-5 * float(g_all.abs().max()), rtol=0)


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_keeps_training_identical_and_logs_eval_metrics(parts, tmp_path):
    held = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6))]
    plain = trainer_for(parts, config(tmp_path, "plain")).train()
    cfg = config(tmp_path, "eval", eval_strategy="steps", eval_steps=1, eval_do_sample=True,
                 num_generations_eval=3, per_device_eval_batch_size=6, plot=True)
    tr = trainer_for(parts, cfg, eval_dataset=held)
    history = tr.train()
    assert training_metrics(history) == training_metrics(plain)
    evals = [h for h in history if "eval_reward" in h]
    assert [h["step"] for h in evals] == [0, 1, 2, 3]
    for h in evals:
        for key in ("eval_reward", "eval_rewards/accuracy_reward/mean", "eval_pass@3", "eval_completion_length"):
            assert key in h and math.isfinite(h[key]), key
        assert h["eval_pass@3"] >= h["eval_reward"] - 1e-12
    rows = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert sum("eval_reward" in r for r in rows) == 4
    assert os.path.isfile(os.path.join(cfg.output_dir, "plots", "eval_reward.png"))

    greedy = trainer_for(parts, config(tmp_path, "greedy", max_steps=1, eval_strategy="steps"), eval_dataset=held)
    g1, g2 = greedy.evaluate(), greedy.evaluate()
    assert g1 == g2 and "eval_pass@1" not in g1                       # greedy: one completion, deterministic
    assert g1["eval_reward"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_demo_holds_out_pairs():
    from grpo_fast import demo

    train, held = demo.split_holdout(demo.addition_dataset())
    assert len(train) == 80 and len(held) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    d = demo.demo_config_defaults()
    assert d["eval_strategy"] == "steps" and d["eval_steps"] > 0


# ----------------------------------------------------------------------------- completion logs
def test_completion_log_resume_and_show(parts, tmp_path, capsys):
    cfg = config(tmp_path, max_steps=3, log_completions=True, num_completions_to_print=3, save_steps=1)
    tr = trainer_for(parts, cfg)
    tr.train()
    out = capsys.readouterr().out
    assert "advantage" in out and "accuracy_reward" in out                     # the printed table
    rows = read_completions(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    for r in rows:
        assert set(r) == {"step", "prompt", "completion", "rewards", "reward", "advantage"}
        assert r["prompt"].endswith("=") and set(r["rewards"]) == {"accuracy_reward"}
        assert r["reward"] == r["rewards"]["accuracy_reward"]
    # resume from step 1: the rows of steps 2 and 3 are dropped, then written again
    first = rows
    resumed = trainer_for(parts, cfg.replace(resume_from_checkpoint=os.path.join(cfg.output_dir, "checkpoint-1")))
    resumed.train()
    rows = read_completions(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert rows == first                                                      # resume is exact

    capsys.readouterr()
    assert cli.main(["show", cfg.output_dir, "--step", "2"]) == 0
    shown = capsys.readouterr().out
    assert all(r["prompt"] in shown for r in rows if r["step"] == 2)
    assert cli.main(["show", cfg.output_dir]) == 0
    last = capsys.readouterr().out
    assert last.splitlines()[2].startswith("3 ")                             # default: the last step
    assert cli.main(["show", cfg.output_dir, "--step", "9"]) == 2
    assert "logged steps: 1, 2, 3" in capsys.readouterr().err
    assert cli.main(["show", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------- dynamic sampling under torchrun
def parity_reward(prompts, completions, completion_ids=None, **kw):
    """Informative only for prompts whose first digit is even (so the ranks' counts differ)."""
    return [float(len(c) % 2) if int(p[0]) % 2 == 0 else 0.0 for p, c in zip(prompts, completions)]


def _ds_worker(out):
    import torch.distributed as dist

    from grpo_fast import demo

    torch.set_num_threads(1)
    tok = demo.build_tokenizer()
    model = demo.build_model(tok, seed=0)
    sizes = []

    from grpo_fast.algorithms.grpo import GRPO

    class RecordingGRPO(GRPO):
        def update(self, batch, step):
            sizes.append(len(batch))
            return super().update(batch, step)

    class Recording(GRPOTrainer):
        algorithm_class = RecordingGRPO

    cfg = GRPOConfig(output_dir=os.path.join(out, "run"), learning_rate=1e-3, lr_scheduler_type="constant",
                     max_steps=3, per_device_train_batch_size=16, gradient_accumulation_steps=1, num_generations=4,
                     max_prompt_length=16, max_completion_length=4, save_steps=0, seed=0, disable_tqdm=True,
                     plot=False, save_final_model=False, report_to="none", dynamic_sampling=True,
                     dynamic_sampling_max_batches=4,
                     # the other collectives of this work in the same run: the entropy quantile over both
                     # ranks' tokens, the adaptive coefficient, the completion log and evaluation
                     top_entropy_quantile=0.5, use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=10.0,
                     log_completions=True, num_completions_to_print=40, eval_strategy="steps", eval_steps=2)
    held = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6))]
    history = Recording(model, [parity_reward], demo.addition_dataset(), config=cfg, tokenizer=tok,
                        eval_dataset=held).train()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"sizes": sizes, "history": history})
    if dist.get_rank() == 0:
        with open(os.path.join(out, "ds.json"), "w") as fh:
            json.dump(gathered, fh)
    dist.barrier()
    dist.destroy_process_group()


def test_dynamic_sampling_under_torchrun(tmp_path):
    """2 ranks (gloo): both make the same rounds and train on the same number of groups each."""
    from test_distributed import launch

    launch([os.path.abspath(__file__), "ds-worker", str(tmp_path)], timeout=300)
    ranks = json.load(open(tmp_path / "ds.json"))
    assert len(ranks) == 2
    a, b = ranks
    assert a["sizes"] == b["sizes"] and len(a["sizes"]) == 3
    assert len(a["history"]) == len(b["history"])
    for ha, hb in zip(a["history"], b["history"]):
        for key in ("dynamic_sampling/rounds", "dynamic_sampling/groups_trained", "entropy_coef",
                    "entropy_masked_frac", "eval_reward"):
            assert ha.get(key) == hb.get(key), key
    train = [h for h in a["history"] if "reward" in h]
    assert [h["entropy_coef"] for h in train] == pytest.approx([0.0, 0.015, 0.02])
    assert all(0 < h["entropy_masked_frac"] < 1 for h in train)
    assert [h["step"] for h in a["history"] if "eval_reward" in h] == [0, 2, 3]
    rows = read_completions(str(tmp_path / "run"))
    per_step = {s: sum(r["step"] == s for r in rows) for s in (1, 2, 3)}
    assert per_step == {i: min(40, a["sizes"][i - 1] * 2) for i in (1, 2, 3)}   # both ranks' rows
    for n, h in zip(a["sizes"], train):
        if h["dynamic_sampling/groups_trained"]:
            assert h["dynamic_sampling/groups_trained"] == 2 * n // 4  # W x the groups each rank trained
            assert h["frac_reward_zero_std"] == 0.0
        else:  # nothing informative on some rank: the first round as sampled
            assert n == 16


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "ds-worker":
        _ds_worker(sys.argv[2])
