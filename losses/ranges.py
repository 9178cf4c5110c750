"""Valid ranges of loss hyperparameters, declared where each loss is registered (`@register(name, beta=POSITIVE)`).

A value outside its range is not a tuning choice but a different objective: a negative beta trains towards
the rejected answers, label smoothing above 1/2 flips the labels, a flip rate of 1/2 divides by zero. The
recipe loader (`align_cli.recipe`) checks every term's values against these ranges before a run starts, and
the losses that guarded their values themselves call `require_in_range` with the same declarations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """A closed, open or half-open interval; `None` ends are unbounded. `meaning` says what the value is."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    meaning: str = ""

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        opening = "(" if self.low_open or self.low is None else "["
        closing = ")" if self.high_open or self.high is None else "]"
        return f"{opening}{low}, {high}{closing}"

    def with_meaning(self, meaning: str) -> "Range":
        return Range(self.low, self.high, self.low_open, self.high_open, meaning)


@dataclass(frozen=True)
class OneOf:
    """A choice among named values (a divergence, an aggregation)."""

    choices: tuple
    meaning: str = ""

    def contains(self, value) -> bool:
        return value in self.choices

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(choice) for choice in self.choices)


POSITIVE = Range(0.0, None, low_open=True)
NON_NEGATIVE = Range(0.0)
UNIT_INTERVAL = Range(0.0, 1.0)
OPEN_UNIT_INTERVAL = Range(0.0, 1.0, low_open=True, high_open=True)
# The inverse strength of the KL (or margin) constraint of every pairwise loss; negative flips the preference.
BETA = POSITIVE.with_meaning("inverse KL strength; a negative beta trains towards the rejected answer")
# Label smoothing / flip rates: at 1/2 the label carries no information (rDPO divides by 1 - 2*eps), above
# it the loss prefers the rejected answer.
BELOW_ONE_HALF = Range(0.0, 0.5, high_open=True)


def describe_requirement(name: str, requirement) -> str:
    """`label_smoothing (label flip rate) in [0, 0.5)`."""
    meaning = f" ({requirement.meaning})" if requirement.meaning else ""
    joiner = " " if isinstance(requirement, OneOf) else " in "
    return f"{name}{meaning}{joiner}{requirement}"


def out_of_range(ranges: dict, params: dict) -> list[tuple[str, object, str]]:
    """`(name, value, requirement text)` for every value of `params` outside its declared range."""
    return [(name, value, describe_requirement(name, ranges[name]))
            for name, value in params.items() if name in ranges and not ranges[name].contains(value)]


def require_in_range(loss: str, ranges: dict, **values) -> None:
    """Raise `ValueError` naming the loss, the hyperparameter and its range for a value outside it."""
    problems = out_of_range(ranges, values)
    if problems:
        name, value, requirement = problems[0]
        raise ValueError(f"{loss}: {requirement} is required, got {name}={value!r}")
