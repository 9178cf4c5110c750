"""Writes the shipped data sets from `align_cli.tasks`: `python -m align_cli.builtin_data.build`.

The files are committed so that a run reads exactly the same rows on every machine; this script
documents how they were made and rewrites them identically (fixed seeds).
"""

import argparse
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


# Self-revision pairs: the rejected answer is one of the embedded model's own wrong samples, so SRPO's
# self-improvement policy learns to repair the errors it will be shown at inference (its own y_0), not
# only the synthetic ones above. Made once with the base model and committed like the rest.
SELF_PAIR_SAMPLES, SELF_PAIR_TEMPERATURE, SELF_PAIR_MAX_TOKENS = 4, 1.0, 12


def own_wrong_answer(samples: list[str], answer: str) -> str | None:
    """The first non-empty sample the strict verifier rejects, or None when every sample is right."""
    return next((s.strip() for s in samples if s.strip() and not tasks.is_correct(s, answer)), None)


def self_pair_rows(problems: list, samples: list[list[str]], rng: random.Random) -> list[dict]:
    rows = []
    for problem, drawn in zip(problems, samples):
        synthetic = tasks.pair_row(problem, rng)
        rejected = own_wrong_answer(drawn, problem.target)
        rows.append({**synthetic, "rejected": synthetic["rejected"] if rejected is None
                     else [{"role": "assistant", "content": rejected}]})
    return rows


def build_self_pairs() -> None:
    from align_cli.config import ModelConfig
    from align_cli.engine import open_engine
    from align_cli.generation import SamplingSettings
    from align_cli.models import load_tokenizer, resolve_dtype

    config = ModelConfig()  # the embedded model
    engine = open_engine(config.name, load_tokenizer(config), config, resolve_dtype("float32"), "transformers")
    settings = SamplingSettings(max_new_tokens=SELF_PAIR_MAX_TOKENS, temperature=SELF_PAIR_TEMPERATURE,
                                num_samples=SELF_PAIR_SAMPLES, seed=0, batch_size=32)
    problems = tasks.make_problems(TRAIN_PROBLEMS + TEST_PROBLEMS, seed=1234)
    for split, split_problems in {"train": problems[:TRAIN_PROBLEMS], "test": problems[TRAIN_PROBLEMS:]}.items():
        samples = engine.generate([tasks.prompt_row(p)["prompt"] for p in split_problems], settings)
        _write(f"arithmetic_self_pairs.{split}", self_pair_rows(split_problems, samples, random.Random(f"self-{split}")))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--self-pairs", action="store_true",
                        help="(Re)write arithmetic_self_pairs from the embedded model's own samples (minutes on CPU).")
    if parser.parse_args().self_pairs:
        build_self_pairs()
    else:
        main()
