"""Bad data and bad loss hyperparameters stop a run with a message naming the file, the line or row, the key
and a fix; implicit prompts are taken only where they can be found without guessing; the prompt/completion
boundary is tokenised as TRL 1.16 does."""

import re
import warnings

import pytest
from align_cli.losses import LOSSES, hyperparameter_ranges, hyperparameters
from conftest import align, write_jsonl
from datasets import Dataset

from align_cli.config import DataSource
from align_cli.data.preference import TokenisationSettings, normalise_rows, tokenise_preferences
from align_cli.data.rows import split_at_turn_marker
from align_cli.data.sources import load_source
from align_cli.errors import UserError
from align_cli.recipe import load_recipe

SETTINGS = TokenisationSettings(max_length=256, max_prompt_length=192)


def load_rows(path, **columns):
    """What a run does with `data.train.source: path`: load, map columns, check rows."""
    source = DataSource(source=str(path), columns=columns) if columns else DataSource(source=str(path))
    return normalise_rows(load_source(str(path)), source)


# --- loss hyperparameter ranges --------------------------------------------------------------------------------

@pytest.mark.parametrize("loss, key, value, requirement", [
    ("dpo", "beta", -0.1, "(0, inf)"),
    ("ipo", "beta", 0.0, "(0, inf)"),
    ("cdpo", "label_smoothing", 0.5, "[0, 0.5)"),
    ("rdpo", "label_smoothing", 0.5, "[0, 0.5)"),
    ("fdpo", "alpha", 1.0, "(0, 1)"),
    ("fdpo", "divergence", "hellinger", "one of 'reverse_kl'"),
    ("tpo", "alpha", -1.0, "[0, inf)"),
    ("tpo_l", "gamma", -0.5, "[0, inf)"),
    ("srpo", "a", 1.5, "[0, 1]"),
    ("sppo", "beta", -0.001, "(0, inf)"),
])
def test_out_of_range_hyperparameter_names_file_key_and_range(tmp_path, loss, key, value, requirement):
    method = {"tpo": "tpo", "tpo_l": "tpo", "srpo": "srpo"}.get(loss, "dpo")
    path = tmp_path / "bad.yaml"
    path.write_text(f"method:\n  name: {method}\n  losses:\n    - name: {loss}\n      {key}: {value!r}\n")
    with pytest.raises(UserError) as caught:
        load_recipe(str(path))
    message = str(caught.value)
    assert f"{path}, line 5: method.losses.0.{key} = {value!r} is out of range" in message
    assert requirement in message


