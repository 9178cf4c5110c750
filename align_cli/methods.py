"""The training methods a recipe's `method.name` selects: which loop runs it, and what each loop or check needs
to know about it. A new method is one entry here plus its loop.

Pure data on purpose: `config.py` reads the names and facts while validating a recipe, and `align train`
imports only the runner of the method it runs (`Method.run`), so the CLI starts without torch or the other loops.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Method:
    """One training method. `runner` and `recipe_check` are `module:function` names, imported when used.

    runner: `runner(recipe, recipe_path, output_dir, resume, overwrite, allow_recipe_change=...)` trains the
        recipe and returns its summary (as `pairwise.trainer.train`).
    default_loss: a recipe without `method.losses` trains the loss of the method's own name.
    online_rl: takes exactly one online RL loss term (losses.RL_LOSSES), and no other method takes one; its
        learning-rate schedule depends on the run's length through D^3S's schedule as well (run_dir).
    revision_evaluation: the before/after measurement adds SRPO's self-revision accuracies
        (`method.srpo.revisions` of them).
    recipe_check: `check(recipe)` raises UserError for what no single recipe key shows.
    """

    runner: str
    default_loss: bool = False
    online_rl: bool = False
    revision_evaluation: bool = False
    recipe_check: Optional[str] = None

    def run(self, *args, **kwargs) -> dict:
        return _resolve(self.runner)(*args, **kwargs)

    def check(self, recipe) -> None:
        if self.recipe_check:
            _resolve(self.recipe_check)(recipe)


def _resolve(name: str) -> Callable:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


METHODS: dict[str, Method] = {
    # The offline pairwise trainer (align_cli/pairwise/trainer.py) with any pairwise loss (dpo, ipo, fdpo, ...).
    "dpo": Method(runner="align_cli.pairwise.trainer:train"),
    # Triple data (gold, chosen, rejected), reference-free.
    "tpo": Method(runner="align_cli.pairwise.trainer:train", default_loss=True),
    # Pairs plus self-revision sequences (data/srpo.py, self_revision.py).
    "srpo": Method(runner="align_cli.pairwise.trainer:train", default_loss=True, revision_evaluation=True),
    # Online RL (align_cli/rl): rollouts, rewards, group advantages, one RL loss term.
    "grpo": Method(runner="align_cli.rl.trainer:train_rl", default_loss=True, online_rl=True,
                   recipe_check="align_cli.rl.trainer:refuse_pairwise_memory_keys"),
    # Iterative loops around the pairwise trainer (align_cli/iterative).
    "apo": Method(runner="align_cli.iterative.apo:run_apo",
                  recipe_check="align_cli.iterative.apo:require_estimable_normaliser"),
    "curry_dpo": Method(runner="align_cli.iterative.curry:run_curry"),
}

METHOD_NAMES = tuple(METHODS)
