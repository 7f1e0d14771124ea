"""Models by name as transformers loads them (its cache, HF_HUB_OFFLINE), the policy's dtype by TRL's
rule, and what of dtype / model_init_kwargs a model given as a module takes. Nothing is downloaded:
a fake Hugging Face cache is filled with save_pretrained under the hub layout, and the hub is
switched offline for every test here."""
import copy
import textwrap

import huggingface_hub.constants as hub_constants
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from grpo_fast import ConfigError, GRPOTrainer, PPOConfig, PPOTrainer, demo
from grpo_fast.rewards import RewardModel, resolve_reward
from test_trl_dropin import tiny

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub whose cache is tmp_path/hub; returns a function that puts a model under an id."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    def put(repo_id: str, model, tokenizer):
        root = cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = root / "snapshots" / COMMIT
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(COMMIT)
        return snapshot

    return put


def test_trl_quickstart_with_a_hub_id(hub_cache, tmp_path):
    """TRL's quick-start, its hub id included, with only the import line changed."""
    tok = demo.build_tokenizer()
    hub_cache("Qwen/Qwen2-0.5B-Instruct", demo.build_model(tok).to(torch.bfloat16), tok)   # saved as bf16, as on the hub
    script = textwrap.dedent(f"""
        from grpo_fast import GRPOConfig, GRPOTrainer   # was: from trl import GRPOConfig, GRPOTrainer

        dataset = [{{"prompt": "What is 1+2?"}}, {{"prompt": "What is 3+4?"}}, {{"prompt": "What is 2+2?"}}]

        def reward_len(completions, **kwargs):
            return [-abs(20 - len(completion)) for completion in completions]

        training_args = GRPOConfig(output_dir={str(tmp_path / "out")!r}, per_device_train_batch_size=4,
                                   num_generations=2, max_completion_length=6, max_steps=1, report_to="none",
                                   disable_tqdm=True)
        trainer = GRPOTrainer(model="Qwen/Qwen2-0.5B-Instruct", reward_funcs=reward_len, args=training_args,
                              train_dataset=dataset)
        trainer.train()
    """)
    namespace = {}
    exec(compile(script, "quickstart.py", "exec"), namespace)
    trainer = namespace["trainer"]
    assert [h["step"] for h in trainer.history] == [1]
    assert next(trainer.model.parameters()).dtype == torch.float32          # TRL's default dtype
    assert trainer.tokenizer.eos_token == tok.eos_token                     # the tokenizer came from the cache


def test_a_missing_id_offline_says_it_is_not_in_the_cache(hub_cache, tmp_path, demo_parts):
    data = demo_parts["train_dataset"][:4]
    with pytest.raises(OSError, match=r"model 'acme/missing' is not in the local cache .*HF_HUB_OFFLINE"):
        GRPOTrainer("acme/missing", demo_parts["reward_funcs"], data, args=tiny(tmp_path))
    with pytest.raises(OSError, match=r"no model at .*no-such-dir.*no such directory"):
        GRPOTrainer(str(tmp_path / "no-such-dir"), demo_parts["reward_funcs"], data, args=tiny(tmp_path))
    with pytest.raises(OSError, match=r"reward model 'acme/no-rm' is not in the local cache"):
        resolve_reward("acme/no-rm")


def test_reward_model_and_value_model_by_hub_id(hub_cache, tmp_path, demo_parts):
    tok = demo_parts["tokenizer"]
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    hub_cache("acme/tiny-rm", rm, tok)
    scorer = resolve_reward("acme/tiny-rm")
    assert isinstance(scorer, RewardModel)
    out = scorer(prompts=["1+1="], completions=["2"], completion_ids=[[1]])
    assert len(out) == 1 and isinstance(out[0], float)
    hub_cache("acme/policy", copy.deepcopy(demo_parts["model"]), tok)
    cfg = PPOConfig(output_dir=str(tmp_path / "ppo"), max_steps=1, per_device_train_batch_size=8, num_generations=1,
                    max_prompt_length=16, max_completion_length=4, save_steps=0, disable_tqdm=True,
                    report_to="none", value_model="acme/policy")
    trainer = PPOTrainer("acme/policy", ["acme/tiny-rm"], demo_parts["train_dataset"][:8], args=cfg)
    assert trainer.reward_names[0].startswith("reward_model[")
    trainer.train()


def test_dtype_by_name_follows_trl(tmp_path, demo_parts):
    tok = demo_parts["tokenizer"]
    path = tmp_path / "bf16-model"
    demo.build_model(tok).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    data, reward = demo_parts["train_dataset"][:8], demo_parts["reward_funcs"]

    def dtype_of(**kw):
        t = GRPOTrainer(str(path), reward, data, args=tiny(tmp_path, **kw))
        return next(t.model.parameters()).dtype

    assert dtype_of() == torch.float32                                        # not the checkpoint's bf16
    assert dtype_of(model_init_kwargs={"dtype": "bfloat16"}) == torch.bfloat16
    assert dtype_of(dtype="auto") == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype is given twice"):
        dtype_of(dtype="float16", model_init_kwargs={"dtype": "bfloat16"})


def test_a_module_takes_what_it_can_and_refuses_the_rest(tmp_path, demo_parts):
    data, reward, tok = demo_parts["train_dataset"][:8], demo_parts["reward_funcs"], demo_parts["tokenizer"]

    def build(**kw):
        return GRPOTrainer(copy.deepcopy(demo_parts["model"]), reward, data, args=tiny(tmp_path, **kw),
                           processing_class=tok)

    assert next(build().model.parameters()).dtype == torch.float32           # its own dtype
    assert next(build(dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    assert next(build(model_init_kwargs={"dtype": "float16"}).model.parameters()).dtype == torch.float16
    t = build(model_init_kwargs={"attn_implementation": "eager"})
    assert t.model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match=r"model_init_kwargs \['revision', 'trust_remote_code'\].*given as a module"):
        build(model_init_kwargs={"revision": "main", "trust_remote_code": True})