def test_grpo_clip_range_and_negative_weight(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("method:\n  name: grpo\n  losses:\n    - name: grpo\n      eps_low: 1.0\n")
    with pytest.raises(UserError, match=r"method.losses.0.eps_low = 1.0 is out of range.*\[0, 1\)"):
        load_recipe(str(path))
    path.write_text("method:\n  losses:\n    - name: dpo\n      weight: -1.0\n")
    with pytest.raises(UserError, match=r"line 4: method.losses.0.weight: Input should be greater than or equal to 0"):
        load_recipe(str(path))


def test_set_override_can_fix_a_bad_value_and_is_itself_checked(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method:\n  losses:\n    - name: dpo\n      beta: -0.1\n")
    recipe, _ = load_recipe(str(path), ["method.losses.0.beta=0.2"])
    assert recipe.method.losses[0].params == {"beta": 0.2}
    with pytest.raises(UserError, match=r"method.losses.0.beta = '1e-3' is out of range.*decimal point"):
        load_recipe(str(path), ["method.losses.0.beta=1e-3"])  # YAML 1.1 reads 1e-3 as text


def test_validate_command_exits_2_on_negative_beta(tmp_path, monkeypatch, capsys):
    path = tmp_path / "neg.yaml"
    path.write_text("method:\n  losses:\n    - name: dpo\n      beta: -0.1\n")
    code, out, err = align(monkeypatch, capsys, "validate", str(path))
    assert code == 2 and "method.losses.0.beta" in out + err and "Traceback" not in out + err


def test_every_loss_default_lies_in_its_declared_range():
    for name, function in LOSSES.items():
        defaults = hyperparameters(function)
        for key, requirement in hyperparameter_ranges(function).items():
            assert requirement.contains(defaults[key]), (name, key, defaults[key], str(requirement))
        assert name == "sft" or hyperparameter_ranges(function), f"{name} declares no ranges"


def test_direct_calls_use_the_same_ranges():
    import torch

    t = {n: torch.zeros(2) for n in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")}
    with pytest.raises(ValueError, match=r"cdpo: label_smoothing \(probability the label is wrong\) in \[0, 0.5\)"):
        LOSSES["cdpo"](**t, label_smoothing=0.5)


@pytest.mark.parametrize("rows, expected", [
    ([{"chosen": "The answer is 4.", "rejected": "The answer is 5."}] * 4,
     r"line 1: the row has no prompt.*Set data.train.columns.prompt"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p", "rejected": "b"}],
     r"line 4: the row has no 'chosen'"),
])
def test_train_exits_2_on_bad_rows(tmp_path, tiny_model_dir, monkeypatch, capsys, rows, expected):
    import yaml

    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = {"model": {"name": str(tiny_model_dir)}, "data": {"train": {"source": str(data)}},
              "training": {"max_steps": 1, "batch_size": 1}, "logging": {"progress": False},
              "evaluation": {"task": None}, "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, err = align(monkeypatch, capsys, "train", str(path))
    assert code == 2 and "Traceback" not in out + err
    assert re.search(expected, err), err


# --- unreadable files and rows -----------------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


def test_malformed_json_line_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "p", "chosen": "a" "rejected": "b"}\n')
    with pytest.raises(UserError, match=rf"Data file '{path}', line 3, column 31: not valid JSON"):
        load_source(str(path))


def test_non_utf8_byte_names_line_and_key(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                     b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}\n')
    with pytest.raises(UserError, match=r"line 2, key 'chosen', byte \d+: byte 0xe9 is not UTF-8"):
        load_source(str(path))
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"prompt,chosen,rejected\np,caf\xe9,b\n")
    with pytest.raises(UserError, match=r"latin1.csv', line 2, byte 6: byte 0xe9 is not UTF-8"):
        load_source(str(csv))


def test_row_missing_chosen_names_line_and_key(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, {"prompt": "p", "rejected": "b"}])
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # a blank line: rows and lines differ
    with pytest.raises(UserError, match=rf"'{path}', line 3: the row has no 'chosen' \(the key is missing or null\)"):
        load_rows(path)


def test_mistyped_value_names_row_and_key():
    source = DataSource(source="hub/set")
    rows = Dataset.from_list([GOOD, {"prompt": "p", "chosen": "a", "rejected": "b"}, {**GOOD, "rejected": None}])
    with pytest.raises(UserError, match=r"'hub/set', row 3: the row has no 'rejected'"):
        normalise_rows(rows, source)


def test_empty_and_identical_pairs_are_dropped_with_a_count(tmp_path):
    rows = [GOOD, {**GOOD, "chosen": "  "}, {**GOOD, "chosen": "b"}, {**GOOD, "chosen": "c"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 rows: 1 with an empty chosen answer, 1 whose chosen answer "
                                         r"equals the rejected one"):
        kept = load_rows(path)
    assert kept["chosen"] == ["a", "c"]
    chat = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": ""}],
             "rejected": [{"role": "assistant", "content": "x"}]}]
    with pytest.raises(UserError, match=r"no usable preference pair among its 1 rows \(1 with an empty chosen"):
        normalise_rows(Dataset.from_list(chat), DataSource(source="chat.jsonl"))


def test_all_identical_pairs_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [{**GOOD, "rejected": "a"}] * 3)
    with pytest.raises(UserError, match=r"0 with an empty chosen answer, 3 with chosen identical to rejected"):
        load_rows(path)


# --- implicit prompts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chosen, rejected", [
    ("The answer is 4.", "The answer is 5."),      # shared words: the old rule took them as the prompt
    ("Four.", "It is five, I think."),             # nothing shared: the old rule crashed on an empty prompt
])
def test_plain_text_without_prompt_column_asks_for_one(tmp_path, tokenizer, chosen, rejected):
    path = write_jsonl(tmp_path / "noprompt.jsonl", [{"question": "2+2?", "chosen": chosen, "rejected": rejected}])
    with pytest.raises(UserError, match=r"line 1: the row has no prompt, and its text has no recognised turn marker.*"
                                        r"Set data.train.columns.prompt"):
        load_rows(path)
    with pytest.raises(UserError, match=r"row 1: the row has no prompt.*data.train.columns.prompt"):
        tokenise_preferences(Dataset.from_list([{"chosen": chosen, "rejected": rejected}]), tokenizer, SETTINGS, "t")


