"""Padding-free packing of sequence groups, prompt sharing, and token-budget micro-batches.

Layout. A micro-batch becomes one row. Each example contributes, per prompt column its groups use,
the prompt once followed by the completion of every group on that prompt (`share_prompt`), or each
sequence whole (prompt + completion) without sharing. Position ids restart at 0 at every prompt;
a completion continues its prompt's positions. The row is padded at the end to a multiple of
`PAD_MULTIPLE` tokens (FlexAttention's block size, which also keeps shapes few for compiled code).

Attention. Every token carries `segments` (its block: a prompt, a completion, or a whole sequence)
and `context` (the prompt block a completion also sees, -1 for none). Token q attends to token kv
iff `kv <= q and (segments[kv] == segments[q] or segments[kv] == context[q])`: causal inside its own
block, full view of its prompt, nothing of any other sequence. `align_cli.packed_attention` turns
this into whatever the model's attention backend takes.

Targets. With a shared prompt, the prompt's last position predicts the first token of *every*
completion on it, so trained positions are explicit `(position, label, sequence)` triples (a
position may repeat) rather than a `[R, T]` targets tensor. Sequence numbering is that of
`collate_groups` (group after group, example after example), so `GroupedBatch.groups` is unchanged.

Token budgets. `TokenBudgetOrder` fills each micro-batch with whole examples, in a seeded
permutation, until the next one would exceed `max_tokens` packed tokens (next-fit: the order stays
the permutation's). Which rows form micro-batch k is a pure function of k, as with `DataOrder`, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..config import TrainingConfig
from ..errors import UserError
from .batching import GROUP_COLUMNS, GroupedBatch, collate_groups, seeded_permutation

PAD_MULTIPLE = 128
PADDING_SEGMENT = -2  # trailing padding: its own block, seen by nothing real


@dataclass
class PackedSequenceBatch:
    input_ids: torch.Tensor         # [1, T]
    position_ids: torch.Tensor      # [1, T] restart at every prompt
    attention_mask: torch.Tensor    # [1, T] 1 for real tokens (counting only: never given to the model)
    segments: torch.Tensor          # [T] block of each token
    context: torch.Tensor           # [T] prompt block a completion token also sees, -1 for none
    target_positions: torch.Tensor  # [M] position whose hidden state predicts the label (may repeat)
    target_labels: torch.Tensor     # [M]
    target_sequence: torch.Tensor   # [M] sequence of each target, sequence-major order
    num_sequences: int
    shares_prompts: bool
    _attention: dict = field(default_factory=dict, repr=False, compare=False)  # backend -> built mask

    def to(self, device) -> PackedSequenceBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved, _attention={})

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_labels.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _sequences_by_prompt(examples: list[dict], names: list[str]):
    """Per example: [(prompt ids, [(sequence number, completion ids), ...]), ...] grouped by prompt column."""
    count = len(examples)
    units = []
    for e, example in enumerate(examples):
        by_prompt: dict[str, list] = {}
        for g, name in enumerate(names):
            prompt_column, completion_column = GROUP_COLUMNS[name]
            by_prompt.setdefault(prompt_column, []).append((g * count + e, example[completion_column]))
        units.append([(example[column], completions) for column, completions in by_prompt.items()])
    return units


def pack_sequences(examples: list[dict], names: list[str], pad_id: int, share_prompt: bool = True,
                   pad_multiple: int = PAD_MULTIPLE) -> PackedSequenceBatch:
    """The sequences of groups `names` for each example, packed into one row (layout: module docstring)."""
    tokens, positions, segments, context = [], [], [], []
    targets: dict[int, tuple[list[int], list[int]]] = {}  # sequence -> (positions, labels)
    length, next_segment = 0, 0

    def block(ids: list[int], first_position: int, parent: int) -> int:
        nonlocal length, next_segment
        start, segment = length, next_segment
        next_segment += 1
        tokens.append(torch.tensor(ids, dtype=torch.long))
        positions.append(torch.arange(first_position, first_position + len(ids)))
        segments.append(torch.full((len(ids),), segment, dtype=torch.long))
        context.append(torch.full((len(ids),), parent, dtype=torch.long))
        length += len(ids)
        return start

    for unit in _sequences_by_prompt(examples, names):
        for prompt, completions in unit:
            if not prompt and any(completions_ids for _, completions_ids in completions):
                raise ValueError("a completion needs at least one prompt token to be predicted from")
            if share_prompt:
                prompt_start = block(prompt, 0, -1)
                prompt_segment = next_segment - 1
                last_prompt_position = prompt_start + len(prompt) - 1
                for sequence, completion in completions:
                    if not completion:
                        continue
                    start = block(completion, len(prompt), prompt_segment)
                    predictors = [last_prompt_position] + list(range(start, start + len(completion) - 1))
                    targets[sequence] = (predictors, list(completion))
            else:
                for sequence, completion in completions:
                    start = block(list(prompt) + list(completion), 0, -1)
                    first = start + len(prompt) - 1
                    targets[sequence] = (list(range(first, first + len(completion))), list(completion))
    real = length
    padding = (-length) % pad_multiple if pad_multiple else 0
    if padding:
        tokens.append(torch.full((padding,), pad_id, dtype=torch.long))
        positions.append(torch.arange(padding))
        segments.append(torch.full((padding,), PADDING_SEGMENT, dtype=torch.long))
        context.append(torch.full((padding,), -1, dtype=torch.long))
    num_sequences = len(examples) * len(names)
    order = sorted(targets)
    target_positions = [p for s in order for p in targets[s][0]]
    target_labels = [t for s in order for t in targets[s][1]]
    target_sequence = [s for s in order for _ in targets[s][1]]
    attention_mask = torch.zeros(1, real + padding, dtype=torch.long)
    attention_mask[0, :real] = 1
    return PackedSequenceBatch(
        torch.cat(tokens)[None], torch.cat(positions)[None], attention_mask, torch.cat(segments),
        torch.cat(context),
        torch.tensor(target_positions, dtype=torch.long), torch.tensor(target_labels, dtype=torch.long),
        torch.tensor(target_sequence, dtype=torch.long), num_sequences, share_prompt)


def pack_groups(examples: list[dict], names: list[str], pad_id: int,
                share_prompt: bool = True) -> GroupedBatch:
    """`collate_groups` with the sequences packed padding-free: same groups, lengths, row index, labels."""
    grouped = collate_groups(examples, names, pad_id)
    return dataclasses.replace(grouped, sequences=pack_sequences(examples, names, pad_id, share_prompt))


def row_costs(dataset, names: list[str], share_prompt: bool) -> list[int]:
    """Packed tokens of each example for groups `names`: what a token budget counts. `dataset[column]`
    gives a column's token-id lists (a `datasets.Dataset` or a dict of lists)."""
    prompt_columns = list(dict.fromkeys(GROUP_COLUMNS[name][0] for name in names))
    lengths = {column: [len(ids) for ids in dataset[column]]
               for column in {c for name in names for c in GROUP_COLUMNS[name]}}
    costs = [0] * len(lengths[prompt_columns[0]])
    for name in names:
        prompt_column, completion_column = GROUP_COLUMNS[name]
        for i, n in enumerate(lengths[completion_column]):
            costs[i] += n + (0 if share_prompt else lengths[prompt_column][i])
    if share_prompt:
        for column in prompt_columns:
            for i, n in enumerate(lengths[column]):
                costs[i] += n
    return costs


