"""alpaca_eval file formats: reading, joining, round trips, and `align eval metrics`."""

import json

import pytest
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.errors import UserError
from align_cli.eval.formats import (
    join_references,
    load_annotations,
    load_difficulty,
    load_instruction_set,
    model_output_row,
    read_records,
    write_json,
)


def _rows(count, output_prefix="ref"):
    return [{"instruction": f"Question {k}?", "output": f"{output_prefix} {k}", "generator": "gpt4_1106_preview",
             "dataset": "helpful_base"} for k in range(count)]


def test_json_list_and_jsonl_read_the_same(tmp_path):
    rows = _rows(3)
    write_json(tmp_path / "a.json", rows)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_records(tmp_path / "a.json") == read_records(tmp_path / "a.jsonl") == rows


def test_model_outputs_round_trip(tmp_path):
    outputs = [model_output_row(row, f"answer {k}", "my-model") for k, row in enumerate(_rows(3))]
    outputs.append(model_output_row(_rows(4)[3], "final", "my-model", revisions=["first", "final"]))
    write_json(tmp_path / "model_outputs.json", outputs)
    loaded = read_records(tmp_path / "model_outputs.json")
    assert loaded == outputs
    assert set(loaded[0]) == {"instruction", "output", "generator", "dataset"}  # what alpaca_eval reads


def test_annotations_round_trip_and_validation(tmp_path):
    annotations = [{"instruction": "q", "output_1": "a", "generator_1": "ref", "output_2": "b", "generator_2": "m",
                    "annotator": "rule", "preference": p, "raw_completion": None} for p in (1.0, 2.0, None, 1.5)]
    write_json(tmp_path / "annotations.json", annotations)
    assert load_annotations(tmp_path / "annotations.json") == annotations
    write_json(tmp_path / "bad.json", [{"instruction": "q", "output_1": "a", "output_2": "b"}])
    with pytest.raises(UserError, match="no `preference`"):
        load_annotations(tmp_path / "bad.json")
    write_json(tmp_path / "two.json", [{"preference": 1, "generator_2": "a"}, {"preference": 2, "generator_2": "b"}])
    with pytest.raises(UserError, match="2 models"):
        load_annotations(tmp_path / "two.json")


def test_builtin_set_reads_as_alpaca_rows():
    rows = load_instruction_set("builtin:arithmetic_prompts")
    assert len(rows) == 100  # the held-out split
    assert rows[0]["instruction"].startswith("What is ") and rows[0]["output"] == rows[0]["answer"]
    assert len(load_instruction_set("builtin:arithmetic_prompts:train")) == 560


def test_join_names_the_unmatched_instructions(tmp_path):
    instructions = _rows(4)
    references = _rows(2, "gold")
    with pytest.raises(UserError) as missing:
        join_references(instructions, references, "refs.json")
    assert "2 of 4 instructions" in str(missing.value) and "Question 2?" in str(missing.value)
    assert [r["output"] for r in join_references(instructions[:2], list(reversed(references)), "r")] == ["gold 0", "gold 1"]


def test_bad_instruction_files(tmp_path):
    write_json(tmp_path / "dup.json", _rows(2) + _rows(1))
    with pytest.raises(UserError, match="twice"):
        load_instruction_set(str(tmp_path / "dup.json"))
    write_json(tmp_path / "noinst.json", [{"output": "x"}])
    with pytest.raises(UserError, match="no `instruction`"):
        load_instruction_set(str(tmp_path / "noinst.json"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(UserError, match="neither a JSON list"):
        read_records(tmp_path / "broken.json")


def test_difficulty_file_csv_and_json(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,instruction_difficulty\nQuestion 0?,0.5\nQuestion 1?,-1\n")
    write_json(tmp_path / "d.json", [{"instruction": "Question 0?", "instruction_difficulty": 0.5}])
    assert load_difficulty(tmp_path / "d.csv") == {"Question 0?": 0.5, "Question 1?": -1.0}
    assert load_difficulty(tmp_path / "d.json") == {"Question 0?": 0.5}
    (tmp_path / "bad.csv").write_text("instruction,score\nq,1\n")
    with pytest.raises(UserError, match="instruction_difficulty"):
        load_difficulty(tmp_path / "bad.csv")


def test_metrics_command(tmp_path):
    annotations = [{"instruction": f"q{k}", "output_1": "r" * 20, "output_2": "m" * (10 + 3 * k), "generator_1": "ref",
                    "generator_2": "model", "preference": p} for k, p in enumerate([2, 2, 1, 1.5, 1.8, 1.2])]
    write_json(tmp_path / "annotations.json", annotations)
    result = CliRunner().invoke(app, ["eval", "metrics", str(tmp_path / "annotations.json"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["win_rate"] == pytest.approx(100 * (1 + 1 + 0 + 0.5 + 0.8 + 0.2) / 6)
    assert metrics["n_total"] == 6 and metrics["n_draws"] == 1 and metrics["avg_length"] == 17
    assert {"length_controlled_winrate", "lc_standard_error", "discrete_win_rate", "standard_error"} <= set(metrics)
    table = CliRunner().invoke(app, ["eval", "metrics", str(tmp_path / "annotations.json")])
    assert "win_rate" in table.output and "58.33" in table.output


def test_cli_bad_input_exits_2_without_traceback(tmp_path, capsys, monkeypatch):
    import sys

    from align_cli.cli import main

    write_json(tmp_path / "a.json", [{"instruction": "q", "output_1": "a", "output_2": "b"}])
    for argv in (["eval", "metrics", str(tmp_path / "a.json")], ["eval", "metrics", str(tmp_path / "none.json")],
                 ["eval", "--model", "builtin:smollm2-135m-instruct"]):
        monkeypatch.setattr(sys, "argv", ["align", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and "Traceback" not in error
