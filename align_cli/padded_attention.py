"""A packed row (`data/packing.py`) unpacked into a right-padded batch for SDPA's causal kernels.

Why: where a row has little padding to remove (fixed lengths, long sequences), the packed kernels lose to the
dense causal kernel TRL runs: on an H200, cuDNN's SDPA (Hopper tensor-core code) took 0.64 ms forward per call
where torch's FlashAttention-2 varlen took 1.03 ms over the same tokens (benchmarks/RESULTS.md, the L = 4096
profile). `align_packed` measures this layout against the others per shape bucket (`attention_choice.py`).

Layout (`padded_layout`): every sequence of the batch becomes one row of `[B, L]`, causal from its first
token, padded at the end (right padding cannot change a causal row's real queries: they never see a later
key). A completion with a shared prompt becomes [its prompt, itself], so its prompt is computed again (as
TRL computes it for both completions); the first completion of each prompt also supplies the prompt's own
outputs, so a prompt needs no row of its own. The row's trailing padding (`PADDING_SEGMENT`) gets no row: its
outputs are zeros (they reach only padding, which nothing real sees and no loss counts). The row gathers
queries, keys and values into the batch (`gather_index`) and its outputs back (`output_index`); under autograd
the gathers' backward adds each duplicated prompt token's gradients from every copy.

Grouped key/value heads: repeated to the query heads (every SDPA kernel takes that; cuDNN's is the fastest on
Hopper) or handed to SDPA as they are with `enable_gqa` (`native_gqa`: only flash and the math kernel take it,
and it saves the repeat's copy and its backward's sum: TRL's call with it took 2.53 ms where the repeated
padded batch took 3.46, varlen_check-h200.json). Which is faster is measured, as every `align_packed` choice
(the candidates `padded` and `padded_gqa`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data.packing import PADDING_SEGMENT
from .varlen_attention import VarlenLayout


@dataclass(frozen=True, eq=False)
class PaddedLayout:
    gather_index: torch.Tensor   # [B, L] long: the row position each batch slot reads (slots past a sequence: 0)
    output_index: torch.Tensor   # [T] long: each row token's slot in the flattened [B * L] batch, B * L = zeros
    lengths: tuple[int, ...]     # each batch row's real length
    placeholder: torch.Tensor    # [1, 1, 0, 0] stand-in attention_mask (packed_attention.model_inputs)
    native_gqa: bool = False     # grouped heads to SDPA as they are (enable_gqa), not repeated (module docstring)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.gather_index.shape)

    @property
    def computed_pairs(self) -> int:
        """(query, key) pairs the causal kernel computes, padding slots included: its work."""
        batch, length = self.shape
        return batch * length * (length + 1) // 2


def padded_layout(segments: torch.Tensor, varlen: VarlenLayout) -> PaddedLayout:
    """The padded-batch layout of a packed row, from its `segments` ([T]) and its validated varlen layout (which
    lists each segment's queries and keys in row order). One host sync: each segment's first token's segment id,
    and where its context starts."""
    device = segments.device
    count = len(varlen.query_lengths)
    first_tokens = varlen.cu_seq_q[:-1].long()
    context_starts = varlen.k_index[varlen.cu_seq_k[:-1].long()] if varlen.k_index is not None else first_tokens
    ids, context_at, starts = torch.stack([segments[first_tokens], context_starts, first_tokens]).tolist()
    index_at = {start: j for j, start in enumerate(starts)}
    contexts = [varlen.key_lengths[j] - varlen.query_lengths[j] for j in range(count)]
    covered = {index_at[context_at[j]] for j in range(count) if contexts[j]}  # prompts some completion gives
    rows: list[list[tuple[int, int]]] = []   # per batch row, its pieces (row start, length), in row order
    outputs: list[list[bool]] = []           # per piece, whether this batch row gives its outputs
    given = set()
    for j in range(count):
        n, p = varlen.query_lengths[j], contexts[j]
        if p:  # a completion: [its prompt, itself]; the prompt's first completion gives the prompt's outputs
            prompt = index_at[context_at[j]]
            rows.append([(context_at[j], p), (starts[j], n)])
            outputs.append([prompt not in given, True])
            given.add(prompt)
        elif j not in covered and ids[j] != PADDING_SEGMENT:  # plain packing's sequences, a prompt left alone
            rows.append([(starts[j], n)])
            outputs.append([True])
    lengths = tuple(sum(length for _, length in pieces) for pieces in rows)
    width = max(lengths, default=1)
    total = segments.numel()
    gather = torch.zeros(len(rows), width, dtype=torch.long)
    output_index = torch.full((total,), len(rows) * width, dtype=torch.long)
    for b, (pieces, gives) in enumerate(zip(rows, outputs)):
        offset = 0
        for (start, length), give in zip(pieces, gives):
            gather[b, offset:offset + length] = torch.arange(start, start + length)
            if give:
                output_index[start:start + length] = torch.arange(b * width + offset, b * width + offset + length)
            offset += length
    return PaddedLayout(gather.to(device, non_blocking=True), output_index.to(device, non_blocking=True), lengths,
                        varlen.placeholder)


def padded_attention_forward(query, key, value, layout: PaddedLayout, scale: float | None = None) -> torch.Tensor:
    """Attention over a packed row through its padded-batch layout: `[1, H, T, D]` inputs (transformers' layout),
    `[1, T, H, D]` out. SDPA's causal kernel over `[B, H, L, D]` (cuDNN or flash on a GPU, whichever SDPA takes)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))   # [T, H, D]: the row's tokens in order
    q, k, v = (t[layout.gather_index] for t in (q, k, v))            # [B, L, H, D]
    grouped = heads != kv_heads
    if grouped and not layout.native_gqa:  # every SDPA kernel takes repeated heads
        k, v = k.repeat_interleave(heads // kv_heads, dim=2), v.repeat_interleave(heads // kv_heads, dim=2)
    gqa = {"enable_gqa": True} if grouped and layout.native_gqa else {}
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, **gqa)         # [B, H, L, D]
    flat = out.transpose(1, 2).reshape(-1, heads, out.shape[-1])     # [B * L, H, D]
    flat = torch.cat([flat, flat.new_zeros(1, heads, out.shape[-1])])
    return flat[layout.output_index][None]
