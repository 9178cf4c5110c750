"""Tile configurations of the fused forward kernel, one by one, against a cuBLAS matmul (not a test).

    python benchmarks/kernel_configs.py [--out DIR]

The autotuner only says which of its candidates won; this times every candidate, and some that are
not candidates (BLOCK_K = 128, CTA clusters, other vocabulary splits), at a few bf16 shapes, so a new
candidate is added for a measured reason. Each time is the median of repeated CUDA-event timings, next
to one cuBLAS bf16 matmul of the same LM head. A configuration that fails to compile or launch is
reported with its error. Writes kernel_configs.json to --out (default: $OUT or the current directory).
"""

from __future__ import annotations

import json
import os

import torch
from gpu_timing import gpu_args, matmul_ms, median_ms, random_head

SHAPES = [(16384, 896, 151936), (16384, 4096, 128256), (65536, 4096, 128256)]
# (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages, register cap, FLATTEN, num_ctas, vocabulary splits)
# Run 7 (benchmarks/RESULTS.md) measured these; the tuner's candidates are the 256x128 and the capped
# 128x128 rows, each with 8, 16 and 32 splits.
CONFIGS = [
    (256, 128, 64, 8, 3, None, False, 1, 16),
    (256, 128, 64, 8, 4, None, False, 1, 16),
    (256, 128, 64, 8, 3, None, True, 1, 16),
    (128, 256, 64, 8, 3, None, False, 1, 16),
    (128, 256, 64, 8, 4, None, False, 1, 16),
    (128, 128, 64, 8, 3, 128, False, 1, 16),
    (256, 128, 128, 8, 2, None, False, 1, 16),
    (128, 256, 128, 8, 2, None, False, 1, 16),
    (256, 128, 64, 8, 3, None, False, 2, 16),
    (256, 128, 64, 8, 3, None, False, 1, 8),
    (256, 128, 64, 8, 3, None, False, 1, 32),
]
REPEATS = 9


def launcher(hidden, weight, labels, config):
    import triton
    from align_cli.kernels import triton_fused

    block_n, block_v, block_k, warps, stages, maxnreg, flatten, ctas, splits = config
    n, h = hidden.shape
    vocab = weight.shape[0]
    partial = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    triton_fused._ensure_allocator()
    grid = (triton.cdiv(n, block_n) * splits,)
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}

    def run():
        triton_fused._forward_kernel[grid](
            hidden, weight, weight, labels, partial, n, vocab, h, hidden.stride(0), weight.stride(0), 1.0,
            partial.stride(0), partial.stride(1), n.bit_length(), num_splits=splits,
            HAS_BIAS=False, WITH_ENTROPY=False, IEEE=False, USE_TMA=True, FLATTEN=flatten, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k,
            num_warps=warps, num_stages=stages, num_ctas=ctas, **extra)

    return run, partial


def reference_stats(hidden, weight, labels):
    """Row max and log-sum-exp in fp32 over vocabulary chunks: checks each configuration's partials."""
    lse = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
    for v0 in range(0, weight.shape[0], 16384):
        logits = torch.mm(hidden, weight[v0:v0 + 16384].t(), out_dtype=torch.float32)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
    return lse


def lse_of(partial):
    row_max = partial[0].amax(dim=0)
    return row_max + torch.log((partial[1] * torch.exp(partial[0] - row_max)).sum(dim=0))


def main():
    args = gpu_args(__doc__)
    rows = []
    for n, h, v in SHAPES:
        hidden, weight, labels = random_head(n, h, v)
        mm = matmul_ms(hidden, weight, REPEATS)
        expected = reference_stats(hidden, weight, labels)
        for config in CONFIGS:
            row = {"N": n, "H": h, "V": v, "config": config, "mm_ms": mm}
            try:
                run, partial = launcher(hidden, weight, labels, config)
                row["ms"] = median_ms(run, REPEATS)
                row["max_lse_error"] = (lse_of(partial) - expected).abs().max().item()
            except Exception as exc:  # a configuration the compiler or the GPU refuses: report it
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        torch.cuda.empty_cache()
    print("\n| N | H | config (BN, BV, BK, warps, stages, maxnreg, flatten, ctas, splits) | ms | vs mm | lse err |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        result = (f"{r['ms']:.2f} | {r['ms'] / r['mm_ms']:.3f} | {r['max_lse_error']:.1e}" if "ms" in r
                  else f"{r['error'][:80]} | - | -")
        print(f"| {r['N']} | {r['H']} | {r['config']} | {result} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_configs.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
