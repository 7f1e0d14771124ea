"""Our policy_loss against TRL 1.16's own GRPO loss (GRPOTrainer._compute_loss) on the same micro-batch.

A tiny local Llama (grpo_fast.demo, no downloads) is wrapped in a constructed, untrained TRL
GRPOTrainer per setting; TRL computes its loss through its fused LM head from the prompt and
completion ids, we compute ours from the same model's logits. Both get the same old, reference
and sampling log-probs, advantages and masks. They must agree to 1e-5 in the loss and, for every
parameter, to 1e-4 of the largest gradient.

Every loss type and option that both libraries have is covered: grpo, bnpo, dr_grpo, dapo,
epsilon_high, delta, GSPO (sequence level), temperature, the k3 KL with and without TRL's bias
correction, cispo, sapo, luspo, vespo (with its own parameters, and with the vLLM importance-sampling
ratios it folds into its sequence weight), the vLLM importance-sampling correction of the other loss
types, top_entropy_quantile, off_policy_mask_threshold, and the entropy bonus (also under gradient
accumulation).

TRL needs its reference model only to compute ref log-probs, which here come with the inputs: the
trainer is built with beta = 0 (so it loads no model from a hub) and its beta is set afterwards.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import warnings

import pytest
import torch

import grpo_fast

# Runs against the installed TRL, whatever its version (a change in TRL's loss then fails here, it is not
# skipped); CI installs the one pinned in pyproject's test extra (test_the_test_extra_pins_one_trl_minor).
# Only a TRL that is not installed at all skips: one that fails to import fails.
if importlib.util.find_spec("trl") is None:
    pytest.skip("TRL is the reference here (pip install -e '.[test]')", allow_module_level=True)
import trl  # noqa: E402

P, T, G = 5, 9, 2  # prompt tokens, completion tokens, completions per prompt
LENGTHS = [9, 4, 1, 7, 9, 6]  # ragged completions, one of a single token
B = len(LENGTHS)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from datasets import Dataset

    from grpo_fast.demo import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2, seed=3)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompt_ids = torch.randint(4, V, (B // G, P), generator=g).repeat_interleave(G, 0)  # (B, P)
    completion_ids = torch.randint(4, V, (B, T), generator=g)
    completion_mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    advantages = torch.tensor([1.3, -1.3, 0.4, -0.4, -0.9, 0.9])
    noise = torch.randn(3, B, T, generator=g)
    data = Dataset.from_list([{"prompt": "1+2="}] * 8)
    return dict(tok=tok, model=model, prompt_ids=prompt_ids, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=advantages, noise=noise, data=data,
                out=str(tmp_path_factory.mktemp("trl")))


def _trainer(parts, trl_kwargs):
    from trl import GRPOConfig, GRPOTrainer

    kw = dict(trl_kwargs)
    beta = kw.pop("beta", 0.0)
    ga = kw.get("gradient_accumulation_steps", 1)
    args = GRPOConfig(output_dir=parts["out"], use_cpu=True, report_to="none", bf16=False, save_strategy="no",
                      per_device_train_batch_size=B, num_generations=G, max_completion_length=T, **kw)

    def reward(completions, **_):
        return [0.0] * len(completions)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=copy.deepcopy(parts["model"]), reward_funcs=reward, args=args,
                              train_dataset=parts["data"], processing_class=parts["tok"])
    trainer.beta = beta  # the ref log-probs come with the inputs (see the module docstring)
    trainer.current_gradient_accumulation_steps = ga  # set by Trainer's training loop otherwise
    trainer.model.train()
    return trainer


def _logits(model, parts):
    ids = torch.cat([parts["prompt_ids"], parts["completion_ids"]], 1)
    am = torch.cat([torch.ones_like(parts["prompt_ids"]), parts["completion_mask"]], 1)
    return model(input_ids=ids, attention_mask=am).logits[:, P - 1:-1]  # (B, T, V) predicting the completion


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_gradients(name, loss, trl_loss, our_grads, trl_grads):
    """The loss to 1e-5 and, for every parameter, the gradient to 1e-4 of the largest one."""
    assert abs(loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item())), \
        (name, loss.item(), trl_loss.item())
    assert set(our_grads) == set(trl_grads)
    largest = max(g.abs().max().item() for g in trl_grads.values())
    assert largest > 0
    for pname, g in trl_grads.items():
        err = (our_grads[pname] - g).abs().max().item()
        assert err <= 1e-4 * largest, (name, pname, err, largest)


# (TRL GRPOConfig fields, extra inputs): our options are the same names, except epsilon -> epsilon_low
CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),
    "dapo_ga2_entropy": dict(loss_type="dapo", gradient_accumulation_steps=2, entropy_coef=0.01),
    "grpo_ga2_entropy": dict(loss_type="grpo", gradient_accumulation_steps=2, entropy_coef=0.01),
    "epsilon_high": dict(loss_type="grpo", epsilon=0.1, epsilon_high=0.28),
    "delta": dict(loss_type="grpo", epsilon_high=0.28, delta=1.2),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "temperature": dict(loss_type="dapo", temperature=0.7),
    "k3_bias_corrected": dict(loss_type="grpo", beta=0.04),
    "k3_plain": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
    "k3_bias_corrected_on_policy": dict(loss_type="dapo", beta=0.1, _on_policy=True),
    "k3_bias_corrected_gspo": dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.2),
    "cispo_5": dict(loss_type="cispo", epsilon_high=5.0, beta=0.02),
    "sapo": dict(loss_type="sapo"),
    "sapo_temps": dict(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=0.5, temperature=0.8),
    "top_entropy_quantile": dict(loss_type="grpo", top_entropy_quantile=0.2),
    "top_entropy_quantile_entropy": dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.02),
    "off_policy_mask": dict(loss_type="dapo", off_policy_mask_threshold=0.05, _sampling=True),
    "off_policy_mask_old": dict(loss_type="bnpo", off_policy_mask_threshold=0.0),
    "entropy_grpo": dict(loss_type="grpo", entropy_coef=0.01),
    "entropy_dr_grpo": dict(loss_type="dr_grpo", entropy_coef=0.05),
    "entropy_cispo": dict(loss_type="cispo", epsilon_high=5.0, entropy_coef=0.01),
    # adaptive entropy control (trainer state): TRL applies the coefficient only while the last
    # step's entropy is <= entropy_target; here its state says so, and ours gets that coefficient
    "adaptive_entropy": dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.03, entropy_target=4.0,
                             top_entropy_quantile=0.5, _last_world_entropy=0.0),
    "everything_sapo": dict(loss_type="sapo", beta=0.04, top_entropy_quantile=0.4, off_policy_mask_threshold=0.02,
                            entropy_coef=0.01, temperature=0.9, _sampling=True),
    "everything_grpo": dict(loss_type="grpo", beta=0.04, epsilon_high=0.28, delta=1.3, top_entropy_quantile=0.4,
                            off_policy_mask_threshold=0.02, entropy_coef=0.01, _sampling=True),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    # the clip binds for some sequences: TRL's clip fractions at the sequence level are over sequences
    "luspo_clipped": dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=0.01, epsilon_high=0.001),
    "gspo_clipped": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.01, epsilon_high=0.001),
    "luspo_ga2_kl_entropy": dict(loss_type="luspo", importance_sampling_level="sequence", gradient_accumulation_steps=2,
                                 beta=0.04, entropy_coef=0.01),
    "vespo": dict(loss_type="vespo"),
    "vespo_params": dict(loss_type="vespo", vespo_k_pos=1.2, vespo_lambda_pos=4.0, vespo_k_neg=0.5,
                         vespo_lambda_neg=0.8, beta=0.04),
    "vespo_ga2_entropy": dict(loss_type="vespo", gradient_accumulation_steps=2, entropy_coef=0.01),
    "vespo_is_token_truncate": dict(loss_type="vespo", _is="token_truncate"),
    "vespo_is_token_mask": dict(loss_type="vespo", _is="token_mask", beta=0.04),
    # log-ratios where each of TRL's clamps changes phi: a token's past 20, a sum in [-20, log 1e-8)
    "vespo_clamps": dict(loss_type="vespo", vespo_k_neg=0.1, _log_ratio="clamps"),
    "everything_vespo": dict(loss_type="vespo", beta=0.04, top_entropy_quantile=0.4, off_policy_mask_threshold=0.02,
                             entropy_coef=0.01, temperature=0.9, _sampling=True, _is="token_truncate"),
    # the vLLM importance-sampling correction of the other loss types: the policy term times the ratios
    "dapo_is_token_mask": dict(loss_type="dapo", _is="token_mask"),
    "grpo_is_sequence_truncate": dict(loss_type="grpo", beta=0.04, _is="sequence_truncate"),
}


def _clamp_log_ratios():
    """log(pi / old) per token (B, T) for the vespo_clamps case (LENGTHS = 9, 4, 1, 7, 9, 6)."""
    lr = torch.zeros(B, T)
    lr[0, 0], lr[0, 1:9] = 25.0, -19.0 / 8  # clamped to 20 before the sum: 1 (6 without the clamp)
    lr[1, :4] = -19.5 / 4                   # sum -19.5: floored at log 1e-8 (A < 0: k_neg = 0.1 shows it)
    lr[3, :7] = 0.1
    return lr


def _is_ratio(mode, logp, mask, noise):
    """TRL's vllm_importance_sampling_ratio for `mode` (clip range [0.9, 1.1], away from the defaults so
    that both the cap and, for the mask modes, the zeroing bite): (B, T), or (B, 1) for sequence modes."""
    diff = (0.1 * noise) * mask  # log(pi_old / pi_sampler), 0 at the padding as in TRL
    ratio = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    if mode.endswith("truncate"):
        return ratio.clamp(0.9, 1.1)
    return ratio.masked_fill((ratio < 0.9) | (ratio > 1.1), 0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradients_match_trl(parts, name):
    case = dict(CASES[name])
    on_policy = case.pop("_on_policy", False)
    use_sampling = case.pop("_sampling", False)
    last_world_entropy = case.pop("_last_world_entropy", None)
    is_mode = case.pop("_is", None)
    log_ratio = case.pop("_log_ratio", None)
    trainer = _trainer(parts, case)
    if is_mode is not None:  # as GRPOTrainer(use_vllm=True, vllm_importance_sampling_correction=True) has them
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        trainer.vllm_importance_sampling_mode = is_mode
    if last_world_entropy is not None:
        trainer._last_world_entropy = last_world_entropy
    model = trainer.model
    temperature = case.get("temperature", 1.0)
    mask = parts["completion_mask"]

    with torch.no_grad():
        logp = grpo_fast.selective_log_softmax(_logits(model, parts), parts["completion_ids"], temperature)
    noise = parts["noise"]
    old = None if on_policy else (logp + 0.3 * noise[0]) * mask  # padding holds 0 as TRL's does
    if log_ratio == "clamps":
        old = (logp - _clamp_log_ratios()) * mask
    ref = (logp + 0.3 * noise[1]) * mask
    # per-sequence shifts so the off-policy mask drops some negative-advantage sequences, not all
    shift = torch.tensor([0.3, 0.3, -0.2, 0.01, 0.5, 0.2])[:, None]
    sampling = ((logp + shift + 0.05 * noise[2]) * mask) if use_sampling else None
    num_items = mask.sum().float()
    is_ratio = None if is_mode is None else _is_ratio(is_mode, logp, mask, noise[2])

    inputs = dict(prompt_ids=parts["prompt_ids"], prompt_mask=torch.ones_like(parts["prompt_ids"]),
                  completion_ids=parts["completion_ids"], completion_mask=mask,
                  advantages=parts["advantages"], num_items_in_batch=num_items)
    if old is not None:
        inputs["old_per_token_logps"] = old
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    if sampling is not None:
        inputs["sampling_per_token_logps"] = sampling
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio

    model.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = _grads(model)

    adaptive = {k: case.pop(k) for k in ("use_adaptive_entropy", "entropy_target") if k in case}
    ours_kw = {k: v for k, v in case.items() if k not in ("epsilon",)}
    ours_kw["epsilon_low"] = case.get("epsilon", 0.2)
    model.zero_grad(set_to_none=True)
    out = grpo_fast.policy_loss(
        _logits(model, parts), parts["completion_ids"], parts["advantages"], mask, old,
        ref if case.get("beta", 0.0) != 0.0 else None, max_completion_length=T, num_items_in_batch=num_items,
        sampling_logps=sampling, importance_weights=is_ratio, **ours_kw)
    out.loss.backward()
    our_grads = _grads(model)

    assert_same_loss_and_gradients(name, out.loss, trl_loss, our_grads, trl_grads)
    if adaptive:
        # TRL's update at the step boundary, as the trainer must do it from our outputs: the entropy
        # over the kept tokens of the step, then coef +/- entropy_coef_delta within [min, max]
        world = (out.entropy if out.entropy_kept is None else out.entropy_kept).item()
        coef = case["entropy_coef"]
        want = min(coef + 0.005, 1.0) if world <= adaptive["entropy_target"] else max(coef - 0.005, 0.0)
        assert abs(trainer.entropy_coef - want) < 1e-12 and abs(trainer._last_world_entropy - world) < 1e-5
    # TRL's logged metrics, where we have the same one
    logged = trainer._metrics["train"]
    assert abs(out.entropy.item() - logged["entropy"][-1]) <= 1e-5 * max(1.0, logged["entropy"][-1])
    if case.get("beta", 0.0) != 0.0:
        assert abs(out.kl.item() - logged["kl"][-1]) <= 1e-5 * max(1.0, abs(logged["kl"][-1]))
    if case["loss_type"] == "cispo":
        assert abs(out.cispo_clip_ratio.item() - logged["cispo_clip_ratio"][-1]) <= 1e-6
    elif case["loss_type"] == "vespo":
        theirs = logged["vespo/phi_seq_mean"][-1]
        assert abs(out.vespo_phi_seq_mean.item() - theirs) <= 1e-5 * max(1.0, theirs), (name, theirs)
    elif case["loss_type"] != "sapo":
        for ours, theirs in (("clip_ratio_low", "clip_ratio/low_mean"), ("clip_ratio_high", "clip_ratio/high_mean"),
                             ("clip_ratio_region", "clip_ratio/region_mean")):
            if case.get("delta") is None:  # TRL counts the delta-capped ratio in its clip metrics
                assert abs(getattr(out, ours).item() - logged[theirs][-1]) <= 1e-6, (ours, name)


def test_the_cases_exercise_what_they_name(parts):
    """The inputs make each option bite: some tokens clipped by the cispo cap, some sequences
    dropped by the off-policy mask (but not all), some tokens left out by the entropy quantile."""
    model = parts["model"]
    mask = parts["completion_mask"]
    with torch.no_grad():
        logits = _logits(model, parts)
        logp = grpo_fast.selective_log_softmax(logits, parts["completion_ids"])
    old = (logp + 0.3 * parts["noise"][0]) * mask
    shift = torch.tensor([0.3, 0.3, -0.2, 0.01, 0.5, 0.2])[:, None]
    sampling = (logp + shift + 0.05 * parts["noise"][2]) * mask
    adv = parts["advantages"]
    c = grpo_fast.policy_loss(logits, parts["completion_ids"], adv, mask, old, loss_type="cispo", epsilon_high=1.2)
    assert 0 < c.cispo_clip_ratio.item() < 1
    o = grpo_fast.policy_loss(logits, parts["completion_ids"], adv, mask, old, off_policy_mask_threshold=0.05,
                              sampling_logps=sampling)
    assert 0 < o.off_policy_masked_frac.item() < 1
    q = grpo_fast.policy_loss(logits, parts["completion_ids"], adv, mask, old, top_entropy_quantile=0.2)
    assert 0.5 < q.entropy_masked_frac.item() < 1
    r = grpo_fast.policy_loss(logits, parts["completion_ids"], adv, mask, old, epsilon_high=0.28, delta=1.2)
    assert r.clip_ratio_region.item() > 0
    s = grpo_fast.policy_loss(logits, parts["completion_ids"], adv, mask, old, importance_sampling_level="sequence",
                              epsilon_low=0.01, epsilon_high=0.001)
    assert 0 < s.clip_ratio_low.item() < 1 and 0 < s.clip_ratio_high.item() < 1


def test_the_test_extra_pins_one_trl_minor():
    """What CI installs is one TRL minor version (pyproject's test extra), and it is the installed one."""
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")).read()
    m = re.search(r'"trl>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text.split("test = [", 1)[1].split("]", 1)[0])
    assert m, "pyproject's test extra must pin trl to one minor version (trl>=X.Y,<X.Y+1)"
    lo, hi = (int(m.group(1)), int(m.group(2))), (int(m.group(3)), int(m.group(4)))
    assert hi == (lo[0], lo[1] + 1), (lo, hi)
    installed = tuple(int(x) for x in trl.__version__.split(".")[:2])
    assert installed == lo, f"trl {trl.__version__} is installed; the tests are pinned to {lo[0]}.{lo[1]}"
