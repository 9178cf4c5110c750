"""Pure preference and RL loss functions of log-prob tensors, and their registry.

The contract (docs/DESIGN.md) every function in `LOSSES` follows:

- Tensor inputs are positional-or-keyword parameters named from `TENSOR_INPUTS` (per-sequence sums
  of completion-token log-probs, shape `[B]`, float32, plus token counts). A tensor parameter with a
  default of `None` is optional (the trainer skips computing it when the loss does not need it, e.g.
  TPO's gold NLL with `alpha=0`).
- Hyperparameters are keyword-only with defaults (`beta`, `label_smoothing`, ...); recipes set them
  by the same names. Each loss declares the valid range of its hyperparameters where it is registered
  (`@register("dpo", beta=BETA)`, losses/ranges.py); recipes are checked against them before a run.
- The return value is `(loss_per_example [B], metrics)`, metrics a dict of detached scalar tensors
  named like TRL's (`rewards/chosen`, `rewards/margins`, `rewards/accuracies`, ...).

The trainer reads each function's signature to decide which log-probs to compute: a loss that
takes no `ref_*` tensor needs no reference model. Losses are combined by the recipe as
`sum_i weight_i * mean(loss_i)`.
"""

from __future__ import annotations

import inspect
from typing import Callable

# Per-pair soft labels: P(chosen beats rejected), or each response's win probability (SPPO). The data's
# columns of the same names (`data.columns`) are handed to a loss as tensors when present.
LABEL_INPUTS = ("preference_probability", "chosen_win_probability", "rejected_win_probability")

# Token-level RL losses (grpo, dapo, gspo, hapo): padded per-token tensors [B, T] and masks (losses/rl.py).
TOKEN_INPUTS = ("policy_token_logps", "old_token_logps", "ref_token_logps", "advantages", "completion_mask",
                "loss_mask", "token_entropy_signal", "loss_normaliser")

# Names a loss function may take as tensor inputs; anything else is a hyperparameter. `policy_X` / `ref_X`
# are the summed log-probs of sequence group X under the policy / reference, `X_lengths` its token counts.
TENSOR_INPUTS = (
    "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected",
    "chosen_lengths", "rejected_lengths",
    "policy_gold", "gold_lengths",
    # SRPO's self-improvement sequences: y' | (x, y) for y' in {chosen, rejected}, y in {chosen, rejected}
    "policy_chosen_given_rejected", "policy_rejected_given_rejected",
    "policy_chosen_given_chosen", "policy_rejected_given_chosen",
    "ref_chosen_given_rejected", "ref_rejected_given_rejected",
    "ref_chosen_given_chosen", "ref_rejected_given_chosen",
    *LABEL_INPUTS,
    *TOKEN_INPUTS,
)

# The sequence groups a pairwise loss can ask for, in the order the trainer lays them out: chosen, rejected,
# gold, then SRPO's `y' | (x, y)` (data/batching.py tokenises each group's prompt and completion).
SEQUENCE_GROUPS = tuple(name.removeprefix("policy_") for name in TENSOR_INPUTS
                        if name.startswith("policy_") and name not in TOKEN_INPUTS)

LOSSES: dict[str, Callable] = {}


def register(name: str, **ranges):
    """Add a loss function to `LOSSES` under `name`, with the valid range of each hyperparameter
    (`Range`/`OneOf` from `losses/ranges.py`), which recipes are checked against (`hyperparameter_ranges`)."""

    def decorate(function: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' registered twice")
        unknown = set(ranges) - set(hyperparameters(function))
        if unknown:
            raise ValueError(f"loss '{name}': ranges given for {sorted(unknown)}, which are not its hyperparameters")
        function.ranges = dict(ranges)
        LOSSES[name] = function
        return function

    return decorate


def hyperparameter_ranges(function: Callable) -> dict:
    """The declared valid range of each hyperparameter of a registered loss (name -> `Range`/`OneOf`)."""
    return getattr(function, "ranges", {})


def tensor_inputs(function: Callable) -> dict[str, bool]:
    """The tensor parameters of a loss function, mapped to whether each is required."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default is inspect.Parameter.empty for p in parameters if p.name in TENSOR_INPUTS}


def used_inputs(function: Callable, params: dict) -> dict[str, bool]:
    """Tensor inputs a loss uses with these hyperparameters (name -> required). A loss may declare
    `uses(params)` to name the optional inputs it uses (TPO with alpha=0 needs no gold forward; an RL loss
    with kl_beta=0 no reference); without it, every input of its signature."""
    inputs = tensor_inputs(function)
    uses = getattr(function, "uses", None)
    if uses is None:
        return inputs
    wanted = uses(params)
    return {name: required for name, required in inputs.items() if required or name in wanted}


def hyperparameters(function: Callable) -> dict[str, object]:
    """The keyword-only hyperparameters of a loss function and their defaults."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def needs_reference(function: Callable) -> bool:
    return any(name.startswith("ref_") for name in tensor_inputs(function))


def reference_margin_only(function: Callable, params: dict) -> bool:
    """Whether the loss, with these hyperparameters, sees the reference only through `ref_chosen - ref_rejected`
    of one prompt (a per-prompt shift of the reference leaves it unchanged). A loss declares it as a
    `reference_margin_only` attribute, True or a function of its hyperparameters; undeclared: False."""
    declared = getattr(function, "reference_margin_only", False)
    return bool(declared(params) if callable(declared) else declared)


# Importing the modules fills the registry.
from . import d3s, dpo, fdpo, hapo, rl, sppo, srpo, tpo  # noqa: E402,F401  # noqa: E402,F401
from .d3s import d3s_schedule, max_variance_subset, select_samples, select_tokens  # noqa: E402,F401
from .hapo import (  # noqa: E402,F401
    EntropyStats,
    adaptive_clip_bounds,
    adaptive_temperature,
    entropy_signal,
    redistribute_advantages,
    token_level_group_advantages,
)
from .rl import group_advantages, k3_kl  # noqa: E402,F401

# Token-level RL losses, those taking per-token log-probs: trained by the online loop (align_cli/rl), not the
# pairwise trainer.
RL_LOSSES = tuple(name for name, function in LOSSES.items() if "policy_token_logps" in tensor_inputs(function))
