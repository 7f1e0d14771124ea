"""Multi-turn parity with TRL 1.16: on a fixed micro-batch whose completions hold tool tokens, the
loss and every parameter gradient of our trainer's loss path (a multi-turn Rollout -> loss_mask ->
Policy.loss through the fused LM head, with the options GRPO's update passes) equal TRL's own
GRPOTrainer._compute_loss given its `tool_mask`, to the tolerances of tests/test_trl_parity.py.

The completions are ragged and each has one or two spans of tool tokens (sampled = 0) between its
sampled spans; TRL gets completion_mask = every real token and tool_mask = 0 on the tool tokens,
as its tool loop builds them. Both get the same old, reference and sampling log-probs and
advantages; the importance-sampling ratios (TRL's sequence-level and token-level formulas over
completion_mask * tool_mask) are checked against ours from the NaN-where-not-sampled engine log-probs.
"""
from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is the reference here (pip install 'trl>=1.16,<1.17')")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"written against TRL 1.16's loss, found trl {trl.__version__}", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_fast import GRPOConfig, GRPOTrainer  # noqa: E402
from grpo_fast.config import loss_options  # noqa: E402
from grpo_fast.rollout import Sample, collate  # noqa: E402
from grpo_fast.train.advantages import engine_correction  # noqa: E402
# test_trl_parity's tiny model, tokenizer and TRL trainer (B = 6 completions of at most T = 9 tokens, G = 2)
from test_trl_parity import B, G, T, _grads, _trainer as _trl_trainer, assert_same_loss_and_gradients  # noqa: E402
from test_trl_parity import parts as trl_parts  # noqa: E402,F401  (a fixture)

# per completion: (sampled, tool, sampled, tool, sampled) span lengths, T tokens at most
SPANS = [(3, 4, 2, 0, 0), (2, 3, 1, 2, 1), (1, 0, 0, 0, 0), (4, 2, 3, 0, 0), (2, 5, 2, 0, 0), (3, 1, 1, 1, 1)]


@pytest.fixture(scope="module")
def parts(trl_parts):
    """test_trl_parity's parts with a multi-turn batch: its prompts, completions with tool spans."""
    g = torch.Generator().manual_seed(1)
    V = trl_parts["model"].config.vocab_size
    samples = []
    for i, spans in enumerate(SPANS):
        ids, sampled = [], []
        for k, n in enumerate(spans):
            ids += torch.randint(4, V, (n,), generator=g).tolist()
            sampled += [1 - k % 2] * n
        samples.append(Sample(prompt_ids=trl_parts["prompt_ids"][i].tolist(), completion_ids=ids, sampled=sampled))
    batch = collate(samples, prompts=["p"] * B, dataset_index=list(range(B)), columns={}, group_size=G,
                    pad_token_id=trl_parts["tok"].pad_token_id, device="cpu")
    assert batch.completion_ids.shape[1] == T
    return dict(trl_parts, batch=batch, noise=torch.randn(3, B, T, generator=g),
                advantages=torch.tensor([1.1, -1.1, 0.3, -0.3, -0.8, 0.8]))


