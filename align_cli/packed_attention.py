"""The attention structure of a packed row (`data/packing.py`) in the form each backend takes.

Backends (`model.attn_implementation`; all three `align_*` names are registered by `register_backend` and run
SDPA for padded batches and for generation with a KV cache, so held-out evaluation and sampling keep SDPA's
kernels and masks):

- `align_packed` (the GPU default with packing): per batch, FlexAttention, flash varlen or the padded batch
  (with grouped key/value heads, repeated or through SDPA's `enable_gqa`), whichever measured fastest for the
  batch's shape bucket (`attention_choice.py`: the first batch of each bucket times one attention call forward and backward of each, the winner is kept for the bucket, printed once
  and listed in summary.json's `attention`). Varlen is tried only where the flash kernel takes the inputs (bf16 / fp16, head
  dim <= 256 and a multiple of 8, sm80+); on CPU the candidates are the dense mask, the varlen reference and the
  padded batch.
- `align_flex` (forces FlexAttention; `flex_attention` is transformers' own path to the same mask): a
  FlexAttention `BlockMask`. Only the 128 x 128 blocks that hold an allowed pair are computed, so attention
  costs the sum of each sequence's square (plus its prompt), not the square of the row. The block tables are
  built from the segment ids directly, a band of query blocks at a time, never an `[T, T]` tensor.
- `align_varlen` (forces varlen): the row as variable-length sequences (`varlen_attention.py`): per segment
  its queries, and as keys its prompt's tokens then its own, through torch's FlashAttention-2 varlen kernel
  (the pure-torch reference of the same layout on CPU). A completion's keys are gathered, so prompt sharing
  costs one small gather of keys and values per layer. The layout reaches the attention function as the
  keyword `VARLEN_KWARG` (transformers passes a forward's extra keywords down to every attention call, also
  under gradient checkpointing and regional compilation), with a `[1, 1, 0, 0]` stand-in `attention_mask`
  that transformers' mask builder hands on unchanged (a 4-D mask), so no `[T, T]` mask is ever built.
- `align_padded` (forces the padded batch): the row unpacked into a right-padded `[B, L]` batch, one row per
  sequence (a completion with its prompt in front), through SDPA's causal kernel (cuDNN's on Hopper, which beats
  the varlen kernel where the row has little padding to remove: `padded_attention.py`); grouped key/value heads
  repeated, which every SDPA kernel takes.
- `sdpa` / `eager` (CPU, or by choice): an explicit `[1, 1, T, T]` mask, boolean for SDPA, additive
  for eager. Exact, but memory and time grow with T^2: meant for CPU and short rows.
- `flash_attention_2` / `flash_attention_3`: no mask; transformers reads the sequence boundaries
  from the restarting position ids (varlen kernels). Plain packing only: a completion cannot see a
  prompt that is not contiguous with it, so prompt sharing is refused there (`align_varlen` shares prompts).

transformers passes a 4-D mask or a `BlockMask` through to the attention function unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from .attention_choice import CHOOSER, attention_trials, bucket_of
from .data.packing import PADDING_SEGMENT, PackedSequenceBatch
from .errors import UserError
from .padded_attention import PaddedLayout, padded_attention_forward, padded_layout
from .varlen_attention import VarlenLayout, flash_varlen_unsupported, varlen_attention_forward, varlen_layout

FLASH_BACKENDS = ("flash_attention_2", "flash_attention_3")
PACKED_BACKEND = "align_packed"  # per batch, FlexAttention, flash varlen or padded by measured cost; SDPA elsewhere
FLEX_BACKEND = "align_flex"      # FlexAttention on packed rows, SDPA elsewhere
VARLEN_BACKEND = "align_varlen"  # flash varlen on packed rows, SDPA elsewhere
PADDED_BACKEND = "align_padded"  # packed rows unpacked into a padded batch for SDPA's causal kernel
ALIGN_BACKENDS = (PACKED_BACKEND, FLEX_BACKEND, VARLEN_BACKEND, PADDED_BACKEND)
VARLEN_KWARG = "align_varlen_layout"  # the forward keyword that carries a VarlenLayout to the attention calls
PADDED_KWARG = "align_padded_layout"  # ... and the one that carries a PaddedLayout
BLOCK = 128


def register_backend() -> str:
    """Register the `align_*` backends with transformers (idempotent) and return the default, `align_packed`.
    They share one attention function, which runs what it is handed: varlen for a `VarlenLayout` keyword, the
    padded batch for a `PaddedLayout` one, FlexAttention for a `BlockMask`, SDPA otherwise (padded batches,
    generation with a KV cache); which one a
    packed row gets is `model_inputs`' choice, by the backend's name."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layout = kwargs.get(VARLEN_KWARG)
        if layout is not None:
            return varlen_attention_forward(query, key, value, layout, scaling), None
        if (padded := kwargs.get(PADDED_KWARG)) is not None:
            return padded_attention_forward(query, key, value, padded, scaling), None
        if isinstance(attention_mask, BlockMask):
            return flex_attention_forward(query, key, value, attention_mask, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    global _registered
    _registered = _registered or attention  # one function object: compiled layers guard on it
    for name in ALIGN_BACKENDS:
        AttentionInterface.register(name, _registered)
        AttentionMaskInterface.register(name, sdpa_mask)
    return PACKED_BACKEND


_registered = None


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


def attention_shape(model) -> tuple[int, int, int, torch.dtype]:
    """(heads, key/value heads, head dim, dtype) of the model's attention inputs."""
    from .models import unwrap

    inner = unwrap(model)
    config = inner.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim, inner.dtype


def model_inputs(model, batch: PackedSequenceBatch) -> dict:
    """Keyword arguments for the model's forward over a packed row. Masks and layouts are built once per batch
    and kept on it (`batch._attention`), so the reference forward reuses the policy's."""
    implementation = attention_implementation(model)
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    if implementation in FLASH_BACKENDS:
        if batch.shares_prompts:
            raise UserError(f"training.share_prompt needs an attention backend that takes a mask or shares "
                            f"prompts (align_packed, align_varlen, align_flex, flex_attention, sdpa); "
                            f"{implementation} reads only sequence boundaries. Set training.share_prompt: false "
                            f"or model.attn_implementation: align_packed.")
        return inputs
    kind = attention_kind(model, batch, implementation)
    if kind == "varlen":
        layout = packed_layout(batch)
        return {**inputs, "attention_mask": layout.placeholder, VARLEN_KWARG: layout}
    if kind in ("padded", "padded_gqa"):
        padded = packed_padded_layout(batch, native_gqa=kind == "padded_gqa")
        return {**inputs, "attention_mask": padded.placeholder, PADDED_KWARG: padded}
    if kind == "flex":
        return {**inputs, "attention_mask": packed_block_mask(batch)}
    from .models import unwrap

    return {**inputs, "attention_mask": packed_dense_mask(batch, implementation, unwrap(model).dtype)}


def attention_kind(model, batch: PackedSequenceBatch, implementation: str) -> str:
    """"varlen", "padded", "padded_gqa", "flex" or "dense": what the packed row runs under `implementation`
    (forced `align_padded` repeats grouped heads, the layout every SDPA kernel takes)."""
    if implementation in ("flex_attention", FLEX_BACKEND):
        return "flex"
    if implementation == PADDED_BACKEND:
        return "padded"
    if implementation == VARLEN_BACKEND:
        device = batch.input_ids.device
        heads, kv_heads, head_dim, dtype = attention_shape(model)
        if device.type == "cuda" and (why := flash_varlen_unsupported(head_dim, dtype, device)):
            raise UserError(f"model.attn_implementation: {VARLEN_BACKEND} cannot run this model: {why}. Use "
                            f"model.attn_implementation: {PACKED_BACKEND} (it then takes FlexAttention) or "
                            f"{FLEX_BACKEND}.")
        return "varlen"
    if implementation == PACKED_BACKEND:
        return measured_kind(model, batch)
    return "dense"


def measured_kind(model, batch: PackedSequenceBatch) -> str:
    """`align_packed`'s choice for this batch's bucket, measured the first time the bucket is seen
    (`attention_choice.py`). CUDA: FlexAttention, flash varlen where the kernel takes the inputs, and the padded
    batch (with grouped heads also `padded_gqa`: SDPA's enable_gqa); CPU: the dense mask, the varlen reference and
    the padded batches. Compared on the row's real tokens (the padded batch leaves the trailing padding's outputs
    at zero)."""
    heads, kv_heads, head_dim, dtype = attention_shape(model)
    device, length = batch.input_ids.device, batch.input_ids.shape[1]
    bucket = bucket_of(length, batch.num_sequences, batch.shares_prompts, heads, kv_heads, head_dim, dtype, device)
    if (known := CHOOSER.known(bucket)) is not None:
        return known
    scale = head_dim ** -0.5
    unavailable = {}
    if device.type == "cuda":
        forwards = {"flex": lambda q, k, v: flex_attention_forward(q, k, v, packed_block_mask(batch), scale)}
        if why := flash_varlen_unsupported(head_dim, dtype, device):
            unavailable["varlen"] = why
    else:
        def dense(q, k, v):
            mask = packed_dense_mask(batch, "sdpa", dtype)
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads).transpose(1, 2)

        forwards = {"dense": dense}
    if "varlen" not in unavailable:
        forwards["varlen"] = lambda q, k, v: varlen_attention_forward(q, k, v, packed_layout(batch), scale)
    forwards["padded"] = lambda q, k, v: padded_attention_forward(q, k, v, packed_padded_layout(batch), scale)
    if heads != kv_heads:
        forwards["padded_gqa"] = lambda q, k, v: padded_attention_forward(
            q, k, v, packed_padded_layout(batch, native_gqa=True), scale)
    real = (batch.segments != PADDING_SEGMENT).nonzero().squeeze(1)
    return CHOOSER.choose(bucket, lambda: attention_trials(forwards, heads, kv_heads, head_dim, length, dtype, device,
                                                           real), unavailable)


