"""Rankers: score the K sampled responses of each prompt, so iterative methods can build preference pairs.

Every ranker returns one float per response (higher is better); pair builders read them and treat
equal scores as ties (no preference: the pair is dropped). Three kinds, chosen in a recipe's
`method.<apo|curry_dpo>.ranker`:

- `rule`: the shipped task's verifier in four explicit tiers (a row needs an `answer`): 1.0 exactly
  right (`tasks.is_correct`: the bare equation with the right result), 0.5 the right result in a
  wrong format, 0.25 the bare-equation format with a wrong result, 0 otherwise. The middle tiers
  give a preference between two wrong answers, which is what a small model learns the format from.
- `reward_model`: a Hugging Face sequence-classification model with one output, batched; the score
  is its logit for (prompt, response) rendered with the reward model's chat template.
- `judge`: an OpenAI-compatible chat endpoint judging pairs (the evaluation judge of
  `align_cli.eval.judges.openai_judge`: alpaca_eval's weighted protocol, retries with backoff, disk
  cache). Each response meets every other of its prompt once (K(K-1)/2 calls); its score is the sum of
  its win probabilities, the round-robin ranking that PairRM gives the SPPO/APO pipelines. The base URL
  and the key come from environment variables named in the recipe.

SPPO's soft targets: each ranker also turns a prompt's K scores into win probabilities against the
sampling policy, `P(y_i > pi) = (1/K) sum_j P(y_i > y_j)` over all K samples, the self-comparison
counting 1/2, as the SPPO authors' pipeline does (github.com/uclaml/SPPO, scripts/compute_prob.py,
with a Bradley-Terry `P(y_i > y_j) = sigmoid(s_i - s_j)` on PairRM scores).
"""

from __future__ import annotations

import math
import os
import re
from itertools import combinations
from pathlib import Path

from .. import tasks
from ..errors import UserError

_EQUATION = re.compile(r"\s*-?\d+\s*[-+*]\s*-?\d+\s*=\s*-?\d+\s*\.?\s*")


def _instruction(prompt) -> str:
    """The text a judge sees: the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def mean_pairwise_preference(scores: list[float], prefers) -> list[float]:
    """`P(y_i > pi)`: the mean of `prefers(s_i, s_j)` over every j, i itself included."""
    return [sum(prefers(mine, other) for other in scores) / len(scores) for mine in scores]


def _step(mine: float, other: float) -> float:
    return 1.0 if mine > other else 0.5 if mine == other else 0.0


def _bradley_terry(mine: float, other: float) -> float:
    return 1.0 / (1.0 + math.exp(other - mine))


class RuleRanker:
    name = "rule"

    @staticmethod
    def win_probabilities(scores: list[float]) -> list[float]:
        """A verifier's tiers are an order, not a scale: the better response wins outright, equals split."""
        return mean_pairwise_preference(scores, _step)

    @staticmethod
    def score_one(response: str, answer: str) -> float:
        if tasks.is_correct(response, answer):
            return 1.0
        if tasks.is_correct_lenient(response, answer):
            return 0.5
        return 0.25 if _EQUATION.fullmatch(response) else 0.0

    def score(self, rows: list[dict], samples: list[list[str]]) -> list[list[float]]:
        missing = [i for i, row in enumerate(rows) if row.get("answer") is None]
        if missing:
            raise UserError(f"The rule ranker checks each response against the prompt's `answer`; {len(missing)} of "
                            f"{len(rows)} prompts have none (first: {_instruction(rows[missing[0]]['prompt'])[:70]!r}). "
                            f"Use prompts with an `answer` column (builtin:arithmetic_prompts) or another ranker.")
        return [[self.score_one(text, row["answer"]) for text in texts] for row, texts in zip(rows, samples)]


