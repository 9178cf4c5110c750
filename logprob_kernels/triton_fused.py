"""Fused Triton kernels: the LM-head matmul and the softmax statistics in one pass, logits in registers.

`fused_forward`: each program computes `[BLOCK_N, BLOCK_V]` logits tiles with `tl.dot` over H (TMA
loads on Hopper) and folds each into an online log-sum-exp in float32 (running max, sum of exp, sum
of exp*z, label logit). It walks one slice of the vocabulary for one token tile; the slices of a row
(8, 16 or 32, tuned with the tile shape) are merged afterwards from `[4, splits, N]` partials. The
logits never reach memory.

`fused_grad_logits`: recomputes a block of logits the same way and writes its gradient (in the input
dtype) into a caller's buffer, for cuBLAS to turn into dH and dW.

The shared epilogues `fold_tile` and `logit_grad` are used by `triton_tiles.py` as well, so both
strategies compute exactly the same function. Imports without Triton; `AVAILABLE` says if it can run.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the chunked torch path is used instead
    triton = None

AVAILABLE = triton is not None
# Vocabulary slices per token tile, tuned with the tile shape. Programs of one token tile are adjacent,
# so the programs in flight cover few token tiles and few slices: both stay in L2. Fewer, longer
# slices share each weight tile among more programs and drain the pipeline less often (8 slices ran
# the forward 7-9% faster than 16 at 16k tokens on the H100, benchmarks/kernel_configs.py), but small
# N needs more programs to fill the GPU.
SPLIT_CHOICES = (8, 16, 32)
DEFAULT_SPLITS = 16  # untuned launches (fp32 checking, the interpreter)
FORWARD_TOKEN_CHUNK = 4096  # tokens per forward launch: see fused_forward


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if AVAILABLE:
    # A finite stand-in for -inf in masked columns: exp underflows to exactly 0 and e * z stays 0 (not
    # NaN), which spares the entropy sum a second mask and the registers it would hold.
    MASKED = tl.constexpr(-1.0e30)

    @triton.jit
    def fold_tile(z, cols, labels, run_max, sum_exp, sum_exp_z, target, WITH_ENTROPY: tl.constexpr):
        """Fold a masked logits tile (MASKED outside the vocabulary) into the rows' running statistics."""
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)  # exp(-inf) = 0 on a row's first tile
        e = tl.exp(z - new_max[:, None])
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            sum_exp_z = sum_exp_z * rescale + tl.sum(e * z, axis=1)
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        return new_max, sum_exp, sum_exp_z, target

    @triton.jit
    def logit_grad(z, cols, rows, labels_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr, inv_temp,
                   HAS_LP_GRAD: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, BLOCK_N: tl.constexpr):
        """d(loss)/d(raw logits) of a tile of z = logits / T (rows: in-range row indices)."""
        log_p = z - tl.load(lse_ptr + rows)[:, None]
        # d log p_label / dz_j = 1[j = label] - p_j and dH / dz_j = -p_j (log p_j + H), so the gradient is
        # g_lp 1[j = label] - p_j (g_lp + g_H (log p_j + H)): one product with p, few live tiles.
        g_lp = tl.load(grad_lp_ptr + rows) if HAS_LP_GRAD else tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_ENT_GRAD:
            ent = tl.load(entropy_ptr + rows)
            coef = g_lp[:, None] + tl.load(grad_ent_ptr + rows)[:, None] * (log_p + ent[:, None])
        else:
            coef = g_lp[:, None]
        grad = -tl.exp(log_p) * coef
        if HAS_LP_GRAD:
            grad += tl.where(cols[None, :] == tl.load(labels_ptr + rows)[:, None], g_lp[:, None], 0.0)
        return grad * inv_temp

    @triton.jit
    def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, h_desc, w_desc, row0, col0, rows_end, cols_end, H,
                    stride_h, stride_w, inv_temp, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                    USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """`(hidden[rows] @ weight[cols].T + bias[cols]) * inv_temp` in fp32 for one tile; rows and cols
        past their ends hold duplicates (pointer loads) or zeros (TMA) that the caller masks."""
        cols_in = tl.minimum(col0 + tl.arange(0, BLOCK_V), cols_end - 1)
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        if USE_TMA:  # Hopper: bulk tensor copies, no per-thread address registers, zero-filled edges
            for k0 in range(0, H, BLOCK_K):
                a = h_desc.load([row0, k0])
                b = w_desc.load([col0, k0])
                acc = tl.dot(a, b.T, acc, input_precision="ieee" if IEEE else None)
        else:
            ks = tl.arange(0, BLOCK_K)
            rows_in = tl.minimum(row0 + tl.arange(0, BLOCK_N), rows_end - 1)
            a_ptrs = hidden_ptr + rows_in.to(tl.int64)[:, None] * stride_h + ks[None, :]
            b_ptrs = weight_ptr + cols_in.to(tl.int64)[None, :] * stride_w + ks[:, None]
            for k0 in range(0, H, BLOCK_K):
                k_ok = (k0 + ks) < H
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
                acc = tl.dot(a, b, acc, input_precision="ieee" if IEEE else None)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]
        return acc * inv_temp

    @triton.jit
    def _descriptors(hidden_ptr, weight_ptr, n_rows, n_cols, H, stride_h, stride_w, USE_TMA: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        if USE_TMA:
            h_desc = tl.make_tensor_descriptor(hidden_ptr, shape=[n_rows, H], strides=[stride_h, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
            w_desc = tl.make_tensor_descriptor(weight_ptr, shape=[n_cols, H], strides=[stride_w, 1],
                                               block_shape=[BLOCK_V, BLOCK_K])
        else:
            h_desc, w_desc = hidden_ptr, weight_ptr
        return h_desc, w_desc

    @triton.jit
    def _forward_kernel(hidden_ptr, weight_ptr, bias_ptr, labels_ptr, partial_ptr,
                        N, V, H, stride_h, stride_w, inv_temp, stat_stride, split_stride, n_bucket, num_splits,
                        HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, IEEE: tl.constexpr,
                        USE_TMA: tl.constexpr, FLATTEN: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        tile_n = pid // num_splits  # the splits of one token tile are adjacent programs
        split = pid % num_splits
        row0 = tile_n * BLOCK_N
        rows = row0 + tl.arange(0, BLOCK_N)
        labels = tl.load(labels_ptr + tl.minimum(rows, N - 1))
        h_desc, w_desc = _descriptors(hidden_ptr, weight_ptr, N, V, H, stride_h, stride_w, USE_TMA,
                                      BLOCK_N, BLOCK_V, BLOCK_K)
        # Whole tiles, dealt out evenly (counts differ by at most one), so a token tile's programs end
        # together and the next wave starts in step; only the vocabulary's last tile overhangs.
        n_tiles = tl.cdiv(V, BLOCK_V)
        v_begin = (split * n_tiles // num_splits) * BLOCK_V
        v_end = tl.minimum(((split + 1) * n_tiles // num_splits) * BLOCK_V, V)
        run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)
        sum_exp_z = tl.zeros([BLOCK_N], dtype=tl.float32)
        target = tl.zeros([BLOCK_N], dtype=tl.float32)
        # FLATTEN lets the software pipeline run on across vocabulary tiles instead of draining at each.
        for v0 in tl.range(v_begin, v_end, BLOCK_V, flatten=FLATTEN):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, h_desc, w_desc, row0, v0, N, V, H, stride_h,
                            stride_w, inv_temp, HAS_BIAS, IEEE, USE_TMA, BLOCK_N, BLOCK_V, BLOCK_K)
            z = tl.where((cols < V)[None, :], z, MASKED)
            run_max, sum_exp, sum_exp_z, target = fold_tile(z, cols, labels, run_max, sum_exp, sum_exp_z,
                                                            target, WITH_ENTROPY)
        out = partial_ptr + split * split_stride + rows
        row_ok = rows < N
        step = stat_stride
        tl.store(out, run_max, mask=row_ok)
        tl.store(out + step, sum_exp, mask=row_ok)
        tl.store(out + 3 * step, target, mask=row_ok)
        if WITH_ENTROPY:
            tl.store(out + 2 * step, sum_exp_z, mask=row_ok)

    @triton.jit
    def _grad_logits_kernel(hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, entropy_ptr,
                            grad_lp_ptr, grad_ent_ptr, out_ptr,
                            n0, n1, v0, v1, H, stride_h, stride_w, stride_out, inv_temp, n_bucket,
                            HAS_BIAS: tl.constexpr, HAS_LP_GRAD: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
                            IEEE: tl.constexpr, USE_TMA: tl.constexpr, TMA_STORE: tl.constexpr,
                            GROUP_N: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """Gradient of the logits for rows [n0, n1) x vocabulary [v0, v1), into out[row - n0, col - v0]."""
        # Grouped order: GROUP_N token tiles sweep the vocabulary tiles together, reusing them from L2.
        pid = tl.program_id(0)
        tiles_v = tl.cdiv(v1 - v0, BLOCK_V)
        per_group = GROUP_N * tiles_v
        first_n = (pid // per_group) * GROUP_N
        group_size = tl.minimum(tl.cdiv(n1 - n0, BLOCK_N) - first_n, GROUP_N)
        row0 = n0 + (first_n + (pid % per_group) % group_size) * BLOCK_N
        col0 = v0 + ((pid % per_group) // group_size) * BLOCK_V
        rows = row0 + tl.arange(0, BLOCK_N)
        cols = col0 + tl.arange(0, BLOCK_V)
        h_desc, w_desc = _descriptors(hidden_ptr, weight_ptr, n1, v1, H, stride_h, stride_w, USE_TMA,
                                      BLOCK_N, BLOCK_V, BLOCK_K)
        z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, h_desc, w_desc, row0, col0, n1, v1, H, stride_h,
                        stride_w, inv_temp, HAS_BIAS, IEEE, USE_TMA, BLOCK_N, BLOCK_V, BLOCK_K)
        grad = logit_grad(z, cols, tl.minimum(rows, n1 - 1), labels_ptr, lse_ptr, entropy_ptr, grad_lp_ptr,
                          grad_ent_ptr, inv_temp, HAS_LP_GRAD, HAS_ENT_GRAD, BLOCK_N)
        grad = grad.to(out_ptr.dtype.element_ty)
        if USE_TMA and TMA_STORE:  # one bulk store instead of the matmul layout's scattered 2-byte writes
            o_desc = tl.make_tensor_descriptor(out_ptr, shape=[n1 - n0, v1 - v0], strides=[stride_out, 1],
                                               block_shape=[BLOCK_N, BLOCK_V])
            o_desc.store([row0 - n0, col0 - v0], grad)
        else:
            ptrs = out_ptr + (rows - n0).to(tl.int64)[:, None] * stride_out + (cols - v0)[None, :]
            tl.store(ptrs, grad, mask=(rows < n1)[:, None] & (cols < v1)[None, :])

    def _configs(forward: bool):
        # (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages, register cap, last). 128x128x64 in 3 stages capped at
        # 128 registers fits two programs per SM (cuobjdump: no spills), so one program's softmax epilogue
        # overlaps the other's matmul; the larger tiles reuse more of each load. The last field is
        # FLATTEN for the forward, TMA_STORE for the gradient kernel. What the H100 runs measured
        # (benchmarks/RESULTS.md, kernel_configs.py): the forward kept 256x128 at every shape, 128x256
        # ran it 1.4-2x slower, BLOCK_K = 128 1.2-1.5x slower, CTA clusters (num_ctas=2) do not compile;
        # the gradient kernel keeps 128x256 at most shapes; one-warpgroup 128x128 tiles never won.
        if forward:
            shapes = [(256, 128, 64, 8, 3, None, False), (256, 128, 64, 8, 4, None, False),
                      (256, 128, 64, 8, 3, None, True), (128, 128, 64, 8, 3, 128, False)]
            return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k, "FLATTEN": last, "num_splits": splits},
                                  num_warps=w, num_stages=s, maxnreg=r)
                    for n, v, k, w, s, r, last in shapes for splits in SPLIT_CHOICES]
        shapes = [(128, 128, 64, 8, 3, 128, False), (256, 128, 64, 8, 3, None, False),
                  (128, 256, 64, 8, 3, None, False), (128, 256, 64, 8, 4, None, False),
                  (128, 128, 64, 8, 3, None, False), (256, 128, 64, 8, 3, None, True)]
        return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k, "GROUP_N": 8, "TMA_STORE": last},
                              num_warps=w, num_stages=s, maxnreg=r) for n, v, k, w, s, r, last in shapes]

    # Tuned once per (H, V, log2 of the token count, flags): a configuration tuned at 4k tokens was
    # measured 10-30% off at 64k. Both kernels write every output they own, so re-running is harmless.
    _forward_tuned = triton.autotune(
        _configs(True), key=["H", "V", "n_bucket", "WITH_ENTROPY", "IEEE", "HAS_BIAS", "USE_TMA"]
    )(_forward_kernel)
    _grad_logits_tuned = triton.autotune(
        _configs(False), key=["H", "n_bucket", "HAS_LP_GRAD", "HAS_ENT_GRAD", "IEEE", "HAS_BIAS", "USE_TMA"]
    )(_grad_logits_kernel)


def use_tma(hidden: torch.Tensor) -> bool:
    """Bulk tensor copies need Hopper or newer and 16-byte aligned rows (weight has hidden's row size
    and is allocated whole, so it is aligned too)."""
    if not hidden.is_cuda:
        return interpreting()
    aligned = (hidden.shape[1] * hidden.element_size()) % 16 == 0 and hidden.data_ptr() % 16 == 0
    return aligned and torch.cuda.get_device_capability(hidden.device)[0] >= 9


def _scratch(size: int, alignment: int, stream):
    # Device-side tensor descriptors live in a small global scratch buffer per launch.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    try:  # keep an allocator the application set; triton has no public getter
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:
        pass
    triton.set_allocator(_scratch)


def _launch(tuned, raw, grid, *args, extra_meta, **flags) -> dict:
    """Launch the tuned kernel (or a fixed small configuration where tuning cannot run); returns the
    meta-parameters the launch used."""
    if interpreting():  # the interpreter (CPU tests) cannot time configurations: run a small one
        meta = {"BLOCK_N": 32, "BLOCK_V": 32, "BLOCK_K": 16, **extra_meta}
        raw[grid(meta)](*args, **flags, **meta)
        return meta
    if flags["USE_TMA"]:
        _ensure_allocator()
    if flags["IEEE"]:
        # fp32 inputs take the exact (non-tensor-core) dot: one small tile that neither spills nor
        # costs minutes of compiling a tuning sweep. fp32 is for checking, bf16 for speed.
        meta = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 16, **extra_meta}
        raw[grid(meta)](*args, **flags, **meta, num_warps=4, num_stages=2)
        return meta
    tuned[grid](*args, **flags)
    return tuned.best_config.kwargs