def packed_layout(batch: PackedSequenceBatch) -> VarlenLayout:
    if "varlen" not in batch._attention:
        batch._attention["varlen"] = varlen_layout(batch.segments, batch.context)
    return batch._attention["varlen"]


def packed_padded_layout(batch: PackedSequenceBatch, native_gqa: bool = False) -> PaddedLayout:
    if "padded" not in batch._attention:
        batch._attention["padded"] = padded_layout(batch.segments, packed_layout(batch))
    layout = batch._attention["padded"]
    return dataclasses.replace(layout, native_gqa=True) if native_gqa else layout  # the same index tensors


def packed_block_mask(batch: PackedSequenceBatch):
    if "flex" not in batch._attention:
        batch._attention["flex"] = block_mask(batch.segments, batch.context)
    return batch._attention["flex"]


def packed_dense_mask(batch: PackedSequenceBatch, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """`[1, 1, T, T]`: boolean for SDPA (and the `align_*` backends' SDPA), additive for eager and others."""
    additive = implementation not in ("sdpa", *ALIGN_BACKENDS)
    key = ("dense", dtype if additive else torch.bool)
    if key not in batch._attention:
        allowed = dense_mask(batch.segments, batch.context)
        if additive:
            floating = dtype if dtype.is_floating_point else torch.float32
            allowed = torch.zeros(allowed.shape, dtype=floating, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(floating).min)
        batch._attention[key] = allowed
    return batch._attention[key]
