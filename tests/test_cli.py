"""The command line: help, recipes, validate, env, and the bad-input battery (exit 2, no traceback)."""

import subprocess
import sys

import pytest
import yaml
from conftest import align


def test_help_lists_commands(monkeypatch, capsys):
    code, out, _ = align(monkeypatch, capsys, "--help")
    assert code == 0 and all(name in out for name in ("train", "validate", "recipes", "env"))


def test_recipes_list_show_and_schema(monkeypatch, capsys):
    code, out, _ = align(monkeypatch, capsys, "recipes")
    assert code == 0 and "dpo" in out
    code, out, _ = align(monkeypatch, capsys, "recipes", "show", "dpo")
    assert code == 0 and yaml.safe_load(out)["method"]["name"] == "dpo"
    code, out, _ = align(monkeypatch, capsys, "recipes", "show", "--schema")
    assert code == 0 and "training.learning_rate" in out and "reference.precompute" in out


def test_validate_and_env(monkeypatch, capsys):
    code, out, _ = align(monkeypatch, capsys, "validate", "recipes/dpo.yaml", "--set", "training.learning_rate=1e-6")
    assert code == 0 and "valid" in out
    code, out, _ = align(monkeypatch, capsys, "env")
    assert code == 0 and "torch" in out and "deepspeed" in out and "cuda available" in out


def _recipe(tmp_path, tiny_model_dir, data_path, **data):
    recipe = {"model": {"name": str(tiny_model_dir)},
              "data": {"train": {"source": str(data_path)}, **data},
              "training": {"max_steps": 1, "batch_size": 1}, "logging": {"progress": False},
              "evaluation": {"task": None}, "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _jsonl(tmp_path, rows, name="d.jsonl"):
    import json

    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROW = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "a"}],
       "rejected": [{"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("case, expected", [
    ("unknown_key", r"unknown key 'training.learnig_rate'.*Did you mean 'learning_rate'"),
    ("wrong_type", r"training.max_steps.*'many'"),
    ("missing_recipe", r"does not exist"),
    ("missing_data", r"Data file .*nope.jsonl' does not exist"),
    ("missing_column", r"no column 'rejected'.*Columns found: chosen, prompt"),
    ("empty_dataset", r"is empty|no rows"),
    ("long_prompts", r"every prompt is longer than data.max_prompt_length"),
    ("missing_model", r"Model directory .* does not exist"),
])
def test_bad_input_gives_one_clear_message_and_exit_2(case, expected, tmp_path, tiny_model_dir, monkeypatch, capsys):
    good = _jsonl(tmp_path, [ROW] * 4)
    recipe = lambda data, **extra: str(_recipe(tmp_path, tiny_model_dir, data, **extra))  # noqa: E731
    arguments = {  # built lazily: each case writes its own recipe file
        "unknown_key": lambda: ["train", recipe(good), "--set", "training.learnig_rate=1"],
        "wrong_type": lambda: ["train", recipe(good), "--set", "training.max_steps=many"],
        "missing_recipe": lambda: ["train", str(tmp_path / "absent.yaml")],
        "missing_data": lambda: ["train", recipe("./nope.jsonl")],
        "missing_column": lambda: ["train", recipe(_jsonl(tmp_path, [{"prompt": "p", "chosen": "c"}]))],
        "empty_dataset": lambda: ["train", recipe(_jsonl(tmp_path, [], "empty.jsonl"))],
        "long_prompts": lambda: ["train", recipe(good, max_length=16, max_prompt_length=8)],
        "missing_model": lambda: ["train", recipe(good), "--set", "model.name=./no-model"],
    }[case]()
    code, out, err = align(monkeypatch, capsys, *arguments)
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    import re

    assert re.search(expected, err), err


def test_user_error_in_a_real_process_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "align_cli.cli", "train", str(tmp_path / "absent.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "does not exist" in done.stderr
