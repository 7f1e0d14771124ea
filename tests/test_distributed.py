"""The trainers under torchrun: 2 CPU processes on gloo against 1 process, DDP and FSDP2.

Batch sizes are per process, as TRL's: 2 ranks with gradient_accumulation_steps=2 train on the
same global batch as 1 process with 4 (WORLD * per-rank accumulation).

How the comparison is made exact: generation is random per rank, so the equivalence test feeds a
FIXED rollout instead. FixedRolloutTrainer.rollout builds each completion from its own seed,
(dataset index, generation number), so whatever rank a prompt lands on, its G completions are
the same tokens as in the one-process run; rewards, advantages and the update then run through
the real trainer code. The resume test uses real sampling (HF generate on every rank).

This file is also the worker script: `torchrun ... tests/test_distributed.py MODE OUT_DIR`.
Every launch has a timeout and its process group is killed on expiry, so a hung collective
fails the test instead of hanging CI.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.abspath(__file__)
TIMING = {"tokens_per_s", "step_time", "generation_time"}
CASES = [("grpo", "group"), ("grpo", "batch"), ("dapo", "group"), ("dapo", "batch")]
FSDP_CASES = [("grpo", "group"), ("dapo", "batch")]
G, T = 4, 4
WORLD = 2        # torchrun --nproc_per_node
GA = 4           # gradient_accumulation_steps of the one-process reference; each rank runs GA // WORLD


# ----------------------------------------------------------------------------- shared pieces
def char_reward(prompts, completions, completion_ids, **kw):
    """A dense, deterministic reward (so advantages are non-zero on a random model)."""
    return [(sum(map(ord, c)) % 5) / 4.0 for c in completions]


def parts():
    from grpo_fast import demo

    tok = demo.build_tokenizer()
    return tok, demo.build_model(tok, seed=0), demo.addition_dataset()


def make_config(out, **kw):
    from grpo_fast import GRPOConfig

    # adam_epsilon 1e-4: Adam's first step is nearly sign(g), so with eps 1e-8 a gradient entry at
    # float-noise level (1e-11) moves a weight by ~lr * 1e-3 depending on the reduction order
    values = dict(output_dir=out, learning_rate=1e-2, lr_scheduler_type="constant", max_steps=1,
                  per_device_train_batch_size=4, gradient_accumulation_steps=4, num_generations=G,
                  max_prompt_length=16, max_completion_length=T, save_steps=0, seed=0, disable_tqdm=True,
                  plot=False, save_final_model=False, report_to="none", adam_epsilon=1e-4)
    values.update(kw)
    return GRPOConfig(**values)


class FixedEngine:
    """A rollout engine without sampling: sample g of a prompt comes from its own seed (the prompt's
    tokens and g), so a prompt's completions do not depend on its neighbours or on the rank."""

    def __new__(cls, tokenizer):
        from grpo_fast.rollout import Generation, RolloutEngine

        class _Fixed(RolloutEngine):
            name = "fixed"

            def generate(self, prompt_ids, settings):
                eos = tokenizer.eos_token_id
                digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
                ids, reasons, g, prev = [], [], 0, None
                for p in prompt_ids:
                    g = g + 1 if p == prev else 0      # the producer repeats a prompt for its group
                    prev = p
                    gen = torch.Generator().manual_seed(1000 * (sum(p) * 31 + len(p)) + g)
                    n = int(torch.randint(1, T + 1, (1,), generator=gen))       # tokens incl. EOS
                    tokens = [digits[int(k)] for k in torch.randint(0, 10, (T,), generator=gen)]
                    stop = n < T or bool(torch.randint(0, 2, (1,), generator=gen))
                    if stop:
                        tokens[n - 1] = eos
                    ids.append(tokens[:n] if stop else tokens)
                    reasons.append("stop" if stop else "length")
                return Generation(completion_ids=ids, finish_reasons=reasons)

        return _Fixed()


def model_params(trainer):
    """Full parameters on CPU (collective under FSDP2)."""
    from grpo_fast.train import checkpoint as ckpt

    if trainer.dist.enabled and trainer.dist.mode == "fsdp2":
        state = ckpt.full_model_state(trainer.model)
    else:
        state = trainer.model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def one_step(out_dir, loss_type, scale, **kw):
    from grpo_fast import GRPOTrainer

    tok, model, data = parts()
    cfg = make_config(out_dir, loss_type=loss_type, scale_rewards=scale, **kw)
    trainer = GRPOTrainer(model, [char_reward], data, config=cfg, tokenizer=tok, engine=FixedEngine(tok))
    history = trainer.train()
    return history[0], model_params(trainer)


