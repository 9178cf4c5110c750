"""Throughput settings of a run: packed or padded batches, batch order, attention backend, compilation.

The trainer asks this module three things: how to collate a micro-batch (`collate_for`), which rows
form micro-batch k (`data_order`), and how to set the models up (`model_config_for`,
`compile_layers`). Every choice keeps the log-probs of the padded default (tests/test_packing.py).
"""

from __future__ import annotations

import functools

import torch

from .config import ModelConfig, TrainingConfig
from .data.batching import DataOrder, collate_groups
from .data.packing import TokenBudgetOrder, pack_groups, row_costs
from .errors import UserError


def packing_enabled(training: TrainingConfig) -> bool:
    if training.packing == "auto":
        return torch.cuda.is_available()
    return bool(training.packing)


def check_settings(training: TrainingConfig) -> None:
    if training.max_tokens_per_batch and not packing_enabled(training):
        raise UserError("training.max_tokens_per_batch fills micro-batches with packed tokens: set "
                        "training.packing: true (packing is off on CPU unless asked for).")


def collate_for(training: TrainingConfig, default=collate_groups):
    """`(examples, group names, pad id) -> GroupedBatch`: packed when packing is on, else `default`."""
    if packing_enabled(training):
        return functools.partial(pack_groups, share_prompt=training.share_prompt)
    return default


def data_order(training: TrainingConfig, dataset, groups: list[str], world_size: int, rank: int):
    """`DataOrder` (fixed examples per micro-batch) or `TokenBudgetOrder` (fixed packed tokens)."""
    check_settings(training)
    if training.max_tokens_per_batch:
        costs = tuple(row_costs(dataset, groups, training.share_prompt))
        return TokenBudgetOrder(costs, training.max_tokens_per_batch, training.seed, world_size, rank)
    return DataOrder(len(dataset), training.batch_size, training.seed, world_size, rank)


def model_config_for(model: ModelConfig, training: TrainingConfig) -> ModelConfig:
    """The model settings to load with: packing on CUDA without a chosen backend takes `align_flex`
    (FlexAttention on packed rows, SDPA on padded batches and in generation)."""
    if model.attn_implementation is None and packing_enabled(training) and torch.cuda.is_available():
        from .packed_attention import register_backend

        return model.model_copy(update={"attn_implementation": register_backend()})
    if model.attn_implementation == "align_flex":
        from .packed_attention import register_backend

        register_backend()
    return model


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place (regional compilation): the layers share one graph, so
    compiling costs one layer's time, and activation checkpointing still wraps each layer."""
    from .models import decoder

    for layer in decoder(model).layers:
        layer.compile()
