"""Why the fused path's distance to cuBLAS grows with the token count, and what closes it (not a test).

    python benchmarks/kernel_scaling.py [--out DIR]

At 16k tokens the fused forward runs 1.14-1.19x one cuBLAS matmul, at 64k tokens 1.26-1.32x
(benchmarks/RESULTS.md). A forward program walks a whole vocabulary slice for one token tile, so its
weight tiles are shared from L2 only while the programs in flight stay in step; over many waves they
drift apart. Two measurements:

  forward chunks   the fused forward over all N tokens in one launch, then in launches of 2k-8k
                   tokens (each launch starts its programs together; `token_chunk`), against
                   the cuBLAS matmul
  grad budget      the whole fused backward at budgets of 2^27-2^30 gradient elements: a larger
                   block means fewer vocabulary chunks, so fewer passes over the fp32 dH accumulator,
                   at the cost of the block's memory

Writes kernel_scaling.json to --out (default: $OUT or the current directory).
"""

from __future__ import annotations

import json
import os

import torch
from gpu_timing import gpu_args, matmul_ms, median_ms, random_head

FORWARD_SHAPES = [(16384, 896, 151936), (16384, 4096, 128256), (65536, 2048, 128256), (65536, 4096, 128256)]
TOKEN_CHUNKS = [2048, 4096, 8192]
BACKWARD_SHAPES = [(65536, 2048, 128256), (65536, 4096, 128256)]
BUDGETS = [1 << 27, 1 << 28, 1 << 29, 1 << 30]


def forward_in_chunks(hidden, weight, labels, chunk: int):
    from align_cli.kernels.triton_fused import fused_forward

    return fused_forward(hidden, weight, None, labels, False, 1.0, token_chunk=chunk)


def forward_rows(n: int, h: int, v: int) -> list[dict]:
    from align_cli.kernels import triton_logprobs as tl_

    hidden, weight, labels = random_head(n, h, v)
    mm = matmul_ms(hidden, weight)
    reference = tl_._combine(*forward_in_chunks(hidden, weight, labels, n), False)[2]
    rows = []
    for chunk in [n] + [c for c in TOKEN_CHUNKS if c < n]:
        ms = median_ms(lambda chunk=chunk: forward_in_chunks(hidden, weight, labels, chunk))
        partial = forward_in_chunks(hidden, weight, labels, chunk)
        lse = tl_._combine(*partial, False)[2]
        rows.append({"N": n, "H": h, "V": v, "token chunk": chunk, "splits": partial.shape[1],
                     "mm_ms": mm, "ms": ms, "ratio": ms / mm,
                     "max_lse_diff": (lse - reference).abs().max().item()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def backward_rows(n: int, h: int, v: int) -> list[dict]:
    from align_cli.kernels import triton_logprobs as tl_

    hidden, weight, labels = random_head(n, h, v)
    grad_lp = torch.randn(n, device="cuda")
    lse = tl_._forward_fused(hidden, weight, None, labels, False, 1.0)[2]
    rows = []
    for budget in BUDGETS:

        def run(budget=budget):
            return tl_._backward("fused", hidden, weight, None, labels, lse, None, grad_lp, None, 1.0,
                                 (True, True, False), budget=budget)

        ms = median_ms(run)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30
        rows.append({"N": n, "H": h, "V": v, "budget": budget, "blocks": len(list(tl_._blocks(n, v, budget))),
                     "ms": ms, "peak_extra_gib": peak})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    args = gpu_args(__doc__)
    result = {"forward": [], "backward": []}
    for shape in FORWARD_SHAPES:
        result["forward"] += forward_rows(*shape)
        torch.cuda.empty_cache()
    for shape in BACKWARD_SHAPES:
        result["backward"] += backward_rows(*shape)
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_scaling.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
