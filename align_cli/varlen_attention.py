"""A packed row (`data/packing.py`) as variable-length attention: one FlashAttention varlen call per layer.

Layout (`varlen_layout`). The row's segments are taken in row order, each one a varlen "sequence": its
queries are its own tokens (cu_seq_q runs over ALL tokens of the row, trailing padding included, so queries
and outputs keep the row's order and need no permutation), its keys are `k_index`: the tokens of its context
segment (its prompt, when it has one) followed by its own tokens, with cu_seq_k. Causal attention aligned at
the bottom right of each (n queries x p + n keys) block lets query i see keys 0 .. p + i: the whole prompt
and its own tokens 0..i, which is the row's rule (token q sees kv iff kv <= q and kv is in q's segment or
in q's context segment, the context always lying before the segment). Plain packing (no context anywhere):
keys are queries, `k_index` is None and no gather runs. Built from `segments` / `context` on their device
with O(T) tensors and one host sync (the lengths the kernel needs as integers).

Kernels (`varlen_attention_forward`). On CUDA, `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2
inside torch, bf16 / fp16, head dims up to 256 in multiples of 8, sm80+; `flash_varlen_unsupported` says
why not). Its signature changed across torch versions and is read once here: torch 2.10 takes
`is_causal=True`, later ones `window_size=(-1, 0)`; `enable_gqa` exists only in some (without it the key /
value heads are repeated); `scale` is folded into the queries where it is missing. Elsewhere (CPU, tests),
`reference_varlen_attention` computes the same layout with one SDPA call per segment and an explicit
bottom-right causal mask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - torch < 2.10
    varlen_attn = None


def _varlen_call_options() -> tuple[dict, bool, bool]:
    """(causal keyword arguments, takes enable_gqa, takes scale) of this torch's `varlen_attn`."""
    if varlen_attn is None:
        return {}, False, False
    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    return causal, "enable_gqa" in parameters, "scale" in parameters


VARLEN_CAUSAL, VARLEN_TAKES_GQA, VARLEN_TAKES_SCALE = _varlen_call_options()


@dataclass(frozen=True, eq=False)
class VarlenLayout:
    """Per segment of the row, in row order (module docstring)."""

    cu_seq_q: torch.Tensor          # [S + 1] int32, cumulative query lengths over every token of the row
    cu_seq_k: torch.Tensor          # [S + 1] int32, cumulative key lengths (context + own tokens)
    k_index: torch.Tensor | None    # [K] long, the row position of each key; None: keys are the queries
    max_q: int
    max_k: int
    query_lengths: tuple[int, ...]  # host copies: the reference's loop and the cost estimate
    key_lengths: tuple[int, ...]
    placeholder: torch.Tensor       # [1, 1, 0, 0] stand-in attention_mask (packed_attention.model_inputs)

    @property
    def shares_prompts(self) -> bool:
        return self.k_index is not None

    @property
    def attended_pairs(self) -> int:
        """(query, key) pairs computed: what the kernel's work is proportional to."""
        return sum(n * (m - n) + n * (n + 1) // 2 for n, m in zip(self.query_lengths, self.key_lengths))


def varlen_layout(segments: torch.Tensor, context: torch.Tensor) -> VarlenLayout:
    """The varlen layout of a packed row's `segments` / `context` ([T] each; module docstring). Raises
    ValueError when the row breaks the layout's assumptions (a segment in two pieces, a context missing,
    after its segment, or changing inside a segment)."""
    length, device = segments.numel(), segments.device
    starts_here = torch.ones(length, dtype=torch.bool, device=device)
    starts_here[1:] = segments[1:] != segments[:-1]
    starts = starts_here.nonzero().squeeze(1)
    count = starts.numel()
    lengths = torch.diff(starts, append=torch.tensor([length], device=device))
    ids, parents = segments[starts], context[starts]
    order = torch.argsort(ids)
    sorted_ids = ids[order]
    found_at = order[torch.searchsorted(sorted_ids, parents).clamp(max=count - 1)]
    has_context = (parents != -1) & (ids[found_at] == parents)
    context_starts = torch.where(has_context, starts[found_at], 0)
    context_lengths = torch.where(has_context, lengths[found_at], 0)
    problems = torch.stack([
        (sorted_ids[1:] == sorted_ids[:-1]).any(),
        ((parents != -1) & ~has_context).any(),
        (has_context & (context_starts + context_lengths > starts)).any(),
        (context != parents.repeat_interleave(lengths, output_size=length)).any(),
    ])
    host = torch.cat([lengths, context_lengths, problems.long()]).tolist()  # the one sync
    query_lengths, context_host, flags = host[:count], host[count:2 * count], host[2 * count:]
    for flag, what in zip(flags, ("a segment id appears in two places", "a context segment is missing",
                                  "a context segment does not lie before its segment",
                                  "the context changes inside a segment")):
        if flag:
            raise ValueError(f"packed row has no varlen layout: {what}")
    key_lengths = [n + p for n, p in zip(query_lengths, context_host)]
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    cu_seq_q = torch.cat([zero, lengths.cumsum(0).to(torch.int32)])
    k_index = None
    if any(context_host):
        keys = sum(key_lengths)
        piece_starts = torch.stack([context_starts, starts], 1).flatten()
        piece_lengths = torch.stack([context_lengths, lengths], 1).flatten()
        piece_offsets = piece_lengths.cumsum(0) - piece_lengths
        shift = (piece_starts - piece_offsets).repeat_interleave(piece_lengths, output_size=keys)
        k_index = torch.arange(keys, device=device) + shift
        cu_seq_k = torch.cat([zero, (lengths + context_lengths).cumsum(0).to(torch.int32)])
    else:
        cu_seq_k = cu_seq_q
    return VarlenLayout(cu_seq_q, cu_seq_k, k_index, max(query_lengths), max(key_lengths), tuple(query_lengths),
                        tuple(key_lengths), torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device))


