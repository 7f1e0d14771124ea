"""Issue 11 §1, §5, §6: code written the way TRL's documentation writes it runs here unchanged
(reward signatures, async rewards, TrainerCallbacks, constructor and config names), bad input is
found at start, and the metrics describe what was sampled. Tiny batches, 1-3 steps each."""
import asyncio
import copy
import dataclasses
import json
import os
import textwrap

import pytest
import torch
from transformers import TrainerCallback, TrainerState

from grpo_fast import cli, demo
from grpo_fast.rewards import accuracy_reward
from grpo_fast import (ConfigError, GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, RewardFunctionError,
                       TRPOConfig, TRPOTrainer)
from grpo_fast import config as config_mod
from grpo_fast.train.metrics import reward_stats
from grpo_fast.model import accepts_index_logits_to_keep, forward_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path / "run"), learning_rate=1e-4, max_steps=1, per_device_train_batch_size=8,
                  num_generations=4, max_prompt_length=16, max_completion_length=4, save_steps=0, seed=0,
                  disable_tqdm=True, plot=False, save_final_model=False, report_to="none")
    values.update(kw)
    return GRPOConfig(**values)


def trainer_for(parts, config, reward_funcs, data=None, cls=GRPOTrainer, **kw):
    return cls(copy.deepcopy(parts["model"]), reward_funcs, data if data is not None else parts["train_dataset"][:8],
               args=config, processing_class=parts["tokenizer"], **kw)


# ----------------------------------------------------------------------------- reward calls
def test_reward_gets_keywords_as_trl_passes_them(demo_parts, tmp_path):
    seen = {}

    def reward(completions, **kwargs):       # TRL's documented form: prompts arrive in kwargs
        seen["completions"], seen["kwargs"] = completions, kwargs
        return [float(len(c)) for c in completions]

    trainer = trainer_for(demo_parts, tiny(tmp_path), reward)
    trainer.train()
    kw = seen["kwargs"]
    assert seen["completions"] != kw["prompts"]                     # positional calls swapped these
    assert {"prompts", "completion_ids", "answer", "trainer_state", "log_metric", "log_extra"} <= set(kw)
    assert isinstance(kw["trainer_state"], TrainerState) and kw["trainer_state"].max_steps == 1
    prompts = [r["prompt"] for r in demo_parts["train_dataset"][:8]]
    assert set(kw["prompts"]) <= set(prompts)
    assert all(isinstance(i, list) and all(isinstance(t, int) for t in i) for i in kw["completion_ids"])
    assert len(seen["completions"]) == 8


def test_reward_with_a_named_column_and_log_callbacks(demo_parts, tmp_path):
    calls = []

    def reward(prompts, completions, answer, **kwargs):   # TRL's docs; positional calls raised here
        calls.append(len(answer))
        kwargs["log_metric"]("my_score", 2.0)
        kwargs["log_metric"]("my_score", 4.0)
        kwargs["log_extra"]("judge_note", [f"n{i}" for i in range(len(completions))])
        return [1.0 if str(a) in c else 0.0 for c, a in zip(completions, answer)]

    trainer = trainer_for(demo_parts, tiny(tmp_path, log_completions=True), reward)
    history = trainer.train()
    assert calls == [8]
    assert history[0]["my_score"] == 3.0              # mean over the step's log_metric calls
    rows = [json.loads(x) for x in open(os.path.join(tmp_path / "run", "metrics.jsonl"))]
    assert rows[0]["my_score"] == 3.0
    logged = [json.loads(x) for x in open(os.path.join(tmp_path / "run", "completions.jsonl"))]
    assert [r["judge_note"] for r in logged] == [f"n{i}" for i in range(8)]   # log_extra's column


def test_builtin_and_trl_rewards_together(demo_parts, tmp_path):
    def reward_len(completions, **kwargs):
        return [-abs(3 - len(c)) for c in completions]

    history = trainer_for(demo_parts, tiny(tmp_path), [accuracy_reward, reward_len]).train()
    assert "rewards/accuracy_reward/mean" in history[0] and "rewards/reward_len/mean" in history[0]


