"""Writes the shipped data sets from `align_cli.tasks`: `python -m align_cli.builtin_data.build`.

The files are committed so that a run reads exactly the same rows on every machine; this script
documents how they were made and rewrites them identically (fixed seeds).
"""

import json
import random
from pathlib import Path

from align_cli import tasks
from align_cli.data.triples import rated_to_triple

HERE = Path(__file__).parent
# About 670 distinct problems exist (operands 1-20, products of 2-9): 560 to train on, 100 held out.
TRAIN_PROBLEMS, TEST_PROBLEMS = 560, 100


def _write(name: str, rows: list[dict]) -> None:
    with open(HERE / f"{name}.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    problems = tasks.make_problems(TRAIN_PROBLEMS + TEST_PROBLEMS, seed=1234)
    splits = {"train": problems[:TRAIN_PROBLEMS], "test": problems[TRAIN_PROBLEMS:]}
    for split, split_problems in splits.items():
        rng = random.Random(f"arithmetic-{split}")
        _write(f"arithmetic_pairs.{split}", [tasks.pair_row(p, rng) for p in split_problems])
        rated = [tasks.rated_row(p, rng) for p in split_problems]
        _write(f"arithmetic_rated.{split}", rated)
        # TPO triples from the rated rows: highest score = gold, second = chosen, lowest = rejected.
        _write(f"arithmetic_triples.{split}",
               [{**rated_to_triple(row["prompt"], row["completions"]), "answer": row["answer"]} for row in rated])
        _write(f"arithmetic_prompts.{split}", [tasks.prompt_row(p) for p in split_problems])


if __name__ == "__main__":
    main()
