"""The verifiable task this project ships: small arithmetic with a strict answer format.

A prompt asks for `a op b` and says to reply with just the equation and its result. A response is
correct only when it is exactly that equation with the right result ("17 - 16 = 1"; whitespace
and one final period allowed), so both the format and the arithmetic must be right. The embedded
135M instruct model gets about 30% of held-out prompts strictly right: it often explains
("To solve this equation, ...") or keeps talking after the result. The equation is the format
(not the bare number) because a model this small computes the result only while writing the
expression out: trained to give bare numbers, it loses its arithmetic.

The same problems feed every shipped data set (pairs, rated responses, gold triples, prompts for
generation and RL), so each method is trained and evaluated on one checkable task.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INSTRUCTION = "Reply with just the equation and its result."
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

    @property
    def target(self) -> str:
        """The canonical correct response."""
        return f"{self.expression} = {self.answer}"


def random_problem(rng: random.Random) -> Problem:
    op = rng.choice("++-*")
    if op == "*":
        return Problem(rng.randint(2, 9), op, rng.randint(2, 9))
    a, b = rng.randint(1, 20), rng.randint(1, 20)
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


def _normalise(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:-1].rstrip() if text.endswith(".") else text


def is_correct(response: str, answer: int | str) -> bool:
    """Strict check: the response is exactly the expected answer (a row's `answer`, e.g.
    "17 - 16 = 1"), up to whitespace and one final period."""
    return _normalise(response) == _normalise(answer)


def extract_number(response: str) -> int | None:
    """The last integer in a text (lenient reading, for diagnostics and rewards)."""
    found = _NUMBER.findall(str(response))
    return int(found[-1]) if found else None


def is_correct_lenient(response: str, answer: int | str) -> bool:
    """The response's last number is the expected result, whatever the format."""
    expected = extract_number(answer)
    return expected is not None and extract_number(response) == expected


def wrong_answer(problem: Problem, rng: random.Random) -> int:
    """A plausible wrong result: off by one, two or ten, or with digits swapped."""
    answer = problem.answer
    candidates = {answer + 1, answer - 1, answer + 2, answer + 10, abs(answer - 10), int(str(answer)[::-1])}
    candidates.discard(answer)
    return rng.choice(sorted(candidates))


_OPERATION_NAMES = {"+": "addition", "-": "subtraction", "*": "multiplication"}


def responses(problem: Problem, rng: random.Random) -> list[tuple[str, float]]:
    """Four responses to a problem with ratings: the correct bare equation is best. The wordy ones
    imitate the embedded model's own failure: the right equation, then more text."""
    wrong = wrong_answer(problem, rng)
    chatter = f"\n\nThis is a simple {_OPERATION_NAMES[problem.op]} problem."
    return [
        (problem.target, 10.0),                                 # right, right format
        (problem.target + chatter, 6.0),                        # right, keeps talking
        (f"{problem.expression} = {wrong}", 3.0),               # wrong result
        (f"{problem.expression} = {wrong}" + chatter, 1.0),     # wrong and keeps talking
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
            "rejected": _assistant(rejected), "answer": problem.target}


def rated_row(problem: Problem, rng: random.Random) -> dict:
    """Several rated responses (UltraFeedback-style `completions` with scores)."""
    rated = responses(problem, rng)
    rng.shuffle(rated)
    return {"prompt": _user(problem.question), "answer": problem.target,
            "completions": [{"response": text, "score": score} for text, score in rated]}


def prompt_row(problem: Problem) -> dict:
    return {"prompt": _user(problem.question), "answer": problem.target}
