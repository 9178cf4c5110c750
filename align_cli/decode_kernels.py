"""Triton kernels for the decoder layers of a decode step at a small batch (fast generation's fused layers).

Why: at 32 sequences the compiled, graph-captured decode step of the Qwen2.5-0.5B shape launched ~295 kernels
(12 a layer) and spent ~1.6 ms a step, most of it in the fixed cost of small kernels (cuBLAS GEMMs of 4-7 us
that read 1-17 MB, cuDNN's attention of 9 us, norms, rotary, SiLU, cache writes of ~1.5 us each, plus the gaps
between them): benchmarks/RESULTS.md, "Rollout generation". Here a layer is seven kernels:

1. `residual_norm`: the residual stream with the last linear's pending partial sums added, and its RMSNorm;
2. `linear_partial` (q/k/v), split over K;
3. `attention`: sums those partials (+ bias), applies Qwen3's per-head norms and the rotary embedding, writes
   this token's key and value into the slot cache and attends over the slot (its own key and value from
   registers);
4. `linear_partial` (o_proj), split over K;
5. `residual_norm` again (o_proj's output added);
6. `gated_linear`: gate/up and SiLU(gate) * up;
7. `linear_partial` (down_proj), split over K; the next layer's kernel 1 (or the final norm's) adds it.

Why split over K: a program that walks all of K pays about one memory latency per iteration (~0.35 us on an
H200, pipelined or not: benchmarks/RESULTS.md, "Fused decode layers"), so a first version with one program per
16-32 outputs over all of K ran down_proj at 18 us against cuBLAS's 8. Split over K, a few hundred programs
each read a short slice and the weights stream at close to the bandwidth; the partial sums (float32,
`[S, B, N]`) are added in a fixed order by the kernel that consumes them, so results are deterministic (no
atomics). The norm is a kernel of its own because every program of a product needs its whole input row: a
product kernel that finished the pending sums and the norm itself read ~5x more than its weights.

Rounding follows transformers' eager code where it rounds to the model's dtype: each projection's output, each
residual sum, RMSNorm's normalised activations and output, SiLU's output, the rotary embedding's output.
Products accumulate in float32 (`tl.dot`; IEEE for float32 weights, no TF32). `fused_decode.py` holds the same
layer in torch ops (the reference the tests compare these kernels with) and decides when they run. Imports
without Triton; `AVAILABLE` says whether they can run. `ALIGN_DECODE_TILES` (JSON, kernel -> [block_n, block_k,
splits, warps, stages]) overrides `TILES` for tuning on another GPU (benchmarks/decode_layer_tiles.py).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from .kernels.triton_fused import interpreting  # noqa: F401 - TRITON_INTERPRET=1: the kernels on CPU tensors

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: fast generation keeps the model's own layer code
    triton = None

AVAILABLE = triton is not None




@dataclass(frozen=True)
class Tiles:
    """Launch shapes of one kernel: outputs per program, K per loop iteration, K slices, warps, stages."""

    block_n: int = 32
    block_k: int = 128
    splits: int = 4
    warps: int = 4
    stages: int = 3


# Measured on an H200 at 32 sequences of the Qwen2.5-0.5B shape (benchmarks/decode_layer_tiles.py; RESULTS.md,
# "Fused decode layers").
TILES = {
    "qkv": Tiles(block_n=32, block_k=64, splits=8, stages=4),
    "o": Tiles(block_n=32, block_k=64, splits=8),
    "gate_up": Tiles(block_n=64, block_k=128, splits=1),
    "down": Tiles(block_n=64, block_k=64, splits=16, stages=4),
    "attention": Tiles(block_n=128),   # keys per iteration (at most 16 KB of them: `_key_block`)
}


def _tiles_from_environment() -> None:
    """`ALIGN_DECODE_TILES` over `TILES`; a value that does not parse is reported and the defaults kept."""
    value = os.environ.get("ALIGN_DECODE_TILES")
    if not value:
        return
    try:
        tiles = {kind: Tiles(*shape) for kind, shape in json.loads(value).items() if kind in TILES}
    except (ValueError, TypeError, AttributeError) as error:
        warnings.warn(f"ALIGN_DECODE_TILES={value!r} ignored ({error}): expected JSON like "
                      f'{{"down": [64, 64, 16, 4, 4]}} (kernel: [block_n, block_k, splits, warps, stages]) for '
                      f"kernels {', '.join(TILES)}", stacklevel=2)
        return
    TILES.update(tiles)


_tiles_from_environment()


def _block_m(batch: int) -> int:
    return max(16, triton.next_power_of_2(batch))


def slice_length(inputs: int, tiles: Tiles) -> int:
    """K per split: a whole number of `block_k`; the number of splits is then `cdiv(inputs, slice_length)`."""
    per_split = -(-inputs // tiles.splits)
    return -(-per_split // tiles.block_k) * tiles.block_k


def splits_of(inputs: int, tiles: Tiles) -> int:
    return -(-inputs // slice_length(inputs, tiles))


if AVAILABLE:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _dependent_launch(PDL: tl.constexpr):
        """With programmatic dependent launch (`PDL`, Hopper and later) the next kernel of the step is launched
        while this one runs, and waits here, at its start, for this one to finish: every kernel of the chain
        waits before it reads or writes anything, so only the launch latency between them is hidden."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _residual_norm_kernel(h_ptr, p_ptr, pb_ptr, nw_ptr, out_h_ptr, out_x_ptr, D, eps, stride_h, stride_ps,
                              stride_pb, SPLITS_IN: tl.constexpr, HAS_PENDING_BIAS: tl.constexpr,
                              BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """Kernels 1 and 5, one program per row: the residual stream with the pending linear's partial sums
        added (its output rounded, + bias, then the sum rounded, as two eager ops round), stored; and RMSNorm of
        it (float32 statistic, normalised activations rounded before the weight, as transformers' module)."""
        _dependent_launch(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
        dtype = x.dtype
        if SPLITS_IN > 0:
            pending = tl.zeros([BLOCK_D], dtype=tl.float32)
            for s in tl.static_range(SPLITS_IN):
                pending += tl.load(p_ptr + s * stride_ps + row * stride_pb + cols, mask=mask, other=0.0)
            if HAS_PENDING_BIAS:
                pending += tl.load(pb_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) + pending.to(dtype).to(tl.float32)).to(dtype)
            tl.store(out_h_ptr + row * stride_h + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        inverse_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / D + eps)
        weight = tl.load(nw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_x_ptr + row * stride_h + cols, (weight * (x32 * inverse_rms).to(dtype).to(tl.float32)).to(dtype),
                 mask=mask)

    @triton.jit
    def _linear_partial_kernel(x_ptr, w_ptr, b_ptr, out_ptr, B, N, K, slice_len, stride_x, stride_w, stride_os,
                               stride_ob, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               PDL: tl.constexpr):
        """Kernels 2, 4, 7 (q/k/v, o_proj, down_proj) and 6 (GATED): partial products of K slice `program_id(1)` of `x`
        `[B, K]` with `w` `[N, K]` into `out` `[S, B, N]` (float32). GATED (one slice): SiLU(gate) *
        up into `out` `[B, N]`, gate and up rows of `w` `[2N, K]`, each rounded as the eager modules round."""
        _dependent_launch(PDL)
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        outputs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_mask = outputs < N
        rows = tl.arange(0, BLOCK_M)
        row_mask = rows < B
        begin = split * slice_len
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(begin, begin + slice_len, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0)
            w_mask = out_mask[:, None] & col_mask[None, :]
            w = tl.load(w_ptr + outputs[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            if GATED:
                w_up = tl.load(w_ptr + (N + outputs)[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0)
                up = tl.dot(x, tl.trans(w_up), up, input_precision=PRECISION)
        mask = row_mask[:, None] & out_mask[None, :]
        if GATED:
            dtype = out_ptr.dtype.element_ty
            if HAS_BIAS:
                acc += tl.load(b_ptr + outputs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
                up += tl.load(b_ptr + N + outputs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
            gate = acc.to(dtype).to(tl.float32)
            activated = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
            tl.store(out_ptr + rows[:, None] * stride_ob + outputs[None, :],
                     (activated * up.to(dtype).to(tl.float32)).to(dtype), mask=mask)
        else:
            tl.store(out_ptr + split * stride_os + rows[:, None] * stride_ob + outputs[None, :], acc, mask=mask)

    @triton.jit
    def _projected_half(p_ptr, b_ptr, slot, head, offset, stride_ps, stride_pb, SPLITS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HD: tl.constexpr):
        """Half `offset` (0 or HD/2) of each head in `head` ([G], or [1]): the q/k/v projection's output
        (partials summed + bias) in float32, not yet rounded."""
        columns = head[:, None] * HD + offset + tl.arange(0, HD // 2)[None, :]
        total = tl.zeros(columns.shape, dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            total += tl.load(p_ptr + s * stride_ps + slot * stride_pb + columns)
        if HAS_BIAS:
            total += tl.load(b_ptr + columns).to(tl.float32)
        return total

    @triton.jit
    def _head_norm(low, high, weight_ptr, eps, HD: tl.constexpr):
        """RMSNorm over each head vector (halves `low`, `high`, rows = heads): Qwen3's q_norm / k_norm."""
        dtype = weight_ptr.dtype.element_ty
        half = tl.arange(0, HD // 2)
        inverse = tl.rsqrt((tl.sum(low * low, axis=1) + tl.sum(high * high, axis=1)) / HD + eps)[:, None]
        w_low = tl.load(weight_ptr + half).to(tl.float32)[None, :]
        w_high = tl.load(weight_ptr + HD // 2 + half).to(tl.float32)[None, :]
        low = (w_low * (low * inverse).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        return low, (w_high * (high * inverse).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)

    @triton.jit
    def _rope(low, high, cos_ptr, sin_ptr, position, stride_cos, HD: tl.constexpr):
        """x * cos + rotate_half(x) * sin, rotate_half(x) = (-high, low), in float32 (rounded by the caller)."""
        half = tl.arange(0, HD // 2)[None, :]
        base = position * stride_cos
        cos_low = tl.load(cos_ptr + base + half).to(tl.float32)
        cos_high = tl.load(cos_ptr + base + HD // 2 + half).to(tl.float32)
        sin_low = tl.load(sin_ptr + base + half).to(tl.float32)
        sin_high = tl.load(sin_ptr + base + HD // 2 + half).to(tl.float32)
        return low * cos_low - high * sin_low, high * cos_high + low * sin_high

    @triton.jit
    def _attention_kernel(p_ptr, b_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, o_ptr,
                          head_eps, scale, stride_ps, stride_pb, stride_cos, stride_cs, stride_ch, stride_cp,
                          stride_ob, H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                          HD: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, HEAD_NORM: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """Kernel 3, one program per (slot, key/value head): its G query heads and its key and value head from
        kernel 2's partials (rounded as the linear rounds them), the per-head norms and the rotary embedding,
        this token's key and value into the cache (for later steps), then attention of the queries over the
        slot's cached keys 0..position-1 and this token's own key and value, kept in registers (online softmax)."""
        _dependent_launch(PDL)
        slot = tl.program_id(0)
        kv_head = tl.program_id(1)
        dtype = kc_ptr.dtype.element_ty
        HALF: tl.constexpr = HD // 2
        position = tl.load(pos_ptr + slot)
        group = tl.arange(0, GP)
        group_mask = group < G
        heads = kv_head * G + tl.where(group_mask, group, 0)   # padded rows repeat the group's first head
        key_head = tl.full([1], H, dtype=tl.int32) + kv_head
        q_low = _projected_half(p_ptr, b_ptr, slot, heads, 0, stride_ps, stride_pb, SPLITS, HAS_BIAS, HD)
        q_high = _projected_half(p_ptr, b_ptr, slot, heads, HALF, stride_ps, stride_pb, SPLITS, HAS_BIAS, HD)
        k_low = _projected_half(p_ptr, b_ptr, slot, key_head, 0, stride_ps, stride_pb, SPLITS, HAS_BIAS, HD)
        k_high = _projected_half(p_ptr, b_ptr, slot, key_head, HALF, stride_ps, stride_pb, SPLITS, HAS_BIAS, HD)
        v_low = _projected_half(p_ptr, b_ptr, slot, key_head + KVH, 0, stride_ps, stride_pb, SPLITS, HAS_BIAS, HD)
        v_high = _projected_half(p_ptr, b_ptr, slot, key_head + KVH, HALF, stride_ps, stride_pb, SPLITS, HAS_BIAS,
                                 HD)
        q_low, q_high = q_low.to(dtype).to(tl.float32), q_high.to(dtype).to(tl.float32)
        k_low, k_high = k_low.to(dtype).to(tl.float32), k_high.to(dtype).to(tl.float32)
        v_low, v_high = v_low.to(dtype), v_high.to(dtype)
        if HEAD_NORM:
            q_low, q_high = _head_norm(q_low, q_high, qn_ptr, head_eps, HD)
            k_low, k_high = _head_norm(k_low, k_high, kn_ptr, head_eps, HD)
        q_low, q_high = _rope(q_low, q_high, cos_ptr, sin_ptr, position, stride_cos, HD)
        k_low, k_high = _rope(k_low, k_high, cos_ptr, sin_ptr, position, stride_cos, HD)
        q_low, q_high = q_low.to(dtype), q_high.to(dtype)
        k_low, k_high = k_low.to(dtype), k_high.to(dtype)
        half = tl.arange(0, HALF)[None, :]
        cache = slot * stride_cs + kv_head * stride_ch
        here = cache + position * stride_cp + half
        tl.store(kc_ptr + here, k_low)
        tl.store(kc_ptr + here + HALF, k_high)
        tl.store(vc_ptr + here, v_low)
        tl.store(vc_ptr + here + HALF, v_high)
        run_max = tl.full([GP], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([GP], dtype=tl.float32)
        acc_low = tl.zeros([GP, HALF], dtype=tl.float32)
        acc_high = tl.zeros([GP, HALF], dtype=tl.float32)
        for start in range(0, position, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            visible = keys < position
            rows = cache + keys[:, None] * stride_cp + half
            k_lo = tl.load(kc_ptr + rows, mask=visible[:, None], other=0.0)
            k_hi = tl.load(kc_ptr + rows + HALF, mask=visible[:, None], other=0.0)
            scores = tl.dot(q_low, tl.trans(k_lo), input_precision=PRECISION)
            scores = tl.dot(q_high, tl.trans(k_hi), scores, input_precision=PRECISION) * scale
            scores = tl.where(visible[None, :], scores, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, axis=1))
            rescale = tl.exp(run_max - new_max)
            p = tl.exp(scores - new_max[:, None])
            run_sum = run_sum * rescale + tl.sum(p, axis=1)
            p = p.to(dtype)
            acc_low = tl.dot(p, tl.load(vc_ptr + rows, mask=visible[:, None], other=0.0), acc_low * rescale[:, None],
                             input_precision=PRECISION)
            acc_high = tl.dot(p, tl.load(vc_ptr + rows + HALF, mask=visible[:, None], other=0.0),
                              acc_high * rescale[:, None], input_precision=PRECISION)
            run_max = new_max
        # this token's own key and value
        own = (tl.sum(q_low.to(tl.float32) * k_low.to(tl.float32), axis=1)
               + tl.sum(q_high.to(tl.float32) * k_high.to(tl.float32), axis=1)) * scale
        new_max = tl.maximum(run_max, own)
        rescale = tl.exp(run_max - new_max)
        p_own = tl.exp(own - new_max)
        run_sum = run_sum * rescale + p_own
        p_own = p_own.to(dtype).to(tl.float32)[:, None]
        acc_low = acc_low * rescale[:, None] + p_own * v_low.to(tl.float32)
        acc_high = acc_high * rescale[:, None] + p_own * v_high.to(tl.float32)
        out = o_ptr + slot * stride_ob + (kv_head * G + group)[:, None] * HD + half
        tl.store(out, (acc_low / run_sum[:, None]).to(dtype), mask=group_mask[:, None])
        tl.store(out + HALF, (acc_high / run_sum[:, None]).to(dtype), mask=group_mask[:, None])


def _pdl(tensor: torch.Tensor) -> bool:
    """Programmatic dependent launch: on Hopper and later (not in the interpreter); `ALIGN_DECODE_PDL=0` turns it off."""
    if interpreting() or not tensor.is_cuda or os.environ.get("ALIGN_DECODE_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(tensor.device)[0] >= 9


def _fitted(tiles: Tiles, dtype: torch.dtype) -> Tiles:
    """`tiles` with K halved for 4-byte inputs, so that the pipeline's stages fit in shared memory."""
    if torch.empty((), dtype=dtype).element_size() < 4:
        return tiles
    return Tiles(tiles.block_n, max(32, tiles.block_k // 2), tiles.splits, tiles.warps, min(tiles.stages, 3))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def _or(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return tensor if tensor is not None else like  # a pointer the kernel never reads (its flag is off)


def residual_norm(h, partials, bias, norm_weight, eps: float, out_h, out_x) -> None:
    """Kernels 1 and 5: `out_h` = `h` + the pending linear (`partials` `[S, B, D]` or None, + `bias`), `out_x` =
    RMSNorm of it. Without partials `out_h` is not written (the stream is `h` itself)."""
    batch, hidden = h.shape
    splits = 0 if partials is None else partials.shape[0]
    source = partials if partials is not None else h
    _residual_norm_kernel[(batch,)](
        h, source, _or(bias, h), norm_weight, out_h, out_x, hidden, eps, h.stride(0),
        source.stride(0) if splits else 0, source.stride(1) if splits else 0,
        SPLITS_IN=splits, HAS_PENDING_BIAS=bias is not None, BLOCK_D=triton.next_power_of_2(hidden),
        PDL=_pdl(h), num_warps=4 if hidden <= 2048 else 8, launch_pdl=_pdl(h))


def linear_partial(x, weight, out, tiles: Tiles) -> None:
    """Kernels 2, 4 and 7: partial products of `x` `[B, K]` with `weight` `[N, K]` into `out` `[S, B, N]`."""
    batch, inputs = x.shape
    outputs = weight.shape[0]
    fitted = _fitted(tiles, x.dtype)   # the same splits (the caller sized `out` by `tiles`)
    _linear_partial_kernel[(triton.cdiv(outputs, tiles.block_n), splits_of(inputs, tiles))](
        x, weight, weight, out, batch, outputs, inputs, slice_length(inputs, tiles), x.stride(0), weight.stride(0),
        out.stride(0), out.stride(1), GATED=False, HAS_BIAS=False, PRECISION=_precision(x.dtype),
        BLOCK_M=_block_m(batch), BLOCK_N=fitted.block_n, BLOCK_K=fitted.block_k, PDL=_pdl(x),
        num_warps=fitted.warps, num_stages=fitted.stages, launch_pdl=_pdl(x))


def gated_linear(x, weight, bias, out, tiles: Tiles) -> None:
    """Kernel 6: `out` `[B, I]` = SiLU(x @ gate.T (+ b)) * (x @ up.T (+ b)), gate and up rows of `weight` `[2I, K]`."""
    batch, inputs = x.shape
    outputs = out.shape[1]
    whole = _fitted(Tiles(tiles.block_n, tiles.block_k, 1, tiles.warps, tiles.stages), x.dtype)  # SiLU needs all of K
    _linear_partial_kernel[(triton.cdiv(outputs, whole.block_n), 1)](
        x, weight, _or(bias, weight), out, batch, outputs, inputs, slice_length(inputs, whole), x.stride(0),
        weight.stride(0), 0, out.stride(0), GATED=True, HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
        BLOCK_M=_block_m(batch), BLOCK_N=whole.block_n, BLOCK_K=whole.block_k, PDL=_pdl(x), num_warps=whole.warps,
        num_stages=whole.stages, launch_pdl=_pdl(x))


def attention(partials, bias, q_norm, k_norm, head_eps: float, cos, sin, positions, keys, values, out,
              heads: int, scale: float, tiles: Tiles | None = None) -> None:
    """Kernel 3: `out` `[B, H * HD]` from kernel 2's q/k/v partials `[S, B, (H + 2 KVH) * HD]`; writes this
    step's keys and values at `positions` of slots 0..B-1 of `keys` / `values` `[slots, KVH, max_len, HD]`."""
    splits, batch, _ = partials.shape
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    group = heads // kv_heads
    tiles = tiles or TILES["attention"]
    _attention_kernel[(batch, kv_heads)](
        partials, _or(bias, partials), _or(q_norm, cos), _or(k_norm, cos), cos, sin, positions, keys, values, out,
        head_eps, scale, partials.stride(0), partials.stride(1), cos.stride(0), keys.stride(0), keys.stride(1),
        keys.stride(2), out.stride(0), H=heads, KVH=kv_heads, G=group, GP=max(16, triton.next_power_of_2(group)),
        HD=head_dim, SPLITS=splits, HAS_BIAS=bias is not None, HEAD_NORM=q_norm is not None,
        PRECISION=_precision(keys.dtype), BLOCK_N=_key_block(tiles.block_n, head_dim, keys.dtype), PDL=_pdl(keys),
        num_warps=tiles.warps, num_stages=tiles.stages, launch_pdl=_pdl(keys))


def _key_block(block_n: int, head_dim: int, dtype: torch.dtype) -> int:
    """Keys per iteration of `attention`, at most 16 KB of keys (the stages of keys and values fit in shared
    memory for every head size and dtype)."""
    return max(16, min(block_n, 16384 // (head_dim * torch.empty((), dtype=dtype).element_size())))
