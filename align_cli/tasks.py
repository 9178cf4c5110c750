"""The verifiable task this project ships: small arithmetic with a strict answer format.

A prompt asks for the value of `a op b` and says to reply with the number alone. A response is
correct only when it is exactly that number (surrounding whitespace and one trailing period
allowed), so both the format and the arithmetic must be right. The embedded instruct model
usually answers in a sentence ("17 + 25 = 42."), which fails the format: preference training
on pairs whose chosen answer is the bare correct number measurably raises strict accuracy.

The same problems feed every shipped data set (pairs, rated responses, gold triples, prompts for
generation and RL), so each method is trained and evaluated on one checkable task.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INSTRUCTION = "Reply with just the number."
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def expression(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    @property
    def question(self) -> str:
        return f"What is {self.expression}? {INSTRUCTION}"


def random_problem(rng: random.Random) -> Problem:
    op = rng.choice("++-*")
    if op == "*":
        return Problem(rng.randint(2, 12), op, rng.randint(2, 9))
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    if op == "-" and b > a:
        a, b = b, a  # keep answers non-negative
    return Problem(a, op, b)


def make_problems(count: int, seed: int) -> list[Problem]:
    """`count` distinct problems drawn with `seed`."""
    rng = random.Random(seed)
    seen: dict[tuple, Problem] = {}
    while len(seen) < count:
        problem = random_problem(rng)
        seen.setdefault((problem.a, problem.op, problem.b), problem)
    return list(seen.values())


def is_correct(response: str, answer: int | str) -> bool:
    """Strict check: the response is the number alone (whitespace and one final period allowed)."""
    text = response.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text == str(answer)


def extract_number(response: str) -> int | None:
    """The last integer in a response (lenient reading, for diagnostics and rewards)."""
    found = _NUMBER.findall(response)
    return int(found[-1]) if found else None


def wrong_answer(problem: Problem, rng: random.Random) -> int:
    """A plausible wrong answer: off by one or ten, or with digits swapped."""
    answer = problem.answer
    candidates = {answer + 1, answer - 1, answer + 10, abs(answer - 10), int(str(answer)[::-1])}
    candidates.discard(answer)
    return rng.choice(sorted(candidates))


def responses(problem: Problem, rng: random.Random) -> list[tuple[str, float]]:
    """Four responses to a problem with ratings: correct and concise is best."""
    wrong = wrong_answer(problem, rng)
    return [
        (str(problem.answer), 10.0),                               # right, right format
        (f"{problem.expression} = {problem.answer}.", 6.0),        # right, wrong format
        (str(wrong), 3.0),                                         # wrong, right format
        (f"{problem.expression} = {wrong}.", 1.0),                 # wrong, wrong format
    ]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def pair_row(problem: Problem, rng: random.Random) -> dict:
    """A preference pair: the best response against one of the three worse ones, chosen at random."""
    rated = responses(problem, rng)
    rejected = rng.choice(rated[1:])[0]
    return {"prompt": _user(problem.question), "chosen": _assistant(rated[0][0]),
            "rejected": _assistant(rejected), "answer": str(problem.answer)}


def rated_row(problem: Problem, rng: random.Random) -> dict:
    """Several rated responses (UltraFeedback-style `completions` with scores)."""
    rated = responses(problem, rng)
    rng.shuffle(rated)
    return {"prompt": _user(problem.question), "answer": str(problem.answer),
            "completions": [{"response": text, "score": score} for text, score in rated]}


def prompt_row(problem: Problem) -> dict:
    return {"prompt": _user(problem.question), "answer": str(problem.answer)}
