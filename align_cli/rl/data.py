"""Prompts for online RL: rows with a prompt (plus whatever the rewards read, e.g. `answer`), and their order."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..config import Recipe
from ..data.batching import seeded_permutation
from ..data.render import render_prompts
from ..data.sources import train_prompt_rows
from ..errors import UserError


def load_prompt_rows(recipe: Recipe, tokenizer) -> tuple[list[dict], dict]:
    """The training prompts of `data.train`: each row keeps every column, with the prompt (string or chat
    messages) under `prompt`. Prompts longer than `data.max_prompt_length` tokens are dropped (counted)."""
    source = recipe.data.train
    rows = train_prompt_rows(recipe)
    rendered = render_prompts(tokenizer, [row["prompt"] for row in rows], recipe.data.system_prompt)
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    kept = [row for row, length in zip(rows, lengths) if length <= recipe.data.max_prompt_length]
    report = {"rows": len(rows), "dropped_long_prompts": len(rows) - len(kept)}
    if report["dropped_long_prompts"]:
        warnings.warn(f"{source.source}: dropped {report['dropped_long_prompts']} of {len(rows)} prompts longer than "
                      f"data.max_prompt_length ({recipe.data.max_prompt_length} tokens).", stacklevel=2)
    if not kept:
        raise UserError(f"{source.source}: no prompt fits data.max_prompt_length ({recipe.data.max_prompt_length}).")
    return kept, report


@dataclass(frozen=True)
class PromptOrder:
    """Prompts consumed in order through seeded per-epoch permutations: the prompts of any position are a
    pure function of it, so a resumed run continues exactly. Each process takes its own contiguous slice."""

    num_rows: int
    seed: int
    world_size: int = 1
    rank: int = 0

    def take(self, position: int, count: int) -> list[int]:
        """Row indices of this process's `count` prompts, the global batch starting at `position`."""
        start = position + self.rank * count
        return [int(seeded_permutation(self.num_rows, self.seed, i // self.num_rows)[i % self.num_rows])
                for i in range(start, start + count)]

