"""Triple data for TPO: `(prompt, gold, chosen, rejected)`, and a builder from rated multi-response data.

TPO (Saeidi et al. 2024, arXiv:2405.16681) trains on a gold response besides the preference pair. The
authors build triples from UltraFeedback, where each prompt has several responses with scores: the
highest-scored response is the gold one, the second the chosen, the lowest the rejected. Their released
data (the card of huggingface.co/datasets/tpo-alignment/triple-preference-ultrafeedback-40K) keeps a triple
only when the chosen scores at least 2 points below the gold and the rejected at least 2 below the chosen,
and discards the other prompts; `margin` (default 2, as there) is that gap, and `margin: 0` keeps every
prompt whose chosen still beats its rejected.
"""

from __future__ import annotations

import warnings
from collections import Counter

from ..errors import UserError


def _as_completion(prompt, text: str):
    """A response in the prompt's format: a string for string prompts, an assistant message for chat."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


# Why a rated row makes no triple, for the warning that counts the dropped rows.
TOO_FEW = "fewer than 3 scored responses"
NO_CHOSEN = "no response at least `margin` below the best (chosen)"
NO_REJECTED = "no response at least `margin` below the chosen (rejected)"


def triple_or_reason(prompt, completions: list[dict], response_key: str = "response", score_key: str = "score",
                     margin: float = 2.0) -> tuple[dict | None, str | None]:
    """One rated row -> (`{prompt, gold, chosen, rejected}`, None), or (None, why it makes no triple).

    gold = the highest score; chosen = the highest-scored other response with score <= gold - margin;
    rejected = the lowest-scored response, kept when its score <= chosen - margin and < chosen (a tie
    expresses no preference even with margin 0). Equal scores keep the data's order (a stable sort)."""
    scored = [c for c in completions or [] if c.get(score_key) is not None and c.get(response_key) is not None]
    if len(scored) < 3:
        return None, TOO_FEW
    ranked = sorted(scored, key=lambda c: float(c[score_key]), reverse=True)
    gold = ranked[0]
    below_gold = [i for i in range(1, len(ranked)) if float(ranked[i][score_key]) <= float(gold[score_key]) - margin]
    if not below_gold:
        return None, NO_CHOSEN
    chosen, rejected = ranked[below_gold[0]], ranked[-1]
    chosen_score, rejected_score = float(chosen[score_key]), float(rejected[score_key])
    if not (rejected_score <= chosen_score - margin and rejected_score < chosen_score):
        return None, NO_REJECTED
    return {"prompt": prompt,
            "gold": _as_completion(prompt, gold[response_key]),
            "chosen": _as_completion(prompt, chosen[response_key]),
            "rejected": _as_completion(prompt, rejected[response_key])}, None


def rated_to_triple(prompt, completions: list[dict], response_key: str = "response", score_key: str = "score",
                    margin: float = 2.0) -> dict | None:
    """One rated row -> `{prompt, gold, chosen, rejected}`, or None when it makes no triple (`triple_or_reason`)."""
    return triple_or_reason(prompt, completions, response_key, score_key, margin)[0]


def rated_to_triples(dataset, columns, source: str, margin: float = 2.0):
    """A `datasets.Dataset` of rated rows -> a dataset of triples (`columns` is the recipe's ColumnMap, `margin`
    the score gap `data.*.triple_margin`); rows that make no triple are dropped with a warning that counts them
    by reason."""
    missing = [name for name in (columns.prompt, columns.completions) if name not in dataset.column_names]
    if missing:
        raise UserError(f"Dataset '{source}' has no column {', '.join(repr(m) for m in missing)} for "
                        f"format: rated_to_triples. Columns found: {', '.join(sorted(dataset.column_names))}. "
                        f"Map yours with data.train.columns.prompt / .completions.")
    rows, dropped = [], Counter()
    for prompt, completions in zip(dataset[columns.prompt], dataset[columns.completions]):
        triple, reason = triple_or_reason(prompt, completions, columns.response, columns.score, margin)
        if triple is None:
            dropped[reason] += 1
        else:
            rows.append(triple)
    reasons = "; ".join(f"{count} with {reason}" for reason, count in dropped.most_common()).replace(
        "`margin`", f"{margin:g} points")
    if not rows:
        raise UserError(f"Dataset '{source}': no rated row makes a TPO triple ({reasons}; keys '{columns.response}' "
                        f"and '{columns.score}' in column '{columns.completions}'). Lower the source's triple_margin "
                        f"(now {margin:g}) if your scores are on a narrower scale.")
    if dropped:
        warnings.warn(f"Dataset '{source}': {sum(dropped.values())} of {len(dataset)} rated rows made no triple "
                      f"({reasons}).", stacklevel=2)
    import datasets

    return datasets.Dataset.from_list(rows)