class RewardModelRanker:
    """Scores with `align_cli.reward_model.RewardModelScorer` (the scorer of online RL's reward and of
    `align eval`'s judge): the full conversation, in the reward model's chat template when it has one."""

    def __init__(self, location: str, batch_size: int):
        from ..reward_model import RewardModelScorer

        self.scorer = RewardModelScorer(location, batch_size=batch_size)
        self.name = self.scorer.name

    @staticmethod
    def win_probabilities(scores: list[float]) -> list[float]:
        """Rewards are Bradley-Terry logits: `P(y_i > y_j) = sigmoid(r_i - r_j)`."""
        return mean_pairwise_preference(scores, _bradley_terry)

    def score(self, rows: list[dict], samples: list[list[str]]) -> list[list[float]]:
        prompts = [row["prompt"] for row, texts in zip(rows, samples) for _ in texts]
        flat = self.scorer.score(prompts, [text for texts in samples for text in texts])
        scores, start = [], 0
        for texts in samples:
            scores.append(flat[start: start + len(texts)])
            start += len(texts)
        return scores


class JudgeRanker:
    """Round-robin pairwise judging of each prompt's responses through an OpenAI-compatible endpoint."""

    def __init__(self, judge):
        self.judge = judge
        self.name = judge.name

    @staticmethod
    def win_probabilities(scores: list[float]) -> list[float]:
        """A score is the sum of the judge's verdicts against the K-1 others; with the self-comparison's 1/2
        this is exactly the mean over all K."""
        return [(score + 0.5) / len(scores) for score in scores]

    def score(self, rows: list[dict], samples: list[list[str]]) -> list[list[float]]:
        questions, owners = [], []
        for index, (row, texts) in enumerate(zip(rows, samples)):
            for first, second in combinations(range(len(texts)), 2):
                questions.append({"instruction": _instruction(row["prompt"]), "output_1": texts[first],
                                  "output_2": texts[second]})
                owners.append((index, first, second))
        verdicts = self.judge.judge(questions)
        scores = [[0.0] * len(texts) for texts in samples]
        for (index, first, second), verdict in zip(owners, verdicts):
            preference = verdict["preference"]
            # alpaca_eval's 1..2 scale: 2 means output_2 wins; no judgment counts as an even split.
            second_wins = 0.5 if preference is None else float(preference) - 1.0
            scores[index][second] += second_wins
            scores[index][first] += 1.0 - second_wins
        return scores


def win_probabilities(ranker_name: str, scores: list[float]) -> list[float]:
    """SPPO's `P(y_i > pi)` for each of a prompt's responses, from the scores of the ranker named `ranker_name`
    (no ranker is loaded: the conversion depends only on what kind of score it is)."""
    kinds = {"rule": RuleRanker, "reward_model": RewardModelRanker, "judge": JudgeRanker}
    return kinds[ranker_name].win_probabilities(scores)


def make_ranker(config, cache_dir: Path | None = None):
    """The ranker a recipe's `ranker:` section names; `cache_dir` holds the judge's verdict cache."""
    if config.name == "rule":
        return RuleRanker()
    if config.name == "reward_model":
        if not config.model:
            raise UserError("ranker.name reward_model needs ranker.model: a local sequence-classification model directory.")
        return RewardModelRanker(config.model, config.batch_size)
    if config.name == "judge":
        from ..eval.judges.cache import JudgmentCache
        from ..eval.judges.openai_judge import OpenAIJudge

        base_url = os.environ.get(config.base_url_env)
        if not base_url:
            raise UserError(f"ranker.name judge reads the endpoint's base URL from ${config.base_url_env}, which is not "
                            f"set. Export it (e.g. http://127.0.0.1:8000/v1) and the key in ${config.api_key_env}.")
        if not config.model:
            raise UserError("ranker.name judge needs ranker.model: the model name the endpoint serves.")
        cache = JudgmentCache(cache_dir / "judgments.jsonl" if cache_dir else None)
        return JudgeRanker(OpenAIJudge(config.model, base_url, config.api_key_env, concurrency=config.concurrency,
                                       max_retries=config.max_retries, cache=cache))
    raise UserError(f"Unknown ranker '{config.name}'; choose rule, reward_model or judge.")
