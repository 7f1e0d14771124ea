"""`grpo-fast train` / `grpo-fast plot`: YAML + overrides, the built-in demo, a model from a path."""
import json
import os
import subprocess
import sys


from grpo_fast import cli, demo
from grpo_fast import GRPOConfig

FAST = ["--disable_tqdm", "--report_to", "none"]


def test_yaml_then_command_line_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("algorithm: grpo\nlearning_rate: 3e-6\nmax_steps: 5\nseed: 1\nreward_weights: [1, 2]\n")
    algorithm, config_cls, _, values = cli.parse_train_args(
        ["--config", str(p), "--max_steps", "9", "--model", "some/path", "--mask_truncated_completions",
         "--beta", "0.04", "--reward_funcs", "accuracy", "format"])
    cfg = config_cls.from_dict(values)
    assert algorithm == "grpo" and config_cls is GRPOConfig
    assert cfg.max_steps == 9 and cfg.learning_rate == 3e-6 and cfg.seed == 1 and cfg.beta == 0.04
    assert cfg.model_name_or_path == "some/path" and cfg.mask_truncated_completions is True
    assert cfg.reward_funcs == ["accuracy", "format"] and cfg.reward_weights == [1.0, 2.0]


def test_every_field_is_an_option():
    parser = cli._field_parser(GRPOConfig)
    options = {s for a in parser._actions for s in a.option_strings}
    assert {f"--{f}" for f in GRPOConfig.field_names()} <= options


def test_errors_name_the_field(tmp_path, capsys):
    assert cli.main(["train", "--lerning_rate", "1"]) == 2
    assert "did you mean --learning_rate" in capsys.readouterr().err
    assert cli.main(["train", "--loss_type", "nope", "--model", "x"]) == 2
    assert "loss_type" in capsys.readouterr().err
    p = tmp_path / "bad.yaml"
    p.write_text("temprature: 1.0\n")
    assert cli.main(["train", "--config", str(p)]) == 2
    assert "temprature" in capsys.readouterr().err


def test_unimplemented_algorithm_is_clear(capsys):
    for name in ("ppo", "trpo"):
        try:
            cli.load_algorithm(name)
        except cli.CLIError as e:
            assert "not implemented yet" in str(e)
    assert cli.main(["train", "--algorithm", "sac"]) == 2
    assert "expected one of grpo, ppo, trpo" in capsys.readouterr().err


def test_demo_defaults_run_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["train", "--max_steps", "3", "--output_dir", str(out), "--seed", "1", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "mean reward: first" in printed and "reward.png" in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the demo evaluates on its held-out pairs at step 0 (a row of eval_* metrics only) and at the last step
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all("reward" in r and "kl" in r for r in rows[1:])
    assert "eval_reward" in rows[0] and "eval_reward" in rows[-1]
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert (out / "plots" / "reward.png").is_file()
    assert GRPOConfig.from_yaml(str(out / "config.yaml")).max_steps == 3
    # `grpo-fast plot RUN_DIR` into another folder
    assert cli.main(["plot", str(out), "--out", str(tmp_path / "pngs")]) == 0
    pngs = sorted(os.listdir(tmp_path / "pngs"))
    assert "reward.png" in pngs and "overview.png" in pngs and "entropy.png" in pngs
    for name in pngs:
        assert (tmp_path / "pngs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2


def test_train_model_from_path(tmp_path):
    parts = demo.build_demo(0, warmup_steps=5, verbose=False)
    model_dir = tmp_path / "model"
    parts["model"].save_pretrained(model_dir)
    parts["tokenizer"].save_pretrained(model_dir)
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in parts["train_dataset"][:12]))
    rewards_py = tmp_path / "my_rewards.py"
    rewards_py.write_text("def short(prompts, completions, completion_ids, **kw):\n"
                          "    return [1.0 if len(c) <= 2 else 0.0 for c in completions]\n")
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", str(model_dir), "--dataset_path", str(data), "--reward_funcs", "accuracy",
                   f"{rewards_py}:short", "--reward_weights", "1", "0.1", "--max_steps", "2",
                   "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "4",
                   "--output_dir", str(out), "--plot", "false", *FAST])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/short/mean" in rows[-1] and "rewards/accuracy_reward/mean" in rows[-1]
    assert (out / "final" / "model.safetensors").is_file()


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "grpo_fast", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--num_generations" in r.stdout and "--model" in r.stdout
