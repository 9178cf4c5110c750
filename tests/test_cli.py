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


# ---- align generate and align eval ask a prompt the same way ----------------------------------------------------

ARITHMETIC = ["What is 1 + 6? Reply with just the equation and its result.",
              "What is 10 - 5? Reply with just the equation and its result."]


def test_instruction_strings_become_one_user_message_under_the_chat_template(tokenizer):
    from align_cli.data.render import render_prompts
    from align_cli.generation import instruction_prompt

    messages = [{"role": "user", "content": ARITHMETIC[0]}]
    assert instruction_prompt(ARITHMETIC[0]) == messages and instruction_prompt(ARITHMETIC[0], raw=True) == ARITHMETIC[0]
    assert instruction_prompt(messages, raw=True) == messages  # chat messages always need the template
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_prompts(tokenizer, [instruction_prompt(ARITHMETIC[0])]) == [expected]
    assert expected.startswith("<|im_start|>") and expected.endswith("<|im_start|>assistant\n")


def _generated(monkeypatch, capsys, tmp_path, model, *extra):
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ARITHMETIC))
    output = tmp_path / "generated.jsonl"
    code, out, err = align(monkeypatch, capsys, "generate", "--model", model, "--prompts", str(prompts), "--output",
                           str(output), "--max-new-tokens", "12", "--engine", "transformers", *extra)
    assert code == 0, err
    return [json.loads(line)["revisions"][0] for line in output.read_text().splitlines()], json.loads(out)


def test_generate_answers_string_prompts_of_the_embedded_model(monkeypatch, capsys, tmp_path):
    # Without the chat template the instruct model ends the first prompt at once: "" (exit 0) before the fix.
    answers, _ = _generated(monkeypatch, capsys, tmp_path, "builtin:smollm2-135m-instruct")
    assert len(answers) == 2 and all(answer.strip() for answer in answers), answers


def test_generate_and_eval_ask_a_run_directory_the_same_way(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import json
    import shutil

    run_dir = tmp_path / "run"  # as align train leaves it: `--model RUN_DIR` means its final_model
    shutil.copytree(tiny_model_dir, run_dir / "final_model")
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({"instruction": text, "output": "x", "answer": "7"}) + "\n"
                                    for text in ARITHMETIC))
    answers = {}
    for mode in ([], ["--raw"]):
        generated, summary = _generated(monkeypatch, capsys, tmp_path, str(run_dir), *mode)
        assert summary["model"] == str(run_dir / "final_model") and summary["raw"] == bool(mode)
        code, _, err = align(monkeypatch, capsys, "eval", "--model", str(run_dir), "--instructions", str(instructions),
                             "--judge", "rule", "--max-new-tokens", "12", "--engine", "transformers", "--output-dir",
                             str(tmp_path / "eval"), "--json", *mode)
        assert code == 0, err
        name = "run+raw" if mode else "run"
        evaluated = json.loads((tmp_path / "eval" / name / "model_outputs.json").read_text())
        # Greedy decoding of one model: equal answers mean equal prompts (eval strips its answers).
        assert [answer.strip() for answer in generated] == [row["output"] for row in evaluated]
        answers[name] = generated
    assert answers["run"] != answers["run+raw"]  # the chat template is what makes them differ
