"""Batches of token sequences and a resumable data order.

A `SequenceBatch` holds several sequences laid out in rows with a `targets` tensor (the next token
where it is a completion token, else -100) and a `sequence_index` telling which sequence each target
belongs to. Log-prob sums per sequence are then one `index_add`, whatever the layout: right-padded
rows today, packed padding-free rows later, without the trainer changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

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


def collate_pairs(examples: list[dict], pad_id: int) -> tuple[SequenceBatch, dict[str, torch.Tensor]]:
    """Chosen sequences first (0..B-1), rejected after (B..2B-1), in one batch for one forward."""
    prompts = [e["prompt_ids"] for e in examples] * 2
    completions = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    batch = pad_sequences(prompts, completions, pad_id)
    extras = {
        "row_index": torch.tensor([e["row_index"] for e in examples], dtype=torch.long),
        "chosen_lengths": torch.tensor([len(e["chosen_ids"]) for e in examples], dtype=torch.float32),
        "rejected_lengths": torch.tensor([len(e["rejected_ids"]) for e in examples], dtype=torch.float32),
    }
    return batch, extras


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

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // (self.batch_size * self.world_size)

    def batch(self, k: int) -> list[int]:
        epoch, position = divmod(k, self.batches_per_epoch)
        permutation = _permutation(self.num_rows, self.seed, epoch)
        global_size = self.batch_size * self.world_size
        start = position * global_size + self.rank * self.batch_size
        return permutation[start: start + self.batch_size].tolist()


@lru_cache(maxsize=2)
def _permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)
