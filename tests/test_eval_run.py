"""`align eval` end to end with a tiny random-init model: files, resumption, run directories, several
models in one directory, SRPO revisions, and input errors."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.errors import UserError
from align_cli.eval.formats import read_records, write_json
from align_cli.eval.judges import JudgeSettings
from align_cli.eval.runner import EvalSettings, run_evaluation
from align_cli.generation import SamplingSettings

FAST = SamplingSettings(max_new_tokens=4, batch_size=4)


def _settings(model, out, **overrides):
    values = dict(model=str(model), instructions="builtin:arithmetic_prompts", judge=JudgeSettings(kind="rule"),
                  output_dir=out, limit=4, sampling=FAST)
    values.update(overrides)
    return EvalSettings(**values)


def test_rule_evaluation_writes_alpaca_files_and_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "evals"
    args = ["eval", "--model", str(tiny_model_dir), "--instructions", "builtin:arithmetic_prompts", "--judge", "rule",
            "--limit", "4", "--max-new-tokens", "4", "--output-dir", str(out), "--name", "tiny", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["generated_now"] == 4 and summary["n_total"] == 4
    assert summary["win_rate"] == 0.0 and summary["model_accuracy"] == 0.0  # random weights: never right

    outputs = read_records(out / "tiny" / "model_outputs.json")
    annotations = read_records(out / "tiny" / "rule" / "annotations.json")
    assert [row["generator"] for row in outputs] == ["tiny"] * 4
    assert {"instruction", "output_1", "generator_1", "output_2", "generator_2", "annotator", "preference"} <= set(annotations[0])
    assert annotations[0]["generator_1"] == "gold" and annotations[0]["output_2"] == outputs[0]["output"]
    assert json.loads((out / "tiny" / "rule" / "metrics.json").read_text())["win_rate"] == 0.0
    assert (out / "report.md").is_file() and (out / "win_rates.png").stat().st_size > 1000

    # resumed: answered instructions are read back, not regenerated (an edited answer is judged as written)
    outputs[0]["output"] = annotations[0]["output_1"]
    write_json(out / "tiny" / "model_outputs.json", outputs)
    again = run_evaluation(_settings(tiny_model_dir, out, name="tiny", limit=6))
    assert again["generated_now"] == 2 and again["n_total"] == 6
    assert again["n_draws"] == 1 and again["win_rate"] == pytest.approx(100 * 0.5 / 6)
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert len(rows) == 1 and rows[0]["n_total"] == "6"  # the rerun replaced its row


def test_run_directory_and_a_second_model_in_the_same_directory(tmp_path, tiny_model_dir):
    out = tmp_path / "evals"
    first = run_evaluation(_settings(tiny_model_dir, out, name="base"))
    run_dir = tmp_path / "runs" / "dpo-run"
    shutil.copytree(tiny_model_dir, run_dir / "final_model")
    second = run_evaluation(_settings(run_dir, out, reference=str(out / "base" / "model_outputs.json")))
    assert second["name"] == "dpo-run" and second["reference"] == "base"
    assert second["n_draws"] == 4  # same weights, same greedy answers: every pair is a draw under the rule
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [(r["name"], r["reference"]) for r in rows] == [("base", "gold"), ("dpo-run", "base")]
    assert first["report"] == second["report"] and "dpo-run" in (out / "report.md").read_text()


def test_revisions_chain_answers_through_srpo_templates(tmp_path, tiny_model_dir):
    out = tmp_path / "evals"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "srpo.yaml"  # SRPO's templates, as align generate
    summary = run_evaluation(_settings(tiny_model_dir, out, limit=2, revisions=2, recipe=str(recipe)))
    assert summary["name"].endswith("+revisions2")
    rows = read_records(out / summary["name"] / "model_outputs.json")
    assert all(len(row["revisions"]) == 3 and row["output"] == row["revisions"][-1] for row in rows)
    resumed = run_evaluation(_settings(tiny_model_dir, out, limit=2, revisions=2, recipe=str(recipe)))
    assert resumed["generated_now"] == 0


def test_input_errors_come_before_generation(tmp_path, tiny_model_dir):
    write_json(tmp_path / "refs.json", [{"instruction": "Something else", "output": "x", "generator": "g"}])
    with pytest.raises(UserError, match="no reference output"):
        run_evaluation(_settings(tiny_model_dir, tmp_path / "e", reference=str(tmp_path / "refs.json")))
    write_json(tmp_path / "open.json", [{"instruction": "Write a haiku.", "output": "Leaves", "generator": "g"}])
    with pytest.raises(UserError, match="verifiable answer"):
        run_evaluation(_settings(tiny_model_dir, tmp_path / "e", instructions=str(tmp_path / "open.json")))
    with pytest.raises(UserError, match="--judge-model"):
        run_evaluation(_settings(tiny_model_dir, tmp_path / "e", judge=JudgeSettings(kind="openai")))
    assert not (tmp_path / "e").exists()
