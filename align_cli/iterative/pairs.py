"""Preference pairs from scored responses: APO's best-vs-worst pair, and Curry-DPO's curriculum.

Ties are explicit: two responses with equal scores express no preference, so they never form a pair.
A prompt whose responses all score the same gives APO no pair; Curry-DPO drops every response tied
with the best one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    prompt_index: int
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    chosen_win_probability: float | None = None
    rejected_win_probability: float | None = None

    @property
    def gap(self) -> float:
        return self.chosen_score - self.rejected_score


def best_vs_worst(prompt_index: int, responses: list[str], scores: list[float],
                  win_probabilities: list[float] | None = None) -> Pair | None:
    """The highest- against the lowest-scored response (the first of each on ties), or None when all tie.
    `win_probabilities` (one per response, SPPO's soft targets) travel with the two kept responses."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] == scores[worst]:
        return None
    chosen_win, rejected_win = (None, None) if win_probabilities is None else (win_probabilities[best],
                                                                               win_probabilities[worst])
    return Pair(prompt_index, responses[best], responses[worst], scores[best], scores[worst], chosen_win, rejected_win)


def best_vs_each(prompt_index: int, responses: list[str], scores: list[float]) -> list[Pair]:
    """Curry-DPO (Pattnaik et al. 2024): the best response against each lower-rated one, easiest first:
    by descending rating gap (ties in the gap keep the data's order). Responses rated like the best are dropped."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    pairs = [Pair(prompt_index, responses[best], responses[i], scores[best], scores[i])
             for i in range(len(scores)) if scores[i] < scores[best]]
    return sorted(pairs, key=lambda pair: -pair.gap)


def order_by(pairs: list[Pair], difficulty: list[float]) -> list[Pair]:
    """`pairs` of one prompt reordered easiest first, by ascending `difficulty` (stable)."""
    return [pair for _, pair in sorted(zip(difficulty, pairs), key=lambda item: item[0])]


def curriculum_stages(per_prompt: list[list[Pair]], stages: int | None = None) -> list[list[Pair]]:
    """Stage k holds the k-th easiest pair of every prompt that has one (the paper's iterative variant)."""
    count = max((len(pairs) for pairs in per_prompt), default=0)
    count = min(count, stages) if stages else count
    return [[pairs[k] for pairs in per_prompt if len(pairs) > k] for k in range(count)]


def easy_to_hard(per_prompt: list[list[Pair]], stages: int | None = None) -> list[Pair]:
    """The single-stage variant's one pass: every prompt's easiest pairs first, then the second easiest, ...
    (the stages concatenated), so difficulty levels never mix."""
    return [pair for stage in curriculum_stages(per_prompt, stages) for pair in stage]


def as_row(pair: Pair, prompt) -> dict:
    """A preference row the pairwise trainer reads, in the prompt's format (chat messages or text)."""
    def completion(text):
        return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]

    row = {"prompt": prompt, "chosen": completion(pair.chosen), "rejected": completion(pair.rejected),
           "chosen_score": pair.chosen_score, "rejected_score": pair.rejected_score}
    if pair.chosen_win_probability is not None:
        row.update(chosen_win_probability=pair.chosen_win_probability,
                   rejected_win_probability=pair.rejected_win_probability)
    return row
