"""Win-rate metrics with alpaca_eval's exact definitions (alpaca_eval 0.6.x, `metrics/helpers.py`).

A preference follows alpaca_eval's encoding: 1 = output_1 (the reference) wins, 2 = output_2 (the
evaluated model) wins, values in between are soft preferences, and 1.5 or 0 is a draw. Anything else
(None/NaN, values outside [1, 2]) is "not a preference" and is dropped before averaging, as
alpaca_eval does; `n_draws` is counted before that drop.

- `win_rate`: mean of (preference - 1) x 100 (the "absolute" scoring rule);
- `standard_error`: the sample standard error of the same values (ddof=1, pandas' `sem`) x 100;
- `discrete_win_rate`: the same mean after rounding each preference to 1 or 2 (half-to-even, as
  pandas does), draws counting one half (the "zero-one" scoring rule);
- `n_wins` / `n_wins_base`: how many preferences lean to the model / the reference (> or < 1.5);
- `avg_length`: mean characters of the model's outputs, truncated to an int.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

DRAW = 1.5


def as_preferences(values: Iterable[float | None]) -> np.ndarray:
    """Floats, with None (an unparseable judgment) as NaN."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _sem(values: np.ndarray) -> float:
    # pandas' Series.sem: ddof=1, NaN below two values
    if len(values) < 2:
        return math.nan
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def describe_head2head(preferences: np.ndarray) -> dict:
    """alpaca_eval's head-to-head summary of preferences that are already on its 1..2 scale."""
    preferences = np.where(preferences == 0, DRAW, preferences)  # 0 is the legacy draw code
    n_draws = int(np.sum(preferences == DRAW))
    valid = (preferences >= 1) & (preferences <= 2)  # NaN compares False: dropped
    shifted = preferences[valid] - 1
    return {
        "win_rate": float(np.mean(shifted) * 100) if len(shifted) else math.nan,
        "standard_error": _sem(shifted) * 100,
        "n_wins": int(np.sum(shifted > 0.5)),
        "n_wins_base": int(np.sum(shifted < 0.5)),
        "n_draws": n_draws,
        "n_total": len(shifted),
    }


def discretise(preferences: np.ndarray) -> np.ndarray:
    """alpaca_eval's zero-one rule: a draw stays a draw, anything else rounds (half to even) to an
    integer; a 0 after rounding is a draw too (so a stray 0.4 becomes a draw, as there)."""
    rounded = np.where(preferences == DRAW, 0.0, np.round(preferences))
    return np.where(rounded == 0, DRAW, rounded)


def win_rate_metrics(preferences: Iterable[float | None]) -> dict:
    """`win_rate`, `standard_error`, counts and `discrete_win_rate`, as alpaca_eval's `get_winrate`."""
    values = as_preferences(preferences)
    metrics = describe_head2head(values)
    metrics["discrete_win_rate"] = describe_head2head(discretise(values))["win_rate"]
    return metrics


def avg_length(outputs: Iterable[str]) -> int:
    """Mean characters per output, truncated like alpaca_eval's leaderboard column."""
    lengths = [len(text) for text in outputs]
    return int(sum(lengths) / len(lengths)) if lengths else 0


def annotation_metrics(annotations: list[dict], difficulty: dict[str, float] | None = None) -> dict:
    """Every leaderboard metric of one model's annotations (alpaca_eval's `get_length_controlled_winrate`
    plus `avg_length` of output_2). `difficulty` maps instruction -> difficulty for the LC GLM."""
    from ..errors import UserError
    from .length_control import length_controlled_winrate

    preferences = as_preferences(row["preference"] for row in annotations)
    metrics = win_rate_metrics(preferences)
    has_outputs = all(isinstance(row.get(key), str) for row in annotations for key in ("output_1", "output_2"))
    if not has_outputs:  # the GLM and the length need both texts; the win rates do not
        metrics.update(length_controlled_winrate=None, lc_standard_error=None, avg_length=None)
        return metrics
    per_row_difficulty = None
    if difficulty is not None:
        missing = [row["instruction"] for row in annotations if row.get("instruction") not in difficulty]
        if missing:
            raise UserError(f"The difficulty file has no value for {len(missing)} annotated instructions, "
                            f"e.g. {missing[0][:70]!r}.")
        per_row_difficulty = np.array([difficulty[row["instruction"]] for row in annotations])
    same = {row.get("generator_1") for row in annotations} == {row.get("generator_2") for row in annotations}
    metrics.update(length_controlled_winrate(
        preferences, [row["output_1"] for row in annotations], [row["output_2"] for row in annotations],
        per_row_difficulty, same_generator=same and annotations[0].get("generator_1") is not None))
    metrics["avg_length"] = avg_length(row["output_2"] for row in annotations)
    return metrics