def ppo_step(out_dir, gradient_accumulation_steps=GA):
    """PPO (critic, KL-in-reward, whitening) for 2 epochs over one fixed rollout: policy and critic weights."""
    from grpo_fast import PPOConfig, PPOTrainer

    tok, model, data = parts()
    cfg = PPOConfig(output_dir=out_dir, learning_rate=1e-2, lr_scheduler_type="constant", max_steps=1,
                    per_device_train_batch_size=4, gradient_accumulation_steps=gradient_accumulation_steps,
                    num_generations=G,
                    num_mini_batches=1, ppo_epochs=2, beta=0.05, max_prompt_length=16, max_completion_length=T,
                    # Adam's first steps are nearly sign(g): with eps 1e-8 a gradient entry at float-noise
                    # level (1e-9) flips between layouts; eps 1e-4 keeps the comparison about the gradients
                    adam_epsilon=1e-4, save_steps=0, seed=0, disable_tqdm=True, plot=False, save_final_model=False,
                    report_to="none")
    trainer = PPOTrainer(model, [char_reward], data, config=cfg, tokenizer=tok, engine=FixedEngine(tok))
    history = trainer.train()
    critic = {f"critic.{k}": v.detach().clone() for k, v in trainer.critic.model.state_dict().items()}
    return history[0], {**model_params(trainer), **critic}


TRPO_KEYS = ("kl", "step_accepted", "line_search_steps", "surrogate_gain", "expected_gain", "step_norm",
             "entropy", "reward", "num_tokens")


def trpo_one_step(out_dir, estimator, world=1, **kw):
    """One TRPO step over one fixed rollout (on `world` ranks): metrics and weights (policy, and critic with gae)."""
    from grpo_fast import TRPOConfig, TRPOTrainer

    tok, model, data = parts()
    values = dict(output_dir=out_dir, max_steps=1, per_device_train_batch_size=4,
                  gradient_accumulation_steps=GA // world,
                  num_generations=G, advantage_estimator=estimator, max_kl=0.01, max_prompt_length=16,
                  max_completion_length=T, save_steps=0, seed=0, disable_tqdm=True, plot=False,
                  save_final_model=False, report_to="none")
    if estimator == "gae":
        # one critic minibatch per pass: its rows do not depend on the (per-rank) shuffling
        values.update(per_device_train_batch_size=16 // world, gradient_accumulation_steps=1, vf_iters=2,
                      adam_epsilon=1e-4)
    values.update(kw)
    trainer = TRPOTrainer(model, [char_reward], data, config=TRPOConfig(**values), tokenizer=tok,
                          engine=FixedEngine(tok))
    history = trainer.train()
    params = model_params(trainer)
    if trainer.critic is not None:
        params.update({f"critic.{k}": v.detach().clone() for k, v in trainer.critic.model.state_dict().items()})
    return history[0], params


