"""cuBLAS-tile strategy: cuBLAS computes a bounded block of logits in fp32, a Triton pass folds it.

Where Triton's matmul runs well below cuBLAS (large H, where the matmul dominates), it pays to let
cuBLAS write a `[N, vocab_chunk]` block of logits (bf16 inputs, fp32 output: the logits are not
rounded to bf16) and stream it once through a memory-bound Triton kernel: the forward folds it into
the same online log-sum-exp as the fused kernel (`fold_tile`), the backward turns it into the
gradient of the logits (`logit_grad`) in the input dtype. The extra cost is one pass over the block
(4 bytes per logit forward, 6 backward), independent of H; the block is reused, so memory stays
bounded by the chunk, never N x V. `triton_logprobs` times both strategies and keeps the faster.
"""

from __future__ import annotations

import torch

from .triton_fused import AVAILABLE, interpreting

if AVAILABLE:
    import triton
    import triton.language as tl

    from .triton_fused import MASKED, fold_tile, logit_grad

    @triton.jit
    def _fold_kernel(logits_ptr, bias_ptr, labels_ptr, state_ptr, state_stride, n_rows, v0, v_cols, inv_temp,
                     HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Fold logits[n_rows, v_cols] (vocabulary ids v0...) into state [4, n_rows] (stride state_stride)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows_in = tl.minimum(rows, n_rows - 1)
        labels = tl.load(labels_ptr + rows_in)
        run_max = tl.load(state_ptr + rows_in)
        sum_exp = tl.load(state_ptr + state_stride + rows_in)
        sum_exp_z = tl.load(state_ptr + 2 * state_stride + rows_in)
        target = tl.load(state_ptr + 3 * state_stride + rows_in)
        row_offsets = rows_in.to(tl.int64)[:, None] * v_cols
        for c0 in range(0, v_cols, BLOCK_C):
            local = c0 + tl.arange(0, BLOCK_C)
            col_ok = local < v_cols
            z = tl.load(logits_ptr + row_offsets + local[None, :], mask=col_ok[None, :], other=0.0)
            if HAS_BIAS:
                z += tl.load(bias_ptr + v0 + local, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.where(col_ok[None, :], z * inv_temp, MASKED)
            # Columns past the block belong to the next chunk: id -1 keeps them from matching a label.
            cols = tl.where(col_ok, v0 + local, -1)
            run_max, sum_exp, sum_exp_z, target = fold_tile(z, cols, labels, run_max, sum_exp, sum_exp_z,
                                                            target, WITH_ENTROPY)
        row_ok = rows < n_rows
        tl.store(state_ptr + rows, run_max, mask=row_ok)
        tl.store(state_ptr + state_stride + rows, sum_exp, mask=row_ok)
        tl.store(state_ptr + 2 * state_stride + rows, sum_exp_z, mask=row_ok)
        tl.store(state_ptr + 3 * state_stride + rows, target, mask=row_ok)

    @triton.jit
    def _grad_from_logits_kernel(logits_ptr, bias_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_lp_ptr,
                                 grad_ent_ptr, out_ptr, stride_out, n_rows, v0, v_cols, inv_temp,
                                 HAS_BIAS: tl.constexpr, HAS_LP_GRAD: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[n_rows, v_cols] (row stride stride_out) = gradient of the raw logits in contiguous logits."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        local = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows_in = tl.minimum(rows, n_rows - 1)
        col_ok = local < v_cols
        offsets = rows_in.to(tl.int64)[:, None] * v_cols + local[None, :]
        z = tl.load(logits_ptr + offsets, mask=col_ok[None, :], other=0.0)
        if HAS_BIAS:
            z += tl.load(bias_ptr + v0 + local, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        grad = logit_grad(z * inv_temp, v0 + local, rows_in, labels_ptr, lse_ptr, entropy_ptr, grad_lp_ptr,
                          grad_ent_ptr, inv_temp, HAS_LP_GRAD, HAS_ENT_GRAD, BLOCK_R)
        out = out_ptr + rows_in.to(tl.int64)[:, None] * stride_out + local[None, :]
        tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=(rows < n_rows)[:, None] & col_ok[None, :])


BLOCK_R, BLOCK_C, WARPS = 8, 1024, 8  # memory-bound passes: 32 KB of logits per program and step


def logits_fp32(out: torch.Tensor, hidden: torch.Tensor, weight_chunk: torch.Tensor) -> torch.Tensor:
    """out = hidden @ weight_chunk.T in fp32 (cuBLAS accumulates in fp32; nothing is rounded to bf16)."""
    if hidden.dtype == torch.float32 or not hidden.is_cuda:  # the CPU branch serves the interpreter
        return torch.mm(hidden.float(), weight_chunk.float().t(), out=out)
    return torch.mm(hidden, weight_chunk.t(), out_dtype=torch.float32, out=out)


def tiles_fold(state, logits, bias, labels, v0: int, with_entropy: bool, inv_temp: float) -> None:
    """Fold a `[n, w]` fp32 block of logits (vocabulary ids v0...) into state `[4, n]` in place."""
    n, width = logits.shape
    meta = {"BLOCK_R": BLOCK_R, "BLOCK_C": 128 if interpreting() else BLOCK_C}
    _fold_kernel[(triton.cdiv(n, BLOCK_R),)](
        logits, logits if bias is None else bias, labels, state, state.stride(0), n, v0, width, inv_temp,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, **meta, num_warps=WARPS,
    )


def tiles_grad(out, logits, bias, labels, lse, entropy, grad_lp, grad_ent, v0: int, inv_temp: float) -> None:
    """out = gradient of the raw logits in the `[n, w]` fp32 block `logits` (vocabulary ids v0...)."""
    n, width = logits.shape
    block_c = 128 if interpreting() else BLOCK_C
    _grad_from_logits_kernel[(triton.cdiv(n, BLOCK_R), triton.cdiv(width, block_c))](
        logits, logits if bias is None else bias, labels, lse,
        lse if entropy is None else entropy, lse if grad_lp is None else grad_lp,
        lse if grad_ent is None else grad_ent, out, out.stride(0), n, v0, width, inv_temp,
        HAS_BIAS=bias is not None, HAS_LP_GRAD=grad_lp is not None, HAS_ENT_GRAD=grad_ent is not None,
        BLOCK_R=BLOCK_R, BLOCK_C=block_c, num_warps=WARPS,
    )