def fused_forward(hidden, weight, bias, labels, with_entropy: bool, inv_temp: float,
                  token_chunk: int | None = None):
    """Partial statistics `[4, splits, N]`: running max, sum of exp, sum of exp*z, label logit.

    Launched over `token_chunk` tokens at a time (default FORWARD_TOKEN_CHUNK). A program walks a whole
    vocabulary slice, so its weight tiles come from L2 only while the programs beside it walk in step;
    over the many waves of one launch they drift apart. On the H100 at H >= 2048 the forward ran
    1.25-1.29x cuBLAS in one launch and 1.02-1.07x in 4k-token launches (one wave each), while at
    H = 896, where the softmax work and not the loads bounds it, one launch was faster (1.21x against
    1.39x; benchmarks/kernel_scaling.py). The caller times both (`triton_logprobs._choose`)."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    # Room for the most slices any configuration uses; each launch fills the first `num_splits`. (The
    # tuner's trial runs write the other slots too, so only the used ones are returned.)
    partial = torch.empty((4, max(SPLIT_CHOICES), n), dtype=torch.float32, device=hidden.device)
    chunk = min(n, token_chunk or FORWARD_TOKEN_CHUNK)
    # Every launch is tuned under the full chunk's bucket, so the short last one keeps its configuration
    # and all launches fill the same number of slices.
    n_bucket = chunk.bit_length()
    used = None
    for n0 in range(0, n, chunk):
        rows = min(chunk, n - n0)

        def grid(meta, rows=rows):
            return (triton.cdiv(rows, meta["BLOCK_N"]) * meta["num_splits"],)

        used = _launch(
            _forward_tuned, _forward_kernel, grid,
            hidden[n0:], weight, weight if bias is None else bias, labels[n0:], partial[:, :, n0:],
            rows, vocab, h, hidden.stride(0), weight.stride(0), inv_temp, partial.stride(0), partial.stride(1),
            n_bucket, extra_meta={"FLATTEN": False, "num_splits": DEFAULT_SPLITS},
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, IEEE=hidden.dtype == torch.float32,
            USE_TMA=use_tma(hidden),
        )
    return partial[:, : used["num_splits"]]


def fused_grad_logits(out, hidden, weight, bias, labels, lse, entropy, grad_lp, grad_ent, n0, n1, v0, v1,
                      inv_temp):
    """out[: n1 - n0, : v1 - v0] = gradient of the raw logits of rows [n0, n1) x vocabulary [v0, v1)."""
    h = hidden.shape[1]
    unused = lse  # stands in for the pointers a flag switches off
    def grid(meta):
        return (triton.cdiv(n1 - n0, meta["BLOCK_N"]) * triton.cdiv(v1 - v0, meta["BLOCK_V"]),)
    _launch(
        _grad_logits_tuned, _grad_logits_kernel, grid,
        hidden, weight, weight if bias is None else bias, labels, lse,
        unused if entropy is None else entropy, unused if grad_lp is None else grad_lp,
        unused if grad_ent is None else grad_ent, out,
        n0, n1, v0, v1, h, hidden.stride(0), weight.stride(0), out.stride(0), inv_temp, (n1 - n0).bit_length(),
        extra_meta={"GROUP_N": 4, "TMA_STORE": interpreting()},
        HAS_BIAS=bias is not None, HAS_LP_GRAD=grad_lp is not None, HAS_ENT_GRAD=grad_ent is not None,
        IEEE=hidden.dtype == torch.float32, USE_TMA=use_tma(hidden),
    )