@dataclass(frozen=True)
class TokenBudgetOrder:
    """Micro-batch k: whole examples filling up to `max_tokens` packed tokens, a pure function of k.

    Each epoch is a fresh permutation seeded by (seed, epoch), as in `DataOrder`, cut next-fit into
    micro-batches of at most `max_tokens` (an example larger than the budget gets one of its own).
    Under several processes, global micro-batch k is micro-batches k*W .. k*W+W-1 of the epoch's list,
    one per rank (disjoint rows); an epoch's last micro-batches that do not fill all ranks are dropped.
    The number of examples per micro-batch varies, and the loss is a mean over each micro-batch's."""

    costs: tuple[int, ...]
    max_tokens: int
    seed: int
    world_size: int = 1
    rank: int = 0
    shuffle: bool = True  # False: every epoch in the data's own order (as DataOrder's)
    _epochs: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            batches, current, used = [], [], 0
            count = len(self.costs)
            rows = seeded_permutation(count, self.seed, epoch).tolist() if self.shuffle else range(count)
            for row in rows:
                cost = self.costs[row]
                if current and used + cost > self.max_tokens:
                    batches.append(current)
                    current, used = [], 0
                current.append(row)
                used += cost
            if current:
                batches.append(current)
            self._epochs[epoch] = batches[: len(batches) - len(batches) % self.world_size]
        return self._epochs[epoch]

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per process in the first epoch (later epochs differ by a few)."""
        return len(self.epoch_batches(0)) // self.world_size

    def batch(self, k: int) -> list[int]:
        epoch = 0
        while k >= (count := len(self.epoch_batches(epoch)) // self.world_size):
            if count == 0:
                raise ValueError("no micro-batch fits: fewer examples than processes")
            k -= count
            epoch += 1
        return self.epoch_batches(epoch)[k * self.world_size + self.rank]


def packing_enabled(training: TrainingConfig) -> bool:
    if training.packing == "auto":
        return torch.cuda.is_available()
    return bool(training.packing)


def check_packing_settings(training: TrainingConfig) -> None:
    if training.max_tokens_per_batch and not packing_enabled(training):
        raise UserError("training.max_tokens_per_batch fills micro-batches with packed tokens: set "
                        "training.packing: true (packing is off on CPU unless asked for).")
