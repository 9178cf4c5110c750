"""The shipped arithmetic task: verifier and data sets."""

import random

from align_cli import tasks
from align_cli.data.sources import load_source


def test_strict_verifier():
    assert tasks.is_correct(" 42. ", 42) and tasks.is_correct("42", "42")
    assert not tasks.is_correct("17 + 25 = 42.", 42) and not tasks.is_correct("41", 42)
    assert tasks.extract_number("17 + 25 = 42.") == 42 and tasks.extract_number("none") is None


def test_pairs_prefer_the_correct_concise_answer():
    rng = random.Random(0)
    for problem in tasks.make_problems(50, seed=3):
        row = tasks.pair_row(problem, rng)
        assert tasks.is_correct(row["chosen"][0]["content"], problem.answer)
        assert not tasks.is_correct(row["rejected"][0]["content"], problem.answer)


def test_shipped_files_match_the_generator():
    """The committed files are what `python -m align_cli.builtin_data.build` writes."""
    problems = tasks.make_problems(1400, seed=1234)
    train = load_source("builtin:arithmetic_prompts", "train")
    test = load_source("builtin:arithmetic_prompts", "test")
    assert [r["answer"] for r in train] == [str(p.answer) for p in problems[:1200]]
    assert [r["answer"] for r in test] == [str(p.answer) for p in problems[1200:]]
    train_questions = {r["prompt"][0]["content"] for r in train}
    assert not train_questions & {r["prompt"][0]["content"] for r in test}, "held-out prompts are unseen"
