"""Reward functions for online RL, named in a recipe and summed with weights.

```yaml
method:
  rl:
    rewards:
      - {name: arithmetic, weight: 1.0}              # the shipped task's strict verifier
      - {name: format, weight: 0.2, pattern: '...'}  # any other key is a parameter of that reward
      - {name: my_rewards:brevity, weight: 0.5}      # a Python callable, `module:function`
      - {name: reward_model, model: path/to/rm}      # a Hugging Face sequence-classification model; optional
                                                     # batch_size, label, max_length, dtype, device
```

Every reward function has the signature

    def reward(completions: list[str], rows: list[dict], **params) -> list[float]

where `completions[i]` is a generated completion (decoded, special tokens removed) and `rows[i]` the data row
of its prompt (`prompt` plus every other column, e.g. `answer`). A `module:function` name is imported from
the Python path (the working directory comes first), called with the term's extra keys as `params`.
The step's reward is `sum_i weight_i * reward_i`; each term is also logged as `reward/NAME`.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import torch

from .. import tasks
from ..errors import UserError

_EQUATION = r"\s*-?\d+\s*[-+*/x×]\s*-?\d+\s*=\s*-?\d+\s*\.?\s*"


def arithmetic(completions: list[str], rows: list[dict], answer_column: str = "answer") -> list[float]:
    """1 when the completion is exactly the row's answer equation (the shipped task's strict verifier,
    `align_cli.tasks.is_correct`: whitespace and one final period allowed), else 0."""
    return [float(tasks.is_correct(text, row[answer_column])) for text, row in zip(completions, rows)]


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")


def extract_answer(text: str) -> Fraction | None:
    """The final numeric answer of a text, robustly: the last `\\boxed{...}`, else what follows `####`, else
    what follows "answer is"/"answer:", else the whole text; from that, the last number (integers with
    thousands separators, decimals, or fractions `a/b`), as an exact `Fraction`. None when there is none."""
    text = str(text)
    for pattern in (_BOXED, _HASHES, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            text = found[-1]
            break
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    number = numbers[-1].replace(",", "").replace(" ", "")
    try:
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def answer_match(completions: list[str], rows: list[dict], answer_column: str = "answer") -> list[float]:
    """1 when the completion's extracted final answer equals the row's (`extract_answer` on both: for the
    arithmetic task, the result after `=`), whatever the format; else 0."""
    scores = []
    for text, row in zip(completions, rows):
        expected, found = extract_answer(row[answer_column]), extract_answer(text)
        scores.append(float(expected is not None and found == expected))
    return scores


def format(completions: list[str], rows: list[dict], pattern: str = _EQUATION) -> list[float]:
    """1 when the whole completion matches the regular expression `pattern` (default: one equation
    `a op b = c`, the shipped task's format), else 0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(text) is not None) for text in completions]


def reward_model(model: str, batch_size: int = 16, label: int = 0, max_length: int = 4096, dtype: str = "float32",
                 device: str | None = None) -> Callable:
    """The `reward_model` reward: the logit of output `label` (default 0) of a sequence-classification model
    for (the row's prompt, the completion), scored by `align_cli.reward_model.RewardModelScorer`, the
    scorer of the iterative ranker and the eval judge (its docstring says how a pair is tokenised)."""
    from ..reward_model import RewardModelScorer

    scorer = RewardModelScorer(model, batch_size=batch_size, max_length=max_length, label=label, dtype=dtype,
                               device=device)
    return lambda completions, rows: scorer.score([row["prompt"] for row in rows], completions)


_REWARD_MODEL_KEYS = ("model", "batch_size", "label", "max_length", "dtype", "device")


BUILTIN_REWARDS: dict[str, Callable] = {"arithmetic": arithmetic, "answer_match": answer_match, "format": format}


def load_callable(spec: str) -> Callable:
    """`package.module:function` -> the function (the working directory is importable)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserError(f"Reward '{spec}': write a Python callable as module:function (e.g. my_rewards:brevity).")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"Reward '{spec}': cannot import module '{module_name}': {error}.") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserError(f"Reward '{spec}': module '{module_name}' has no callable '{attribute}'.")
    return function


def build_reward(name: str, params: dict) -> Callable[[list[str], list[dict]], list[float]]:
    if name == "reward_model":
        if "model" not in params:
            raise UserError("Reward 'reward_model' needs a `model:` (a local sequence-classification model directory).")
        unknown = sorted(set(params) - set(_REWARD_MODEL_KEYS))
        if unknown:
            raise UserError(f"Reward 'reward_model' has no parameter {', '.join(unknown)}; its keys are "
                            f"{', '.join(_REWARD_MODEL_KEYS)}.")
        return reward_model(**params)
    if ":" in name:
        function = load_callable(name)
    elif name in BUILTIN_REWARDS:
        function = BUILTIN_REWARDS[name]
    else:
        raise UserError(f"Unknown reward '{name}'. Builtin rewards: {', '.join(sorted(BUILTIN_REWARDS))}, "
                        f"reward_model; or a Python callable as module:function.")
    return lambda completions, rows: function(completions, rows, **params)


class WeightedRewards:
    """`sum_i weight_i * reward_i(completions, rows)`; returns the total `[N]` and each term `[N]`."""

    def __init__(self, terms):
        self.terms = [(term.name, term.weight, build_reward(term.name, term.params)) for term in terms]

    def __call__(self, completions: list[str], rows: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros(len(completions), dtype=torch.float32)
        parts = {}
        for name, weight, function in self.terms:
            values = torch.tensor([float(v) for v in function(completions, rows)], dtype=torch.float32)
            if values.shape != total.shape:
                raise UserError(f"Reward '{name}' returned {values.numel()} values for {len(completions)} completions.")
            parts[name] = values
            total = total + weight * values
        return total, parts


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to `max_length - buffer` tokens, then linear down to -1 at
    `max_length` (and -1 beyond): `(max_length - buffer - |o|) / buffer`. Yu et al. 2025 (DAPO), eq. 13."""
    if buffer <= 0:
        return torch.where(lengths >= max_length, -1.0, 0.0).to(torch.float32)
    threshold = max_length - buffer
    penalty = (threshold - lengths.to(torch.float32)) / buffer
    return penalty.clamp(min=-1.0, max=0.0)
