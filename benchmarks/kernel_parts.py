"""Where the Triton path's time goes, part by part (not a test).

    python benchmarks/kernel_parts.py [--out DIR]

For a few large bf16 shapes it times, each as the median of repeated CUDA-event timings:

  mm bf16       one cuBLAS matmul h @ W.T into an [N, V] bf16 buffer (a third of the floor)
  fwd fused     our fused forward kernel (matmul + softmax statistics), all blocks
  tiles mm      cuBLAS fp32-output matmuls of the tiles strategy's blocks
  tiles fold    the Triton fold of those blocks alone (memory-bound pass)
  grad kernel   the fused backward's logit-gradient kernel (recompute + gradient), all blocks
  dH mm, dW mm  the backward's two cuBLAS matmuls over the same blocks

so the forward's and the backward's distance to cuBLAS can be split into matmul and softmax work.
Writes kernel_parts.json to --out (default: $OUT or the current directory).
"""

from __future__ import annotations

import json
import os

import torch
from gpu_timing import gpu_args, matmul_ms, median_ms, random_head

SHAPES = [(16384, 896, 151936), (16384, 4096, 128256), (65536, 2048, 128256), (65536, 4096, 128256)]


def parts(n: int, h: int, v: int) -> dict:
    from align_cli.kernels import triton_logprobs as tl_
    from align_cli.kernels.triton_fused import fused_grad_logits
    from align_cli.kernels.triton_tiles import logits_fp32, tiles_fold

    hidden, weight, labels = random_head(n, h, v)
    grad_lp = torch.randn(n, device="cuda")
    row = {"N": n, "H": h, "V": v}

    row["mm bf16"] = matmul_ms(hidden, weight)
    row["fwd fused"] = median_ms(lambda: tl_._forward_fused(hidden, weight, None, labels, False, 1.0))
    lse = tl_._forward_fused(hidden, weight, None, labels, False, 1.0)[2]

    tile_blocks = list(tl_._blocks(n, v, tl_.TILE_ELEMENTS))
    block = tl_._buffer(n, v, tl_.TILE_ELEMENTS, torch.float32, hidden.device)
    views = [tl_._view(block, n1 - n0, v1 - v0) for n0, n1, v0, v1 in tile_blocks]
    row["tiles mm"] = median_ms(lambda: [logits_fp32(view, hidden[n0:n1], weight[v0:v1])
                                         for view, (n0, n1, v0, v1) in zip(views, tile_blocks)])
    state = torch.zeros((4, n), dtype=torch.float32, device="cuda")
    # The fold reads whatever the block holds (the last matmul's logits): its cost does not depend on it.
    row["tiles fold"] = median_ms(lambda: [tiles_fold(state[:, n0:n1], view, None, labels[n0:n1], v0, False, 1.0)
                                           for view, (n0, n1, v0, v1) in zip(views, tile_blocks)])

    budget = tl_.grad_budget(n, h)
    grad_blocks = list(tl_._blocks(n, v, budget))
    grad_buffer = tl_._buffer(n, v, budget, hidden.dtype, hidden.device)
    grads = [tl_._view(grad_buffer, n1 - n0, v1 - v0, padded=True) for n0, n1, v0, v1 in grad_blocks]
    row["grad kernel"] = median_ms(lambda: [
        fused_grad_logits(gb, hidden, weight, None, labels, lse, None, grad_lp, None, n0, n1, v0, v1, 1.0)
        for gb, (n0, n1, v0, v1) in zip(grads, grad_blocks)])
    dh = torch.zeros((n, h), dtype=torch.float32, device="cuda")
    row["dH mm"] = median_ms(lambda: [tl_._addmm_fp32(dh[n0:n1], gb, weight[v0:v1])
                                      for gb, (n0, n1, v0, v1) in zip(grads, grad_blocks)])
    dw = torch.empty_like(weight)
    row["dW mm"] = median_ms(lambda: [torch.mm(gb.t(), hidden[n0:n1], out=dw[v0:v1])
                                      for gb, (n0, n1, v0, v1) in zip(grads, grad_blocks)])
    row["blocks"] = {"tiles": len(tile_blocks), "grad": len(grad_blocks)}
    return row


def main():
    args = gpu_args(__doc__)
    rows = []
    for shape in SHAPES:
        row = parts(*shape)
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    names = ["mm bf16", "fwd fused", "tiles mm", "tiles fold", "grad kernel", "dH mm", "dW mm"]
    print("\n| N | H | V | " + " | ".join(names) + " | fused/mm | tiles/mm | grad/mm |")
    print("|" + "---|" * (len(names) + 6))
    for r in rows:
        mm = r["mm bf16"]
        print(f"| {r['N']} | {r['H']} | {r['V']} | " + " | ".join(f"{r[k]:.1f}" for k in names)
              + f" | {r['fwd fused'] / mm:.2f} | {(r['tiles mm'] + r['tiles fold']) / mm:.2f}"
              + f" | {r['grad kernel'] / mm:.2f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_parts.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
