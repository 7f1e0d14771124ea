"""The fused LM head in the trainers: the same loss and parameters as the logits path, no logits
made, and the fallbacks that say why."""
import copy

import pytest
import torch
from torch import nn

from grpo_fast.rewards import accuracy_reward
from grpo_fast import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, TRPOConfig, TRPOTrainer
from grpo_fast.model import fused_head_for
from steps import prepare, produce, score, update

COMMON = dict(learning_rate=5e-4, lr_scheduler_type="constant", max_steps=1, max_prompt_length=16,
              max_completion_length=4, save_steps=0, seed=0, disable_tqdm=True, plot=False, save_final_model=False,
              report_to="none", logging_steps=1)


def _train(cls, cfg_cls, parts, tmp_path, fused, **kw):
    common = {k: v for k, v in COMMON.items() if k not in cfg_cls.UNUSED_FIELDS}   # TRPO has no learning rate
    cfg = cfg_cls(output_dir=str(tmp_path / ("fused" if fused else "logits")), fused_lm_head=fused,
                  **dict(common, **kw))
    trainer = cls(copy.deepcopy(parts["model"]), [accuracy_reward], parts["train_dataset"], config=cfg,
                  tokenizer=parts["tokenizer"])
    assert (trainer.policy.fused_head is not None) == fused
    history = trainer.train()
    return history[-1], {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _assert_same(a, b, keys, tmp):
    (m1, p1), (m2, p2) = a, b
    for key in keys:
        assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-6), key
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("kw", [dict(), dict(beta=0.05, num_iterations=2, loss_type="grpo")])
def test_grpo_fused_equals_logits_path(demo_parts, tmp_path, kw):
    kw = dict(per_device_train_batch_size=16, num_generations=4, **kw)
    fused = _train(GRPOTrainer, GRPOConfig, demo_parts, tmp_path, True, **kw)
    logits = _train(GRPOTrainer, GRPOConfig, demo_parts, tmp_path, False, **kw)
    _assert_same(fused, logits, ("loss", "reward", "entropy", "grad_norm", "kl"), tmp_path)


@pytest.mark.parametrize("share", [False, True])
def test_ppo_fused_equals_logits_path(demo_parts, tmp_path, share):
    kw = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, ppo_epochs=2, beta=0.05,
              share_policy_trunk=share)
    fused = _train(PPOTrainer, PPOConfig, demo_parts, tmp_path, True, **kw)
    logits = _train(PPOTrainer, PPOConfig, demo_parts, tmp_path, False, **kw)
    _assert_same(fused, logits, ("loss", "value_loss", "entropy", "grad_norm", "approx_kl"), tmp_path)


def test_trpo_fused_surrogate_equals_logits_path(demo_parts, tmp_path):
    kw = dict(per_device_train_batch_size=16, num_generations=4)
    fused = _train(TRPOTrainer, TRPOConfig, demo_parts, tmp_path, True, **kw)
    logits = _train(TRPOTrainer, TRPOConfig, demo_parts, tmp_path, False, **kw)
    assert fused[0]["step_accepted"] == logits[0]["step_accepted"]
    _assert_same(fused, logits, ("surrogate_gain", "kl", "line_search_steps"), tmp_path)


def test_fused_update_makes_no_logits(demo_parts, tmp_path):
    """Through the fused head the model's lm_head runs on an empty slice: no logits, in the update
    and in the old / reference log-probs (the op-level tests check the tiles stay bounded)."""
    cfg = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, num_generations=4, beta=0.05,
                     num_iterations=2, **dict(COMMON, max_completion_length=8))
    trainer = GRPOTrainer(copy.deepcopy(demo_parts["model"]), [accuracy_reward], demo_parts["train_dataset"],
                          config=cfg, tokenizer=demo_parts["tokenizer"])
    batch = score(trainer, produce(trainer, list(range(4))))
    shapes = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, a, out: shapes.append(tuple(out.shape)))
             for m in (trainer.model, trainer.ref_model)]
    try:
        update(trainer, prepare(trainer, batch))
    finally:
        for h in hooks:
            h.remove()
    assert len(shapes) >= 3 and all(s[-2] == 0 for s in shapes), shapes


def test_fallbacks_say_why(demo_parts, capsys, tmp_path):
    model = copy.deepcopy(demo_parts["model"])
    ids = torch.tensor([[5, 6, 7]])
    assert fused_head_for(model, check_ids=ids)[0] is not None
    # an unknown transform of the logits: caught by the check forward
    odd = copy.deepcopy(model)
    forward = odd.forward

    def scaled(*a, **k):
        out = forward(*a, **k)
        out.logits = out.logits * 3.0 + 1.0
        return out

    odd.forward = scaled
    head, why = fused_head_for(odd, check_ids=ids)
    assert head is None and "unknown head transform" in why
    # a head that is not a plain Linear
    other = copy.deepcopy(model)
    other.lm_head = nn.Sequential(other.lm_head)
    other.config.tie_word_embeddings = False
    head, why = fused_head_for(other, check_ids=ids)
    assert head is None and "Sequential" in why
    # the trainer prints the reason once and trains on the logits
    cfg = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, **COMMON)
    trainer = GRPOTrainer(other, [accuracy_reward], demo_parts["train_dataset"], config=cfg,
                          tokenizer=demo_parts["tokenizer"])
    assert trainer.policy.fused_head is None
    assert "fused_lm_head" in capsys.readouterr().out


def test_logit_scale_and_softcap_are_read_from_the_config(demo_parts):
    model = copy.deepcopy(demo_parts["model"])
    model.config.final_logit_softcapping = 30.0
    model.config.logit_scale = 0.5
    head, _ = fused_head_for(model)
    assert head.softcap == 30.0 and head.logit_scale == 0.5
