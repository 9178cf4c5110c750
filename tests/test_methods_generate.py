"""SRPO self-revision at inference: the revision loop, `align generate --revisions K` and its output file."""

import json
import shutil
import sys

import yaml
from conftest import write_jsonl

from align_cli.cli import main
from align_cli.data.render import Templates, generation_prompt, revision_prompt
from align_cli.self_revision import revision_scores, self_revise, templates_for_model

USER = [{"role": "user", "content": "What is 2 + 3? Reply with just the equation and its result."}]


class RecordingEngine:
    """Answers round r with `answer{r}` and records what each round was asked (the loop is under test here,
    not a model)."""

    name = "recording"

    def __init__(self):
        self.asked, self.temperatures = [], []

    def generate(self, prompts, settings):
        self.asked.append(prompts)
        self.temperatures.append(settings.temperature)
        return [[f"answer{len(self.asked) - 1}"] for _ in prompts]


def test_each_revision_sees_the_previous_answer():
    from align_cli.generation import SamplingSettings

    engine = RecordingEngine()
    asked = engine.asked
    templates = Templates(revision="{prompt} | improve: {example}")
    chains = self_revise(engine, [USER, "plain?"], 2, SamplingSettings(), templates)
    assert chains == [["answer0", "answer1", "answer2"]] * 2
    assert asked[0] == [USER, "plain?"], "y_0 answers the unchanged prompt (default generation template)"
    assert asked[1][1] == "plain? | improve: answer0" and asked[2][1] == "plain? | improve: answer1"
    assert asked[2][0][-1]["content"] == USER[0]["content"] + " | improve: answer1"
    assert USER[0]["content"].endswith("result."), "the caller's prompt is not modified"
    assert engine.temperatures == [0.0, 0.0, 0.0]


def test_sampled_drafts_can_be_revised_greedily():
    from align_cli.generation import SamplingSettings

    engine = RecordingEngine()
    self_revise(engine, ["q?"], 2, SamplingSettings(temperature=1.0), revision_settings=SamplingSettings())
    assert engine.temperatures == [1.0, 0.0, 0.0]  # y_0 sampled, y_1 and y_2 greedy


def test_revision_scores_count_wins_and_losses_against_y0():
    chains = [["1 = 1", "wrong", "1 = 1"], ["wrong", "2 = 2", "2 = 2"], ["wrong", "wrong", "3 = 3"]]
    scores = revision_scores(chains, ["1 = 1", "2 = 2", "3 = 3"], lambda text, answer: text == answer)
    assert scores["revision_0/accuracy"] == 1 / 3 and scores["revision_2/accuracy"] == 1.0
    assert (scores["revision_1/wins_vs_0"], scores["revision_1/losses_vs_0"]) == (1, 1)
    assert scores["revision_1/win_rate_vs_0"] == 0.5 and scores["revision_2/win_rate_vs_0"] == 1.0


def test_templates_come_from_the_run_that_trained_the_model(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run_dir / "final_model")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(
        {"method": {"name": "srpo", "srpo": {"revision_template": "{prompt} Previous: {example}. Again:"}},
         "data": {"system_prompt": "Be brief."}}))
    templates, system_prompt, origin = templates_for_model(str(run_dir / "final_model"))
    assert templates.revision == "{prompt} Previous: {example}. Again:" and system_prompt == "Be brief."
    assert origin.endswith("recipe.yaml")
    assert templates_for_model(str(tiny_model_dir))[0] == Templates()


def test_generate_command_writes_every_revision(tmp_path, tiny_model_dir, monkeypatch, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": USER, "answer": "2 + 3 = 5"},
                                                       {"prompt": "Say hi.", "answer": "hi"},
                                                       {"prompt": USER, "answer": "2 + 3 = 5"}])
    output = tmp_path / "out" / "revisions.jsonl"
    monkeypatch.setattr(sys, "argv", ["align", "generate", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                      "--revisions", "2", "--output", str(output), "--max-new-tokens", "3",
                                      "--num-prompts", "2"])
    try:
        main()
    except SystemExit as done:
        assert not done.code
    summary = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 2 and summary["prompts"] == 2 and summary["revisions"] == 2
    for line in lines:
        assert len(line["revisions"]) == 3 and all(isinstance(text, str) for text in line["revisions"])
        assert len(line["correct"]) == 3 and "answer" in line
    assert lines[0]["prompt"] == USER
    assert {"revision_0/accuracy", "revision_2/win_rate_vs_0"} <= set(summary)


def test_srpo_module_is_importable_without_torch_side_effects():
    assert generation_prompt("x", Templates()) == "x"
    assert "{example}" not in revision_prompt("x", "y", Templates())