def resume_run(out_dir, mode, resume=None):
    """4 real (sampled) steps, checkpoint at step 2; or the same run resumed from that checkpoint."""
    from grpo_fast import GRPOTrainer

    tok, model, data = parts()
    cfg = make_config(out_dir, max_steps=4, save_steps=2, distributed=mode, resume_from_checkpoint=resume,
                      temperature=1.5, gradient_accumulation_steps=GA // WORLD)
    trainer = GRPOTrainer(model, [char_reward], data, config=cfg, tokenizer=tok)
    history = trainer.train()
    return history, model_params(trainer)


# ----------------------------------------------------------------------------- worker (under torchrun)
def worker(mode, out):
    import torch.distributed as dist

    from grpo_fast import ConfigError

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = {}
    if mode == "equiv":
        ga = GA // WORLD   # per-device batch sizes (TRL): each rank's half of the one-process batch
        for loss_type, scale in CASES:  # a fresh output folder per run (a folder holding a run is refused)
            results[f"ddp-{loss_type}-{scale}"] = one_step(os.path.join(out, f"ddp-{loss_type}-{scale}"),
                                                          loss_type, scale, gradient_accumulation_steps=ga)
        for loss_type, scale in FSDP_CASES:
            results[f"fsdp2-{loss_type}-{scale}"] = one_step(os.path.join(out, f"fsdp2-{loss_type}-{scale}"),
                                                            loss_type, scale, distributed="fsdp2",
                                                            gradient_accumulation_steps=ga)
        results["ppo"] = ppo_step(os.path.join(out, "ppo"), gradient_accumulation_steps=ga)
    elif mode == "trpo":
        for estimator in ("group", "gae"):
            metrics, params = trpo_one_step(os.path.join(out, f"trpo-{estimator}"), estimator, world=WORLD)
            # every rank's weights after the step, to check they are identical
            results[f"trpo-{estimator}"] = (metrics, dist_gather_object(params))
        try:
            trpo_one_step(os.path.join(out, "trpo-fsdp2"), "group", world=WORLD, distributed="fsdp2")
            results["trpo_fsdp2_error"] = None
        except ConfigError as e:
            results["trpo_fsdp2_error"] = str(e)
    else:  # resume-a / resume-b
        for dmode in ("ddp", "fsdp2"):
            run_dir = os.path.join(out, f"{dmode}-a")
            if mode == "resume-a":
                results[dmode] = resume_run(run_dir, dmode)
            else:
                results[dmode] = resume_run(os.path.join(out, f"{dmode}-b"), dmode,
                                            resume=os.path.join(run_dir, "checkpoint-2"))
    if rank == 0:
        torch.save(results, os.path.join(out, f"{mode}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def dist_gather_object(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- launching
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, timeout=240, module=False):
    """torchrun --nproc_per_node 2 on 127.0.0.1; kills the whole process group on timeout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += (["-m"] if module else []) + args
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout}s (a hung collective?):\n{output[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def _assert_params_close(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for k in want:
        err = (got[k] - want[k]).abs().max().item()
        assert err <= tol, f"{k}: max |2 ranks - 1 rank| = {err:.3g}"


# ----------------------------------------------------------------------------- tests
def test_local_indices_cover_the_global_prompts_in_order():
    from grpo_fast.train.data import PromptSampler, local_slice

    glob = PromptSampler(100, seed=3).take(8)
    pieces = [local_slice(glob, r, 4) for r in range(4)]
    assert [len(p) for p in pieces] == [2] * 4 and sum(pieces, []) == glob


def test_fixed_rollout_is_independent_of_the_layout(tmp_path):
    """The premise of the equivalence test: a prompt's completions do not depend on its neighbours."""
    tok, model, data = parts()
    from grpo_fast import GRPOTrainer
    from grpo_fast.train.batches import sampling_settings

    cfg = make_config(str(tmp_path))
    tr = GRPOTrainer(model, [char_reward], data, config=cfg, tokenizer=tok, engine=FixedEngine(tok))
    produce = lambda idx: tr.producer.produce([data[i] for i in idx], idx, sampling_settings(cfg), G)  # noqa: E731
    whole, half = produce([5, 17, 42, 8]), produce([42, 8])
    T_half = half.completion_ids.shape[1]
    assert torch.equal(whole.completion_ids[2 * G:, :T_half], half.completion_ids)
    assert whole.completions[2 * G:] == half.completions
    assert whole.completion_attention.sum() > whole.completion_attention.shape[0]   # varied lengths
    tr.close()


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    """One step on the same global batch: same loss, metrics and updated parameters (1e-5), DDP and FSDP2;
    the global batch is per_device_train_batch_size x gradient_accumulation_steps x world size, as TRL's
    (num_tokens, the global count, agrees with the one-process run of twice the accumulation)."""
    launch([HERE, "equiv", str(tmp_path)])
    results = torch.load(tmp_path / "equiv.pt", weights_only=False)
    initial = {k: v.clone() for k, v in parts()[1].state_dict().items()}
    for loss_type, scale in CASES:
        m1, p1 = one_step(str(tmp_path / f"one-{loss_type}-{scale}"), loss_type, scale)
        assert max((p1[k] - initial[k]).abs().max().item() for k in p1) > 1e-4  # the step moved the weights
        modes = ["ddp"] + (["fsdp2"] if (loss_type, scale) in FSDP_CASES else [])
        for mode in modes:
            m2, p2 = results[f"{mode}-{loss_type}-{scale}"]
            for key in ("loss", "reward", "reward_std", "entropy", "grad_norm", "completion_length",
                        "completion_length_min", "completion_length_max", "clipped_ratio", "num_tokens"):
                assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), (mode, loss_type, scale, key)
            _assert_params_close(p2, p1)
    # PPO under DDP: policy and critic gradients averaged by hand, global whitening and token counts
    m1, p1 = ppo_step(str(tmp_path / "one-ppo"))
    m2, p2 = results["ppo"]
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-6)
    assert m2["reward"] == pytest.approx(m1["reward"], rel=1e-6)
    assert max((p1[k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    _assert_params_close(p2, p1)


def test_trpo_two_ranks_match_one_process(tmp_path):
    """One TRPO step on a fixed global rollout, 2 DDP ranks vs 1 process, group and gae advantages:
    the same updated policy (and critic) to 1e-5, the same accept decision, line search and KL, and
    bit-identical weights on the two ranks (no broadcast: identical reduced CG / line search); fsdp2
    is refused with a clear error."""
    launch([HERE, "trpo", str(tmp_path)], timeout=180)
    results = torch.load(tmp_path / "trpo.pt", weights_only=False)
    assert "distributed=ddp" in (results["trpo_fsdp2_error"] or ""), results["trpo_fsdp2_error"]
    initial = {k: v.clone() for k, v in parts()[1].state_dict().items()}
    for estimator in ("group", "gae"):
        m1, p1 = trpo_one_step(str(tmp_path / f"one-{estimator}"), estimator)
        m2, (p2, p2_rank1) = results[f"trpo-{estimator}"]
        assert m1["step_accepted"] == 1.0, m1  # a real step, so the weights comparison means something
        assert max((p1[k] - initial[k]).abs().max().item() for k in initial) > 1e-4
        assert m2["step_accepted"] == m1["step_accepted"] and m2["line_search_steps"] == m1["line_search_steps"]
        for key in TRPO_KEYS:
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), (estimator, key, m2[key], m1[key])
        if estimator == "gae":
            assert m2["value_loss"] == pytest.approx(m1["value_loss"], rel=1e-4, abs=1e-7)
            assert any(k.startswith("critic.") for k in p1)
        _assert_params_close(p2, p1)
        _assert_params_close(p2_rank1, p2, tol=0.0)  # the ranks' weights are bit-identical


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_exactly(tmp_path):
    """4 sampled steps on 2 ranks with a checkpoint at 2; resumed on 2 ranks, steps 3-4 are the same."""
    launch([HERE, "resume-a", str(tmp_path)])
    for mode in ("ddp", "fsdp2"):
        ck = tmp_path / f"{mode}-a" / "checkpoint-2"
        state = torch.load(ck / "trainer_state.pt", weights_only=True)
        assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
        # each rank sampled with its own generator
        assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])
        assert (ck / "sharded").is_dir() == (mode == "fsdp2")
        rows = [json.loads(line) for line in open(tmp_path / f"{mode}-a" / "metrics.jsonl")]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer, one line per step
    launch([HERE, "resume-b", str(tmp_path)])
    initial = parts()[1].state_dict()
    a = torch.load(tmp_path / "resume-a.pt", weights_only=False)
    b = torch.load(tmp_path / "resume-b.pt", weights_only=False)
    for mode in ("ddp", "fsdp2"):
        (hist_a, params_a), (hist_b, params_b) = a[mode], b[mode]
        assert [h["step"] for h in hist_b] == [1, 2, 3, 4]
        for ha, hb in zip(hist_a, hist_b):
            assert {k: v for k, v in ha.items() if k not in TIMING} == \
                   {k: v for k, v in hb.items() if k not in TIMING}, mode
        _assert_params_close(params_b, params_a, tol=0.0)
        assert any((params_a[k] != initial[k]).any() for k in params_a)  # the run did learn something


@pytest.mark.slow
def test_torchrun_cli_demo(tmp_path):
    """`torchrun --nproc_per_node 2 -m grpo_fast train` on the demo: rank 0 alone writes logs and the model."""
    out = tmp_path / "demo"
    text = launch(["grpo_fast", "train", "--output_dir", str(out), "--max_steps", "2",
                   "--per_device_train_batch_size", "16", "--num_generations", "4", "--save_steps", "1",
                   "--disable_tqdm", "--plot", "false", "--report_to", "none"], module=True)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # one writer: one training row per step (the demo also logs its held-out evaluation, from step 0)
    assert [r["step"] for r in rows if "reward" in r] == [1, 2], text[-2000:]
    assert all(r["step"] in (0, 1, 2) for r in rows)
    assert (out / "final" / "config.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-1", "checkpoint-2"]


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