CASES = {
    "grpo": dict(loss_type="grpo"),
    "dapo": dict(loss_type="dapo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "bnpo_kl_entropy": dict(loss_type="bnpo", beta=0.04, entropy_coef=0.01),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    "top_entropy": dict(loss_type="dapo", top_entropy_quantile=0.5),
    "is_token_truncate": dict(loss_type="dapo", _is="token_truncate"),
    "is_sequence_mask": dict(loss_type="grpo", beta=0.04, _is="sequence_mask"),
    # the engine's log-probs reach the loss too: NaN on tool tokens here, 0 there in TRL's tool loop
    "off_policy_mask": dict(loss_type="dapo", off_policy_mask_threshold=0.02, _sampling=True),
    "everything_sapo": dict(loss_type="sapo", beta=0.04, top_entropy_quantile=0.4, off_policy_mask_threshold=0.02,
                            entropy_coef=0.01, _sampling=True),
}


def _trl_is_ratio(mode, old, sampling, mask, lo, hi):
    """TRL 1.16's vllm_importance_sampling_ratio (_generate_and_score_completions), mask = completion_mask * tool_mask."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    ratio = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    if mode.endswith("truncate"):
        return ratio.clamp(min=lo, max=hi)
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_multi_turn_loss_and_gradients_match_trl_with_tool_mask(parts, name, tmp_path):
    case = dict(CASES[name])
    is_mode = case.pop("_is", None)
    use_sampling = case.pop("_sampling", False)
    trl_trainer = _trl_trainer(parts, case)
    if is_mode:  # as GRPOTrainer(use_vllm=True, vllm_importance_sampling_correction=True) has them
        trl_trainer.use_vllm, trl_trainer.vllm_importance_sampling_correction = True, True
        trl_trainer.vllm_importance_sampling_mode = is_mode
    ours_cfg = {k: v for k, v in case.items() if k != "epsilon"}
    if is_mode:
        ours_cfg.update(vllm_importance_sampling_mode=is_mode, vllm_importance_sampling_clip_min=0.9,
                        vllm_importance_sampling_clip_max=1.1)
    cfg = GRPOConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=B, num_generations=G,
                     max_completion_length=parts["batch"].completion_ids.shape[1], report_to="none", disable_tqdm=True,
                     save_steps=0, plot=False, save_final_model=False, **ours_cfg)
    ours = GRPOTrainer(copy.deepcopy(parts["model"]), lambda completions, **_: [0.0] * len(completions), parts["data"],
                       args=cfg, processing_class=parts["tok"])
    batch = parts["batch"]
    noise = parts["noise"]
    tool_mask = batch.sampled_mask
    completion_mask = batch.completion_attention
    mask = completion_mask * tool_mask
    assert (completion_mask != mask).any()           # there are tool tokens inside the completions
    with torch.no_grad():
        logp = ours.policy.rollout_logps(ours.policy.model, batch, B)
    old = (logp + 0.3 * noise[0]) * mask
    ref = (logp + 0.3 * noise[1]) * mask
    # the engine's log-probs: NaN where it sampled nothing (tool tokens, padding), as our producers give them
    sampling = torch.where(mask.bool(), logp + 0.05 * noise[2], torch.full_like(logp, math.nan))
    scored = batch.with_fields(rewards=torch.zeros(B), rewards_per_func=torch.zeros(B, 1),
                               sampling_logps=sampling).with_loss_mask()
    assert torch.equal(scored.loss_mask, mask)
    is_ratio = None
    if is_mode:
        weights, _ = engine_correction(scored, old, cfg)       # ours, over sampled tokens only
        is_ratio = _trl_is_ratio(is_mode, old, sampling, mask, 0.9, 1.1)
        assert torch.allclose(weights, is_ratio, atol=1e-6), (weights, is_ratio)

    inputs = dict(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_attention, completion_ids=batch.completion_ids,
                  completion_mask=completion_mask, tool_mask=tool_mask, advantages=parts["advantages"],
                  num_items_in_batch=mask.sum().float(), old_per_token_logps=old)
    if trl_trainer.beta:
        inputs["ref_per_token_logps"] = ref
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    if use_sampling:
        inputs["sampling_per_token_logps"] = torch.nan_to_num(sampling * mask, nan=0.0)   # TRL: 0 off the sampled
    model = trl_trainer.model
    model.zero_grad(set_to_none=True)
    trl_loss = trl_trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = _grads(model)

    policy = ours.policy
    policy.model.zero_grad(set_to_none=True)
    options = loss_options(cfg, entropy_coef=cfg.entropy_coef, num_items_in_batch=ours.dist.token_normaliser(mask),
                           gradient_accumulation_steps=1, importance_weights=is_ratio,
                           sampling_logps=scored.sampling_logps if use_sampling else None)
    out = policy.loss(policy.wrapped, scored, slice(None), parts["advantages"], scored.loss_mask, options,
                      old_logps=old, ref_logps=ref if cfg.beta else None)
    out.loss.backward()
    our_grads = _grads(policy.model)

    assert_same_loss_and_gradients(name, out.loss, trl_loss, our_grads, trl_grads)
    # TRL's logged entropy is over the same tokens (completion_mask * tool_mask)
    logged = trl_trainer._metrics["train"]
    assert abs(out.entropy.item() - logged["entropy"][-1]) <= 1e-5 * max(1.0, logged["entropy"][-1])
    ours.close()
