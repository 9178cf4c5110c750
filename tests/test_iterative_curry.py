"""Curry-DPO on a tiny model: stages of the k-th easiest pairs, each stage re-anchored on the previous
stage's model; the single-stage ordered pass; the reference-margin criterion against a hand computation."""

import json

import pytest
import torch
import yaml
from iterative_fixtures import (
    completion_logp,
    load_weights,
    prompt_rows,
    rated_rows,
    reward_model_dir,  # noqa: F401  (fixture)
    sigint_on_call,
    write_jsonl,
)

from align_cli.iterative.curry import curriculum, run_curry
from align_cli.lifecycle import Interrupted
from align_cli.recipe import load_recipe


def curry_recipe(directory, model_dir, train=None, checkpoint_every=None, **curry):
    directory.mkdir(parents=True, exist_ok=True)
    rated = write_jsonl(directory / "rated.jsonl", rated_rows(8))   # 4 rated responses: 3 pairs per prompt
    recipe = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"train": {"source": str(train or rated)}, "eval_fraction": 0.25, "max_length": 96,
                 "max_prompt_length": 80},
        "method": {"name": "curry_dpo", "losses": [{"name": "dpo", "beta": 0.1}], "curry_dpo": curry},
        "training": {"learning_rate": 1e-3, "batch_size": 2, "num_epochs": 1, "seed": 1, "warmup_ratio": 0.0,
                     "lr_scheduler": "constant"},
        "logging": {"progress": False, "tensorboard": False},
        "checkpointing": {"every": checkpoint_every, "keep_last": 1},
        "evaluation": {"task": None},
        "output": {"dir": str(directory / "run")},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(str(path))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_iterative_stages_reanchor_on_the_previous_stage(tmp_path, tiny_model_dir):
    summary = run_curry(*curry_recipe(tmp_path, tiny_model_dir, stages=2))
    run_dir = tmp_path / "run"
    first, second = (read_jsonl(run_dir / f"stage-{k}" / "pairs.jsonl") for k in (1, 2))
    # Ratings 10, 6, 3, 1: the easiest pair is best vs worst (gap 9), the next best vs 3 (gap 7).
    assert len(first) == len(second) == 8
    assert {r["chosen_score"] - r["rejected_score"] for r in first} == {9.0}
    assert {r["chosen_score"] - r["rejected_score"] for r in second} == {7.0}
    stage_two = yaml.safe_load((run_dir / "stage-2" / "train" / "recipe.yaml").read_text())
    assert stage_two["model"]["name"] == str(run_dir / "stage-1" / "train" / "final_model")
    assert stage_two["reference"]["name"] is None  # the stage's starting model is its reference
    before = json.loads((run_dir / "stage-2" / "train" / "before.json").read_text())
    assert before["rewards/margins"] == 0.0 and before["rewards/chosen"] == 0.0  # reference == init, exactly
    after_first = json.loads((run_dir / "stage-1" / "train" / "summary.json").read_text())["after"]
    assert after_first["rewards/margins"] != 0.0
    assert [row["stage"] for row in summary["stages"]] == [0, 1, 2] and summary["pairs_per_stage"] == [8, 8]


def test_single_stage_is_one_unshuffled_easy_to_hard_pass(tmp_path, tiny_model_dir):
    summary = run_curry(*curry_recipe(tmp_path, tiny_model_dir, variant="single_stage"))
    run_dir = tmp_path / "run"
    rows = read_jsonl(run_dir / "stage-1" / "pairs.jsonl")
    assert [r["chosen_score"] - r["rejected_score"] for r in rows] == [9.0] * 8 + [7.0] * 8 + [4.0] * 8
    inner = yaml.safe_load((run_dir / "stage-1" / "train" / "recipe.yaml").read_text())
    assert inner["training"]["shuffle"] is False and inner["model"]["name"] == str(tiny_model_dir)
    assert not (run_dir / "stage-2").exists() and summary["pairs_per_stage"] == [24]