HH_ROWS = [
    {"chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?"
               "\n\nAssistant: Rome is the capital of Italy.",
     "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?"
                 "\n\nAssistant: Paris again."},
    {"chosen": "\n\nHuman: Can you help me write a poem?\n\nAssistant: Sure, what about?\n\nHuman: The sea."
               "\n\nAssistant: Waves fold in grey light,\nsalt on the wind.",
     "rejected": "\n\nHuman: Can you help me write a poem?\n\nAssistant: Sure, what about?\n\nHuman: The sea."
                 "\n\nAssistant: Sure, what about?"},  # the answers share a long prefix with an earlier turn
]


def trl_hh_split(text: str) -> tuple[str, str]:
    """TRL's Anthropic HH conversion: the prompt runs up to and including the last "\\n\\nAssistant:"."""
    end = text.rfind("\n\nAssistant:") + len("\n\nAssistant:")
    return text[:end], text[end:]


def test_hh_rlhf_text_splits_at_the_last_assistant_turn(tmp_path, tokenizer):
    rows = load_rows(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS))
    for row, raw in zip(rows, HH_ROWS):
        prompt, chosen = trl_hh_split(raw["chosen"])
        assert (row["prompt"], row["chosen"], row["rejected"]) == (prompt, chosen, trl_hh_split(raw["rejected"])[1])
    assert rows[1]["rejected"] == " Sure, what about?"  # not the empty tail of a character-prefix split
    data, _ = tokenise_preferences(Dataset.from_list(HH_ROWS), tokenizer, SETTINGS, "hh")
    assert tokenizer.decode(data[0]["chosen_ids"]) == " Rome is the capital of Italy." + tokenizer.eos_token


def test_hh_rejected_must_continue_the_same_prompt():
    with pytest.raises(ValueError, match="does not continue the conversation"):
        split_at_turn_marker("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: other\n\nAssistant: c")


# --- the prompt/completion token boundary -------------------------------------------------------------------------

def test_prompt_ending_in_a_space_is_tokenised_with_its_completion(tokenizer):
    rows = [{"prompt": "Question: what is 2 + 2?\nAnswer: ", "chosen": "four", "rejected": "five"},
            {"prompt": "Question: what is 3 + 3?\nAnswer:", "chosen": " six", "rejected": " seven"}]
    with pytest.warns(UserWarning, match=r"in 1 of 2 rows the prompt's last tokens merge with the completion's first"):
        data, report = tokenise_preferences(Dataset.from_list(rows), tokenizer, SETTINGS, "t")
    assert report["moved_prompt_boundaries"] == 1
    for row, raw in zip(data, rows):
        for name in ("chosen", "rejected"):
            whole = tokenizer(raw["prompt"] + raw[name] + tokenizer.eos_token)["input_ids"]
            assert row["prompt_ids"] + row[f"{name}_ids"] == whole
    lone_space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    assert data[0]["prompt_ids"][-len(lone_space):] != lone_space
    assert tokenizer.decode(data[0]["chosen_ids"]) == " four" + tokenizer.eos_token


def test_chat_prompts_keep_their_boundary(tokenizer):
    user = [{"role": "user", "content": "2+2?"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data, report = tokenise_preferences(Dataset.from_list(rows), tokenizer, SETTINGS, "t")
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert data[0]["prompt_ids"] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert report["moved_prompt_boundaries"] == 0


def test_tokenisation_version_changes_the_cache_fingerprint(tokenizer):
    """`datasets` hashes `tokenise_pair` by its own code only, so a tokenisation change must show in its
    arguments, or a file's cached tokenisation (and the reference log-prob cache keyed by it) would be reused."""
    from dataclasses import replace

    rows = Dataset.from_list([GOOD])
    current, _ = tokenise_preferences(rows, tokenizer, SETTINGS, "t")
    older, _ = tokenise_preferences(rows, tokenizer, replace(SETTINGS, tokenisation_version=1), "t")
    assert current._fingerprint != older._fingerprint
