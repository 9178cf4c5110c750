"""Batching choices of the pairwise trainer: packed or padded micro-batches, and their order.

The trainer asks this module two things: how to collate a micro-batch (`collate_for`) and which rows form
micro-batch k (`data_order`); whether packing is on is `data.packing.packing_enabled`, and how the models are
set up for it (attention backend; compilation) is `run_setup.model_config_for` / `compilation`. Every
choice keeps the log-probs of the padded default (tests/test_packing.py).
"""

from __future__ import annotations

import functools

from ..config import TrainingConfig
from ..data.batching import DataOrder, collate_groups
from ..data.packing import TokenBudgetOrder, check_packing_settings, pack_groups, packing_enabled, row_costs


def collate_for(training: TrainingConfig, default=collate_groups):
    """`(examples, group names, pad id) -> GroupedBatch`: packed when packing is on, else `default`."""
    if packing_enabled(training):
        return functools.partial(pack_groups, share_prompt=training.share_prompt)
    return default


def data_order(training: TrainingConfig, dataset, groups: list[str], world_size: int, rank: int):
    """`DataOrder` (fixed examples per micro-batch) or `TokenBudgetOrder` (fixed packed tokens)."""
    check_packing_settings(training)
    if training.max_tokens_per_batch:
        costs = tuple(row_costs(dataset, groups, training.share_prompt))
        return TokenBudgetOrder(costs, training.max_tokens_per_batch, training.seed, world_size, rank)
    return DataOrder(len(dataset), training.batch_size, training.seed, world_size, rank)


