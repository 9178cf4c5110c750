"""The README's main job, shortened: `align train recipes/dpo.yaml` on the embedded model, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dpo_recipe_runs_on_the_embedded_model(tmp_path):
    overrides = ["training.max_steps=2", "data.max_eval_rows=8", "evaluation.num_prompts=4",
                 "evaluation.max_new_tokens=8", "reference.precompute=false", "checkpointing.every=1", "checkpointing.keep_last=1",
                 "logging.progress=false"]
    command = [sys.executable, "-m", "align_cli.cli", "train", str(ROOT / "recipes" / "dpo.yaml"),
               "--output-dir", str(tmp_path / "run")]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["model"] == "builtin:smollm2-135m-instruct"
    for when in ("before", "after"):
        assert 0.0 <= summary[when]["task_accuracy"] <= 1.0 and summary[when]["rewards/accuracies"] >= 0.0
    assert (run / "final_model" / "config.json").exists() and (run / "metrics.jsonl").exists()
    assert summary["after"]["loss"] < summary["before"]["loss"], "two DPO steps lower the held-out loss"