def test_async_rewards_run_concurrently(demo_parts, tmp_path):
    started = []

    async def judge_a(prompts, completions, **kwargs):
        started.append("a")
        # finishes only once judge_b has started too: a sequential caller would time out here
        await asyncio.wait_for(_until(lambda: "b" in started), timeout=10)
        return [1.0] * len(completions)

    async def judge_b(prompts, completions, **kwargs):
        started.append("b")
        await asyncio.wait_for(_until(lambda: "a" in started), timeout=10)
        return [0.5] * len(completions)

    history = trainer_for(demo_parts, tiny(tmp_path), [judge_a, judge_b]).train()
    assert history[0]["reward"] == pytest.approx(1.5)


async def _until(cond):
    while not cond():
        await asyncio.sleep(0.005)


def test_async_reward_inside_a_running_event_loop(demo_parts, tmp_path):
    """Jupyter runs an event loop in the main thread; the trainer then awaits in a worker thread."""
    async def judge(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [0.25] * len(completions)

    class Judge:                         # an object whose __call__ is async counts too
        __name__ = "judge_obj"

        async def __call__(self, prompts, completions, **kwargs):
            return [0.5] * len(completions)

    trainer = trainer_for(demo_parts, tiny(tmp_path), [judge, Judge()])

    async def notebook_cell():
        return trainer.train()

    history = asyncio.run(notebook_cell())
    assert history[0]["reward"] == pytest.approx(0.75)
    import threading
    assert not [t for t in threading.enumerate() if t.name.startswith("grpo_fast-rewards")]   # the worker thread ended


def test_async_reward_failure_names_the_sample(demo_parts, tmp_path):
    async def judge(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch failed")
        if prompts[0] == target:
            raise KeyError("bad sample")
        return [0.0]

    data = demo_parts["train_dataset"][:8]
    target = data[0]["prompt"]
    trainer = trainer_for(demo_parts, tiny(tmp_path, per_device_train_batch_size=32), judge, data=data)
    with pytest.raises(RewardFunctionError, match=r"'judge' raised KeyError.*sample \d+ of the step"):
        trainer.train()


# ----------------------------------------------------------------------------- constructor and callbacks
@pytest.mark.parametrize("cls,cfg_cls,extra", [(PPOTrainer, PPOConfig, {"num_generations": 1}),
                                                (TRPOTrainer, TRPOConfig, {"num_generations": 4})])
def test_ppo_and_trpo_take_trl_constructor_names(demo_parts, tmp_path, cls, cfg_cls, extra):
    cfg = cfg_cls(output_dir=str(tmp_path / "r"), per_device_train_batch_size=4, max_steps=1, report_to="none",
                  disable_tqdm=True, **extra)
    trainer = cls(model=copy.deepcopy(demo_parts["model"]), reward_funcs=accuracy_reward,
                  train_dataset=demo_parts["train_dataset"][:4], args=cfg, processing_class=demo_parts["tokenizer"])
    assert trainer.config is cfg and trainer.tokenizer is demo_parts["tokenizer"]
    with pytest.raises(TypeError, match="args="):
        cls(copy.deepcopy(demo_parts["model"]), accuracy_reward, demo_parts["train_dataset"][:4], config=cfg,
            args=cfg_cls(output_dir=str(tmp_path / "r"), per_device_train_batch_size=4, **extra))


def test_trainer_callback_objects(demo_parts, tmp_path):
    events = []

    class Stopper(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            events.append(("begin", state.global_step))

        def on_log(self, args, state, control, logs=None, **kwargs):
            events.append(("log", logs["step"]))

        def on_step_end(self, args, state, control, **kwargs):
            events.append(("step", state.global_step))
            if state.global_step == 2:
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            events.append(("end", state.global_step))

    trainer = trainer_for(demo_parts, tiny(tmp_path, max_steps=5), accuracy_reward, callbacks=[Stopper()])
    trainer.train()
    assert trainer.global_step == 2
    assert events == [("begin", 0), ("log", 1), ("step", 1), ("log", 2), ("step", 2), ("end", 2)]
    assert [h["step"] for h in trainer.state.log_history] == [1, 2]
    with pytest.raises(TypeError, match="pass an instance"):
        trainer_for(demo_parts, tiny(tmp_path), accuracy_reward, callbacks=[Stopper])


# ----------------------------------------------------------------------------- TRL's config names
def test_config_maps_refuses_and_rejects_names():
    cfg = GRPOConfig(bf16=True, logging_strategy="steps", push_to_hub=False, report_to=["none"], warmup_steps=0.1)
    assert (cfg.bf16, cfg.dtype, cfg.report_to, cfg.warmup_ratio, cfg.warmup_steps) == (True, None, "none", 0.1, 0)
    assert GRPOConfig(fp16=True).fp16 and GRPOConfig(save_strategy="no").save_strategy == "no"
    assert GRPOConfig(activation_checkpointing=True).gradient_checkpointing
    assert PPOConfig(use_cpu=True).device == "cpu"
    for name, value in [("num_train_epochs", 1), ("deepspeed", "ds.json"), ("push_to_hub", True),
                        ("steps_per_generation", 4), ("save_strategy", "epoch")]:
        with pytest.raises(ConfigError, match=rf"{name}=.*TRL field"):
            GRPOConfig(**{name: value})
    with pytest.raises(ConfigError, match="bf16=True and fp16=True"):
        GRPOConfig(bf16=True, fp16=True)
    with pytest.raises(TypeError, match="lerning_rate"):
        GRPOConfig(lerning_rate=1e-5)
    assert GRPOConfig.from_dict({"bf16": True}).bf16                       # YAML keys too


def _table_rows():
    from test_trl_table import rows            # the one parser of the table

    return {name: status for name, (status, _) in rows().items()}


def test_trl_field_table_matches_the_code():
    trl = pytest.importorskip("trl")
    trl_fields = [f.name for f in dataclasses.fields(trl.GRPOConfig)]
    ours = set(GRPOConfig.field_names())
    rows = _table_rows()
    assert set(trl_fields) <= set(rows), sorted(set(trl_fields) - set(rows))
    for name in trl_fields:
        status = rows[name]
        if status == "same":
            assert name in ours, name
        elif status.startswith("mapped"):
            assert name in config_mod.TRL_ALIASES and name not in ours, name
        elif status.startswith("refused"):
            assert name in config_mod.TRL_REFUSED and name not in ours, name
        elif status.startswith("supported"):
            assert name in ours, name
        else:
            raise AssertionError(f"{name}: unknown status {status!r} in docs/trl_migration.md")
        # the code classifies every TRL field: a field here, mapped, or refused
        assert name in ours or name in config_mod.TRL_ALIASES or name in config_mod.TRL_REFUSED, name


def test_every_refused_trl_field_is_refused_at_construction():
    trl = pytest.importorskip("trl")
    ours = set(GRPOConfig.field_names())
    for f in dataclasses.fields(trl.GRPOConfig):
        if f.name in ours or f.name in config_mod.TRL_ALIASES:
            continue
        with pytest.raises(ConfigError, match=f.name):
            GRPOConfig(**{f.name: object()})       # a value nothing accepts: never silently ignored


def test_trl_quickstart_runs_with_only_the_import_changed(demo_parts, tmp_path):
    model_dir = tmp_path / "tiny-model"
    tok = demo.build_tokenizer()
    demo.build_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    script = textwrap.dedent(f"""
        from grpo_fast import GRPOConfig, GRPOTrainer   # was: from trl import GRPOConfig, GRPOTrainer

        dataset = [{{"prompt": "What is 1+2?"}}, {{"prompt": "What is 3+4?"}}, {{"prompt": "What is 2+2?"}}]

        # Dummy reward function: rewards completions that are close to 20 characters
        def reward_len(completions, **kwargs):
            return [-abs(20 - len(completion)) for completion in completions]

        training_args = GRPOConfig(output_dir={str(tmp_path / "out")!r}, per_device_train_batch_size=4,
                                   num_generations=2, max_completion_length=6, max_steps=2, logging_steps=1,
                                   report_to="none", disable_tqdm=True, bf16=False, seed=0)
        trainer = GRPOTrainer(
            model={str(model_dir)!r},
            reward_funcs=reward_len,
            args=training_args,
            train_dataset=dataset,
        )
        trainer.train()
    """)
    namespace = {}
    exec(compile(script, "quickstart.py", "exec"), namespace)
    history = namespace["trainer"].history
    assert [h["step"] for h in history] == [1, 2]
    assert all(h["reward"] <= -14 for h in history)     # at most 6 tokens: 14+ characters short of 20
    assert os.path.isdir(tmp_path / "out" / "final")


# ----------------------------------------------------------------------------- §5 bad input found early
def test_every_dataset_row_is_checked_at_start(demo_parts, tmp_path):
    data = [dict(r) for r in demo_parts["train_dataset"][:8]]
    bad = [dict(r) for r in data]
    del bad[5]["prompt"]
    with pytest.raises(ValueError, match=r"train_dataset\[5\] has no 'prompt'"):
        trainer_for(demo_parts, tiny(tmp_path), accuracy_reward, data=bad)
    bad = [dict(r) for r in data]
    bad[3]["prompt"] = ""
    with pytest.raises(ValueError, match=r"train_dataset\[3\]"):
        trainer_for(demo_parts, tiny(tmp_path), accuracy_reward, data=bad)
    bad = [dict(r) for r in data]
    bad[6]["extra"] = 1
    with pytest.raises(ValueError, match=r"train_dataset\[6\]"):
        trainer_for(demo_parts, tiny(tmp_path), accuracy_reward, data=bad)


@pytest.mark.parametrize("name,value", [("learning_rate", float("nan")), ("max_grad_norm", float("nan")),
                                        ("temperature", float("inf")), ("min_p", 1.5), ("min_p", -0.1),
                                        ("repetition_penalty", 0.0), ("top_p", float("nan")),
                                        ("reward_weights", [1.0, float("nan")])])
def test_bad_values_refused_at_construction(name, value):
    with pytest.raises(ConfigError, match=name):
        GRPOConfig(**{name: value})


def test_missing_model_path_is_named(demo_parts, tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(OSError, match=r"no model at .*no-such-model.*no such directory"):
        GRPOTrainer(missing, accuracy_reward, demo_parts["train_dataset"][:4], args=tiny(tmp_path))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_parts["train_dataset"][:4]))
    with pytest.raises(OSError, match=r"no model at .*no-such-model"):
        cli.main(["train", "--model", missing, "--dataset_path", str(data), "--reward_funcs", "accuracy",
                  "--output_dir", str(tmp_path / "cli")])


def test_cli_options_match_exactly_and_yaml_errors_name_the_line(tmp_path):
    with pytest.raises(cli.CLIError, match="--learning"):
        cli.parse_train_args(["--learning", "1e-5"])          # argparse would have expanded the prefix
    _, _, _, values = cli.parse_train_args(["--learning_rate", "1e-5"])
    assert values == {"learning_rate": "1e-5"}
    bad = tmp_path / "run.yaml"
    bad.write_text("learning_rate: 1e-5\nmax_steps: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml, line \d+, column \d+: YAML syntax error"):
        cli.parse_train_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"run.yaml, line \d+"):
        GRPOConfig.from_yaml(str(bad))


def test_cli_reward_funcs_every_documented_form(demo_parts, tmp_path, monkeypatch):
    # built-in name
    assert cli._load_reward("accuracy") is accuracy_reward
    # package.module:function (the form that raised UnboundLocalError)
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text("def short(completions, **kw):\n    return [-len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = cli._load_reward("mypkg.scoring:short")
    assert f(prompts=["p"], completions=["abc"], completion_ids=[[1, 2, 3]]) == [-3]
    # path/to/file.py:function
    (tmp_path / "rw.py").write_text("def long(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    g = cli._load_reward(f"{tmp_path / 'rw.py'}:long")
    assert g(prompts=["p"], completions=["abcd"], completion_ids=[[1]]) == [4]
    # a reward-model directory
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = demo_parts["tokenizer"]
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    h = cli._load_reward(str(tmp_path / "rm"))
    out = h(prompts=["1+1=", "2+2="], completions=["2", "4"], completion_ids=[[1], [2]])
    assert len(out) == 2 and all(isinstance(v, float) for v in out)
    with pytest.raises(cli.CLIError, match="module:function"):
        cli._load_reward("no_such_thing")


# ----------------------------------------------------------------------------- §6 bugs
def test_masked_truncation_leaves_completion_length_as_sampled(demo_parts, tmp_path):
    a = trainer_for(demo_parts, tiny(tmp_path / "a", max_completion_length=2), accuracy_reward).train()
    b = trainer_for(demo_parts, tiny(tmp_path / "b", max_completion_length=2, mask_truncated_completions=True),
                    accuracy_reward).train()
    assert a[0]["clipped_ratio"] > 0                      # some completions were cut: the mask matters
    assert b[0]["completion_length"] == a[0]["completion_length"]


def test_reward_std_with_groups_of_one_is_the_batch_std():
    rewards = torch.tensor([0.0, 1.0, 1.0, 3.0])
    m = reward_stats(rewards, rewards[:, None], torch.ones(4), torch.zeros(4, dtype=torch.bool), 1, ["r"])
    assert m["reward_std"] == pytest.approx(float(rewards.double().std()))
    assert m["frac_reward_zero_std"] == 0.0
    m2 = reward_stats(rewards, rewards[:, None], torch.ones(4), torch.zeros(4, dtype=torch.bool), 2, ["r"])
    assert m2["reward_std"] == pytest.approx((0.5 ** 0.5 + 2 ** 0.5) / 2)


def test_logits_to_keep_decided_from_the_signature(demo_parts):
    model = copy.deepcopy(demo_parts["model"])
    assert accepts_index_logits_to_keep(model) is True

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("not called")

    assert accepts_index_logits_to_keep(NoKeep()) is None

    class OOM(torch.nn.Module):           # a real forward error must surface, not trigger a retry
        def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **kw):
            raise RuntimeError("CUDA out of memory (simulated)")

    from steps import make_rollout
    batch = make_rollout(torch.tensor([[1]]), torch.tensor([[1]]), torch.tensor([[2]]), torch.tensor([[1]]))
    with pytest.raises(RuntimeError, match="out of memory"):
        forward_logits(OOM(), batch, slice(None), index_logits_to_keep=accepts_index_logits_to_keep(OOM()))


def test_a_trl_config_object_is_refused_with_the_fix(demo_parts):
    trl = pytest.importorskip("trl")
    with pytest.raises(TypeError, match="from grpo_fast import GRPOConfig"):
        GRPOTrainer(copy.deepcopy(demo_parts["model"]), accuracy_reward, demo_parts["train_dataset"][:4],
                    args=trl.GRPOConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False),
                    processing_class=demo_parts["tokenizer"])


def test_cli_takes_trl_names():
    _, config_cls, _, values = cli.parse_train_args(["--bf16", "--save_strategy", "no"])
    assert config_cls.from_dict(values).bf16 and config_cls.from_dict(values).save_strategy == "no"
    _, _, _, values = cli.parse_train_args(["--bf16", "false"])
    assert GRPOConfig.from_dict(values).bf16 is False
    _, _, _, values = cli.parse_train_args(["--deepspeed", "ds.json"])
    with pytest.raises(ConfigError, match="deepspeed='ds.json': a TRL field not supported here"):
        GRPOConfig.from_dict(values)
