"""Triple data for TPO: `(prompt, gold, chosen, rejected)`, and a builder from rated multi-response data.

TPO (Saeidi et al. 2024, arXiv:2405.16681) trains on a gold response besides the preference pair. The
authors build triples from UltraFeedback, where each prompt has several responses with scores: the
highest-scored response is the gold one, the second the chosen, the lowest the rejected.
"""

from __future__ import annotations

import warnings

from ..errors import UserError


def _as_completion(prompt, text: str):
    """A response in the prompt's format: a string for string prompts, an assistant message for chat."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def rated_to_triple(prompt, completions: list[dict], response_key: str = "response", score_key: str = "score") -> dict | None:
    """One rated row -> `{prompt, gold, chosen, rejected}`, or None when it cannot make a triple (fewer
    than three scored responses, or the second and the lowest score tie, so there is no preference).
    Equal scores keep the data's order (a stable sort)."""
    scored = [c for c in completions or [] if c.get(score_key) is not None and c.get(response_key) is not None]
    if len(scored) < 3:
        return None
    ranked = sorted(scored, key=lambda c: float(c[score_key]), reverse=True)
    gold, chosen, rejected = ranked[0], ranked[1], ranked[-1]
    if float(chosen[score_key]) <= float(rejected[score_key]):
        return None
    return {"prompt": prompt,
            "gold": _as_completion(prompt, gold[response_key]),
            "chosen": _as_completion(prompt, chosen[response_key]),
            "rejected": _as_completion(prompt, rejected[response_key])}


def rated_to_triples(dataset, columns, source: str):
    """A `datasets.Dataset` of rated rows -> a dataset of triples (`columns` is the recipe's ColumnMap); rows
    that make no triple are dropped with a warning that counts them."""
    missing = [name for name in (columns.prompt, columns.completions) if name not in dataset.column_names]
    if missing:
        raise UserError(f"Dataset '{source}' has no column {', '.join(repr(m) for m in missing)} for "
                        f"format: rated_to_triples. Columns found: {', '.join(sorted(dataset.column_names))}. "
                        f"Map yours with data.train.columns.prompt / .completions.")
    rows = []
    for prompt, completions in zip(dataset[columns.prompt], dataset[columns.completions]):
        triple = rated_to_triple(prompt, completions, columns.response, columns.score)
        if triple is not None:
            rows.append(triple)
    if not rows:
        raise UserError(f"Dataset '{source}': no row has three scored responses with a score gap between the second "
                        f"and the lowest (keys '{columns.response}' and '{columns.score}' in column "
                        f"'{columns.completions}'), so no TPO triple could be built.")
    if len(rows) < len(dataset):
        warnings.warn(f"Dataset '{source}': {len(dataset) - len(rows)} of {len(dataset)} rated rows made no triple "
                      f"(fewer than 3 scored responses, or no score gap between the second and the lowest).",
                      stacklevel=2)
    import datasets

    return datasets.Dataset.from_list(rows)
