"""AlpacaEval 2's weighted pairwise protocol, as pure functions: which order to show the outputs in,
and how to read a one-token verdict as a preference.

Order: alpaca_eval seeds a `random.Random` with "is_switched_outputs" + instruction + seed and picks
from [False, True]; switched, the model's output is shown first. A verdict in the shown order
(1: first wins, 2: second wins) is mapped back with 3 - x.

Verdict: with top log-probs, the preference is 2 - P(first) / (P(first) + P(second)), reading the
probabilities of the tokens `m` and `M` (alpaca_eval's `logprob_parser` with is_binarize=False; a
token missing from the top list has probability 0). Tokens are compared after stripping whitespace
and variants are summed (" m" and "m" are the same answer to a small judge's tokenizer), which
alpaca_eval's exact match does not do. Without log-probs, the text decides: `m` is 1, `M` is 2;
anything else is no judgment (None), which the metrics drop, as alpaca_eval drops NaN.
"""

from __future__ import annotations

import math
import random

from ..prompts import FIRST_TOKEN, SECOND_TOKEN


def is_switched(instruction: str, seed: int) -> bool:
    return random.Random("is_switched_outputs" + instruction + str(seed)).choices([False, True], k=1)[0]


def shown_order(reference: str, model: str, switched: bool) -> tuple[str, str]:
    return (model, reference) if switched else (reference, model)


def unswitch(preference: float | None, switched: bool) -> float | None:
    if preference is None or not switched:
        return preference
    return 3.0 - preference


def _logsumexp(values: list[float]) -> float:
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


def weighted_preference(top_logprobs: list[dict]) -> float | None:
    """2 - P(first)/(P(first)+P(second)) from an OpenAI `top_logprobs` list; None if neither token is there."""
    found: dict[str, list[float]] = {FIRST_TOKEN: [], SECOND_TOKEN: []}
    for entry in top_logprobs:
        token = str(entry.get("token", "")).strip()
        if token in found and entry.get("logprob") is not None:
            found[token].append(float(entry["logprob"]))
    if not found[FIRST_TOKEN] and not found[SECOND_TOKEN]:
        return None
    first = _logsumexp(found[FIRST_TOKEN])
    both = _logsumexp([first, _logsumexp(found[SECOND_TOKEN])])
    return 2.0 - math.exp(first - both)


def discrete_preference(text: str | None) -> float | None:
    verdict = (text or "").strip()
    return {FIRST_TOKEN: 1.0, SECOND_TOKEN: 2.0}.get(verdict)


def choice_preference(choice: dict) -> tuple[float | None, str]:
    """A chat-completion choice read as a preference in the shown order, and how it was read."""
    content = (choice.get("logprobs") or {}).get("content") or []
    if content and content[0].get("top_logprobs"):
        weighted = weighted_preference(content[0]["top_logprobs"])
        if weighted is not None:
            return weighted, "logprobs"
    return discrete_preference((choice.get("message") or {}).get("content")), "discrete"
