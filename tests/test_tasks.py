"""The shipped arithmetic task: verifier and data sets."""

import random

from align_cli import tasks
from align_cli.builtin_data.build import TEST_PROBLEMS, TRAIN_PROBLEMS
from align_cli.data.sources import load_source


def test_strict_and_lenient_verifiers():
    assert tasks.is_correct(" 17 - 16 = 1. ", "17 - 16 = 1") and tasks.is_correct("17  -  16 = 1", "17 - 16 = 1")
    assert not tasks.is_correct("17 - 16 = 1\n\nThe answer is 1.", "17 - 16 = 1")
    assert not tasks.is_correct("17 - 16 = 2", "17 - 16 = 1")
    assert tasks.is_correct_lenient("The answer is 1.", "17 - 16 = 1")
    assert not tasks.is_correct_lenient("none", "17 - 16 = 1")
    assert tasks.extract_number("17 + 25 = 42.") == 42 and tasks.extract_number("none") is None


def test_pairs_prefer_the_correct_equation():
    rng = random.Random(0)
    for problem in tasks.make_problems(50, seed=3):
        row = tasks.pair_row(problem, rng)
        assert tasks.is_correct(row["chosen"][0]["content"], row["answer"])
        assert not tasks.is_correct(row["rejected"][0]["content"], row["answer"])
        assert eval(problem.expression) == problem.answer


def test_shipped_files_match_the_generator():
    """The committed files are what `python -m align_cli.builtin_data.build` writes."""
    problems = tasks.make_problems(TRAIN_PROBLEMS + TEST_PROBLEMS, seed=1234)
    train = load_source("builtin:arithmetic_prompts", "train")
    test = load_source("builtin:arithmetic_prompts", "test")
    assert [r["answer"] for r in train] == [p.target for p in problems[:TRAIN_PROBLEMS]]
    assert [r["answer"] for r in test] == [p.target for p in problems[TRAIN_PROBLEMS:]]
    train_questions = {r["prompt"][0]["content"] for r in train}
    assert not train_questions & {r["prompt"][0]["content"] for r in test}, "held-out prompts are unseen"


def test_self_pairs_reject_the_models_own_wrong_samples():
    from align_cli.builtin_data.build import own_wrong_answer, self_pair_rows

    problem = tasks.make_problems(1, seed=3)[0]
    assert own_wrong_answer([problem.target, "  ", f" {problem.expression} = 0 ", "later"], problem.target) == \
        f"{problem.expression} = 0"
    assert own_wrong_answer([problem.target, problem.target + "."], problem.target) is None
    rows = self_pair_rows([problem, problem], [["I think it is 3"], [problem.target]], random.Random(0))
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "I think it is 3"}]
    assert not tasks.is_correct(rows[1]["rejected"][0]["content"], problem.target)  # all right: a synthetic one

    prompts = load_source("builtin:arithmetic_prompts", "train")
    shipped = load_source("builtin:arithmetic_self_pairs", "train")
    assert [r["prompt"] for r in shipped] == [r["prompt"] for r in prompts]
    for row in shipped:
        assert tasks.is_correct(row["chosen"][0]["content"], row["answer"])
        assert not tasks.is_correct(row["rejected"][0]["content"], row["answer"])
