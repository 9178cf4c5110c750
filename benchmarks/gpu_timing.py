"""What the kernel benchmarks share: command line, random LM heads, CUDA-event timing (not a test).

Imported by fused_logprobs.py, kernel_parts.py, kernel_configs.py and kernel_scaling.py, which run as scripts
from this folder (`python3 benchmarks/<name>.py`), so a sibling import finds it. The event timer itself
is the one the kernels time their strategies with (`triton_logprobs.elapsed_ms`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from align_cli.kernels.triton_logprobs import elapsed_ms


def gpu_args(doc: str) -> argparse.Namespace:
    """`--out DIR` (default: $OUT or the current directory); exits where there is no CUDA GPU."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    return args


def random_head(n: int, h: int, v: int):
    """bf16 hidden [n, h], weight [v, h] scaled to logits of a few units, labels [n]; seeded by the shape."""
    g = torch.Generator(device="cuda").manual_seed(n + h + v)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = (torch.randn(v, h, device="cuda", generator=g) * (3.0 / h**0.5)).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    return hidden, weight, labels


def median_ms(fn, repeats: int = 7) -> float:
    """Median of `repeats` CUDA-event timings of `fn()`, after one untimed call."""
    fn()
    torch.cuda.synchronize()
    return statistics.median(elapsed_ms(fn) for _ in range(repeats))


def matmul_ms(hidden, weight, repeats: int = 7) -> float:
    """One cuBLAS bf16 matmul `hidden @ weight.T` into an [N, V] buffer (a third of the floor)."""
    logits = torch.empty(hidden.shape[0], weight.shape[0], device="cuda", dtype=torch.bfloat16)
    return median_ms(lambda: torch.mm(hidden, weight.t(), out=logits), repeats)
