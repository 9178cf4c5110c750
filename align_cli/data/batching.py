"""Batches of token sequences and a resumable data order.

A `SequenceBatch` holds several sequences laid out in rows with a `targets` tensor (the next token
where it is a completion token, else -100) and a `sequence_index` telling which sequence each target
belongs to. Log-prob sums per sequence are then one `index_add`, whatever the layout: right-padded
rows today, packed padding-free rows later, without the trainer changing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..losses import LABEL_INPUTS, SEQUENCE_GROUPS

IGNORE = -100


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor        # [R, T]
    attention_mask: torch.Tensor   # [R, T] 1 for real tokens
    targets: torch.Tensor          # [R, T] token predicted at each position, IGNORE where not trained
    sequence_index: torch.Tensor   # [R, T] which sequence the target belongs to, -1 where IGNORE
    num_sequences: int

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device),
                             self.sequence_index.to(device), self.num_sequences)

    @property
    def num_target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> SequenceBatch:
    """Right-padded rows `prompt + completion`, one sequence per row, targets on completion tokens."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    rows = len(prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    targets = torch.full((rows, width), IGNORE, dtype=torch.long)
    sequence_index = torch.full((rows, width), -1, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        tokens = torch.tensor(prompt + completion, dtype=torch.long)
        input_ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
        # position t predicts token t+1: completion tokens are predicted from len(prompt)-1 on
        start, stop = len(prompt) - 1, len(prompt) + len(completion) - 1
        targets[row, start:stop] = tokens[start + 1: stop + 1]
        sequence_index[row, start:stop] = row
    return SequenceBatch(input_ids, attention, targets, sequence_index, rows)


def group_columns(group: str) -> tuple[str, str]:
    """The tokenised (prompt column, completion column) of a sequence group: `chosen` -> (prompt_ids,
    chosen_ids); SRPO's `y'_given_y` -> (revision_prompt_y_ids, y'_ids), the prompt showing y as an example to
    improve on (data/srpo.py)."""
    completion, _, shown = group.partition("_given_")
    return (f"revision_prompt_{shown}_ids" if shown else "prompt_ids"), f"{completion}_ids"


# Which tokenised columns form each named sequence group (losses.SEQUENCE_GROUPS). A loss input `policy_X` /
# `ref_X` / `X_lengths` asks for group X; a method adds a group there and the trainer core stays unchanged.
GROUP_COLUMNS: dict[str, tuple[str, str]] = {group: group_columns(group) for group in SEQUENCE_GROUPS}


@dataclass
class GroupedBatch:
    """Sequences of several named groups in one `SequenceBatch`, so one forward serves them all."""

    sequences: SequenceBatch
    groups: dict[str, slice]        # group name -> its sequences' positions
    lengths: dict[str, torch.Tensor]  # group name -> completion tokens per example
    row_index: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. preference_probability [B]

    def to(self, device) -> "GroupedBatch":
        return GroupedBatch(self.sequences.to(device), self.groups,
                            {k: v.to(device) for k, v in self.lengths.items()}, self.row_index,
                            {k: v.to(device) for k, v in self.labels.items()})

    @property
    def num_examples(self) -> int:
        return len(self.row_index)


def collate_groups(examples: list[dict], names: list[str], pad_id: int) -> GroupedBatch:
    """The sequences of groups `names` for each example, group after group, in one padded batch."""
    prompts, completions, groups, lengths = [], [], {}, {}
    for name in names:
        prompt_column, completion_column = GROUP_COLUMNS[name]
        groups[name] = slice(len(prompts), len(prompts) + len(examples))
        prompts += [e[prompt_column] for e in examples]
        completions += [e[completion_column] for e in examples]
        lengths[name] = torch.tensor([len(e[completion_column]) for e in examples], dtype=torch.float32)
    row_index = torch.tensor([e["row_index"] for e in examples], dtype=torch.long)
    labels = {name: torch.tensor([e[name] for e in examples], dtype=torch.float32)
              for name in LABEL_INPUTS if examples and name in examples[0]}
    return GroupedBatch(pad_sequences(prompts, completions, pad_id), groups, lengths, row_index, labels)


def collate_pairs(examples: list[dict], pad_id: int) -> GroupedBatch:
    return collate_groups(examples, ["chosen", "rejected"], pad_id)


@dataclass(frozen=True)
class DataOrder:
    """Which rows form micro-batch number k, as a pure function of k: resuming at any micro-batch
    needs no replay. Each epoch is a fresh permutation seeded by (seed, epoch); the last partial
    batch of an epoch is dropped so every optimiser step sees the same number of pairs. Under
    several processes, global batch k is split into contiguous per-rank slices (disjoint rows)."""

    num_rows: int
    batch_size: int          # per process
    seed: int
    world_size: int = 1
    rank: int = 0
    shuffle: bool = True     # False: every epoch in the data's own order (a curriculum)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // (self.batch_size * self.world_size)

    def batch(self, k: int) -> list[int]:
        epoch, position = divmod(k, self.batches_per_epoch)
        permutation = seeded_permutation(self.num_rows, self.seed, epoch) if self.shuffle else torch.arange(self.num_rows)
        global_size = self.batch_size * self.world_size
        start = position * global_size + self.rank * self.batch_size
        return permutation[start: start + self.batch_size].tolist()


@lru_cache(maxsize=4)
def seeded_permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of `num_rows` rows in epoch `epoch` of a run seeded `seed`: a pure function of the three, so
    every process and every resumed run computes the same one (pairwise batches, packed batches, RL prompts)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)