def test_reference_margin_orders_by_the_reference_log_prob_margin(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    recipe, _ = curry_recipe(tmp_path, tiny_model_dir, criterion="reference_margin")
    rated = read_jsonl(tmp_path / "rated.jsonl")
    rows = [{"prompt": r["prompt"], "responses": [c["response"] for c in r["completions"]],
             "scores": [c["score"] for c in r["completions"]]} for r in rated]
    ordered = curriculum(recipe, rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row, pairs in zip(rows, ordered):
        def margin(pair):
            def logp(text):
                return completion_logp(model, tokenizer, row["prompt"], [{"role": "assistant", "content": text}])
            return logp(pair.chosen) - logp(pair.rejected)

        margins = [margin(pair) for pair in pairs]
        assert len(pairs) == 3 and margins == sorted(margins, reverse=True), margins  # largest margin first


def test_a_curriculum_needs_a_reference_loss(tmp_path, tiny_model_dir):
    from align_cli.errors import UserError

    recipe, path = curry_recipe(tmp_path, tiny_model_dir)
    recipe = recipe.model_copy(update={"method": recipe.method.model_copy(update={"losses": [
        type(recipe.method.losses[0])(name="sft")]})})
    with pytest.raises(UserError, match="reference"):
        run_curry(recipe, path)


def test_resume_in_the_middle_of_a_stage(tmp_path, tiny_model_dir):
    straight = run_curry(*curry_recipe(tmp_path / "straight", tiny_model_dir, stages=2))
    steps_first = straight["stages"][1]["steps"]
    recipe, path = curry_recipe(tmp_path / "killed", tiny_model_dir, checkpoint_every=1, stages=2)
    with pytest.raises(Interrupted):
        run_curry(recipe, path, on_step_end=sigint_on_call(steps_first + 1))  # the first step of stage 2
    run_dir = tmp_path / "killed" / "run"
    assert not (run_dir / "stage-2" / "train" / "summary.json").exists()
    stamps = {name: (run_dir / name).stat().st_mtime_ns for name in
              ("rated.jsonl", "stage-1/pairs.jsonl", "stage-1/train/final_model/model.safetensors", "stage-2/pairs.jsonl")}
    resumed_steps = []
    run_curry(recipe, path, resume=True, on_step_end=resumed_steps.append)
    assert {name: (run_dir / name).stat().st_mtime_ns for name in stamps} == stamps  # nothing redone
    assert resumed_steps and resumed_steps[0] == 2  # continued after the checkpointed step 1 of stage 2
    resumed = load_weights(run_dir / "stage-2" / "train" / "final_model")
    expected = load_weights(tmp_path / "straight" / "run" / "stage-2" / "train" / "final_model")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_generated_responses_are_sampled_and_ranked(tmp_path, tiny_model_dir, reward_model_dir):
    from align_cli.iterative.rankers import RewardModelRanker

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    recipe, path = curry_recipe(tmp_path, tiny_model_dir, train=prompts, responses="generated", samples_per_prompt=3,
                                max_new_tokens=4, temperature=1.0, generation_batch_size=4, stages=1,
                                ranker={"name": "reward_model", "model": str(reward_model_dir)})
    run_curry(recipe, path)
    rated = read_jsonl(tmp_path / "run" / "rated.jsonl")
    assert [row["prompt"] for row in rated] == [row["prompt"] for row in prompt_rows(8)]
    assert all(len(row["responses"]) == 3 and len(set(row["responses"])) > 1 for row in rated)  # sampled, T = 1
    scores = RewardModelRanker(str(reward_model_dir), batch_size=2).score(rated, [row["responses"] for row in rated])
    for row, row_scores in zip(rated, scores):
        assert row["scores"] == pytest.approx(row_scores, abs=1e-5)
    pairs = read_jsonl(tmp_path / "run" / "stage-1" / "pairs.jsonl")
    best = {json.dumps(row["prompt"]): row["responses"][max(range(3), key=lambda i: (row["scores"][i], -i))]
            for row in rated}
    assert pairs and all(pair["chosen"][0]["content"] == best[json.dumps(pair["prompt"])] for pair in pairs)