def flash_varlen_unsupported(head_dim: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the flash varlen kernel cannot run these inputs, or None when it can."""
    if varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if device.type != "cuda":
        return "the flash varlen kernel runs on CUDA only"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the flash varlen kernel takes bf16 / fp16, not {dtype}"
    if head_dim > 256 or head_dim % 8:
        return f"the flash varlen kernel takes head dims up to 256 in multiples of 8, not {head_dim}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the flash varlen kernel needs an sm80+ GPU"
    return None


def varlen_attention_forward(query, key, value, layout: VarlenLayout, scale: float | None = None) -> torch.Tensor:
    """Attention over a packed row in its varlen layout: `[1, H, T, D]` inputs (transformers' layout), `[1, T, H, D]`
    out. Flash varlen on CUDA, the per-segment reference elsewhere."""
    q = query[0].transpose(0, 1)  # [T, H, D]: the row's order is the queries' order
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    if layout.k_index is not None:  # each completion's keys: its prompt, then itself
        k, v = k[layout.k_index], v[layout.k_index]
    if q.is_cuda:
        return _flash_varlen(q, k, v, layout, scale)[None]
    return reference_varlen_attention(q, k, v, layout, scale)[None]


def _flash_varlen(q, k, v, layout: VarlenLayout, scale):
    options = dict(VARLEN_CAUSAL)
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        if VARLEN_TAKES_GQA:
            options["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    if VARLEN_TAKES_SCALE:
        options["scale"] = scale
    elif scale is not None:  # the kernel's own scale is 1/sqrt(D): fold the difference into the queries
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), layout.cu_seq_q, layout.cu_seq_k,
                       layout.max_q, layout.max_k, **options)


@torch.compiler.disable  # a loop over the row's segments: compiled, it would specialise on every layout
def reference_varlen_attention(q, k, v, layout: VarlenLayout, scale: float | None = None) -> torch.Tensor:
    """The varlen layout computed plainly: per segment, SDPA of its queries `[n, H, D]` over its keys `[m, Hkv, D]`
    with a bottom-right causal mask (query i sees keys 0 .. m - n + i). `[T, H, D]` out."""
    import torch.nn.functional as F

    gqa = q.shape[1] != k.shape[1]
    outputs, q_start, k_start = [], 0, 0
    for n, m in zip(layout.query_lengths, layout.key_lengths):
        queries = q[q_start:q_start + n].transpose(0, 1)
        keys, values = k[k_start:k_start + m].transpose(0, 1), v[k_start:k_start + m].transpose(0, 1)
        visible = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        outputs.append(F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, scale=scale,
                                                      enable_gqa=gqa).transpose(0, 1))
        q_start, k_start = q_start + n, k_start + m
    return torch.cat(outputs)
