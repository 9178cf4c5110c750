"""The attention structure of a packed row (`data/packing.py`) in the form each backend takes.

- `flex_attention`, or `align_flex` (the GPU default with packing, `register_backend`: FlexAttention
  for packed rows, SDPA for padded batches and generation): a FlexAttention `BlockMask`. Only the 128 x 128
  blocks that hold an allowed pair are computed, so attention costs the sum of each sequence's
  square (plus its prompt), not the square of the row. The block tables are built from the segment
  ids directly, a band of query blocks at a time, never an `[T, T]` tensor.
- `sdpa` / `eager` (CPU, or by choice): an explicit `[1, 1, T, T]` mask, boolean for SDPA, additive
  for eager. Exact, but memory and time grow with T^2: meant for CPU and short rows.
- `flash_attention_2` / `flash_attention_3`: no mask; transformers reads the sequence boundaries
  from the restarting position ids (varlen kernels). Plain packing only: a completion cannot see a
  prompt that is not contiguous with it, so prompt sharing is refused there.

transformers passes a 4-D mask or a `BlockMask` through to the attention function unchanged.
"""

from __future__ import annotations

import torch

from .data.packing import PackedSequenceBatch
from .errors import UserError

FLASH_BACKENDS = ("flash_attention_2", "flash_attention_3")
FLEX_BACKEND = "align_flex"  # FlexAttention on packed rows, SDPA elsewhere
BLOCK = 128


def register_backend() -> str:
    """Register `align_flex` with transformers (idempotent) and return its name. A model loaded with it
    runs FlexAttention when handed a `BlockMask` (packed rows) and SDPA otherwise, so held-out
    evaluation on padded batches and generation with a KV cache keep SDPA's kernels and masks."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if isinstance(attention_mask, BlockMask):
            return flex_attention_forward(query, key, value, attention_mask, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(FLEX_BACKEND, attention)
    AttentionMaskInterface.register(FLEX_BACKEND, sdpa_mask)
    return FLEX_BACKEND


_compiled_flex = None


def flex_attention_forward(query, key, value, block_mask, scale=None) -> torch.Tensor:
    """FlexAttention over `[B, H, T, D]` inputs, `[B, T, H, D]` out (transformers' layout); traced inline
    under an outer compile. Compiled with PyTorch's automatic dynamic shapes: kernels for the first row
    length, then once more with a symbolic length when rows change length (as packed rows do)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        function = flex_attention
    else:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        function = _compiled_flex
    heads, kv_heads = query.shape[1], key.shape[1]
    gqa = heads != kv_heads
    if gqa and heads & (heads - 1):  # FlexAttention's grouped heads want a power-of-two head count
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
        gqa = False
    output = function(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return output.transpose(1, 2).contiguous()


def allowed_pairs(segments: torch.Tensor, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """`[len(queries), T]` bool: which keys each query position attends to (rule: data/packing.py)."""
    keys = torch.arange(segments.numel(), device=segments.device)
    q_segment, q_context = segments[queries, None], context[queries, None]
    same_block = (segments[None, :] == q_segment) | (segments[None, :] == q_context)
    return (keys[None, :] <= queries[:, None]) & same_block


def dense_mask(segments: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """`[1, 1, T, T]` bool, True where attention is allowed."""
    queries = torch.arange(segments.numel(), device=segments.device)
    return allowed_pairs(segments, context, queries)[None, None]


def block_mask(segments: torch.Tensor, context: torch.Tensor, block: int = BLOCK):
    """A FlexAttention `BlockMask` for the packed row: full blocks skip the mask function, partial
    blocks apply it, empty blocks are never visited."""
    from torch.nn.attention.flex_attention import BlockMask

    length = segments.numel()
    if length % block:
        raise ValueError(f"packed rows must be a multiple of {block} tokens, got {length}")
    blocks = length // block
    band = max(1, (1 << 26) // (length * block))  # query blocks per pass: about 64M booleans at a time
    partial, full = [], []
    for first in range(0, blocks, band):
        queries = torch.arange(first * block, min(blocks, first + band) * block, device=segments.device)
        allowed = allowed_pairs(segments, context, queries).view(-1, block, blocks, block)
        some, every = allowed.any(dim=3).any(dim=1), allowed.all(dim=3).all(dim=1)
        partial.append(some & ~every)
        full.append(every)
    partial, full = torch.cat(partial)[None, None], torch.cat(full)[None, None]

    def tables(kind: torch.Tensor):
        counts = kind.sum(-1, dtype=torch.int32)
        indices = torch.argsort(kind.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts, indices

    def mask_mod(batch, head, q, kv):
        return (kv <= q) & ((segments[kv] == segments[q]) | (segments[kv] == context[q]))

    kv_counts, kv_indices = tables(partial)
    full_counts, full_indices = tables(full)
    return BlockMask.from_kv_blocks(kv_counts, kv_indices, full_counts, full_indices, BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def attention_implementation(model) -> str:
    from .models import unwrap

    config = unwrap(model).config
    return getattr(config, "_attn_implementation", None) or "eager"


def model_inputs(model, batch: PackedSequenceBatch) -> dict:
    """Keyword arguments for the model's forward over a packed row. The mask is built once per batch
    and backend, so the reference forward reuses the policy's."""
    implementation = attention_implementation(model)
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    if implementation in FLASH_BACKENDS:
        if batch.shares_prompts:
            raise UserError(f"training.share_prompt needs an attention backend that takes a mask "
                            f"(flex_attention, sdpa); {implementation} reads only sequence boundaries. Set "
                            f"training.share_prompt: "
                            f"false or model.attn_implementation: flex_attention.")
        return inputs
    if implementation in ("flex_attention", FLEX_BACKEND):
        key = implementation
        if key not in batch._attention:
            batch._attention[key] = block_mask(batch.segments, batch.context)
    else:
        from .models import unwrap

        dtype = unwrap(model).dtype
        key = (implementation, dtype)
        if key not in batch._attention:
            allowed = dense_mask(batch.segments, batch.context)
            if implementation != "sdpa":  # eager and others add the mask to the scores
                floating = dtype if dtype.is_floating_point else torch.float32
                allowed = torch.zeros(allowed.shape, dtype=floating, device=allowed.device).masked_fill(
                    ~allowed, torch.finfo(floating).min)
            batch._attention[key] = allowed
    return {**inputs, "attention_mask": batch._attention[key]}
