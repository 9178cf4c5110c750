"""Fused linear -> log-prob (+ entropy) kernels: per-token log-probs without materialising logits.

`linear_logprobs(hidden, weight, labels)` returns, for every position, `log softmax(hidden @ weight.T /
temperature)[label]` and optionally the full-vocabulary entropy, without ever holding the `[N, V]`
logits. On CUDA with Triton it runs Triton kernels (`triton_logprobs.py`: fused matmul + softmax
kernels, or cuBLAS blocks folded by Triton, whichever is faster for the shape); elsewhere a chunked
torch implementation with the same results and memory bound (`chunked.py`).

Backend choice: the `backend` argument, else the environment variable `ALIGN_KERNELS_BACKEND`
(`auto`, `torch` or `triton`), else `auto` (Triton on CUDA tensors when Triton imports).
"""

from __future__ import annotations

import os

import torch

from . import triton_fused
from .chunked import chunked_linear_logprobs
from .triton_logprobs import triton_linear_logprobs

__all__ = ["linear_logprobs", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend that `linear_logprobs` would use for tensors on `device`: 'torch' or 'triton'."""
    choice = backend or os.environ.get("ALIGN_KERNELS_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernels backend {choice!r}; expected one of {BACKENDS}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_fused.AVAILABLE else "torch"
    return choice


def _zeros_connected(n: int, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # An all-ignored batch still returns a tensor attached to the graph, so `loss.backward()` works
    # and every rank of a distributed job runs the same autograd graph.
    anchor = hidden[:0].float().sum() + weight[:0].float().sum()
    return torch.zeros(n, dtype=torch.float32, device=hidden.device) + anchor


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    with_entropy: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob of `labels` under `softmax((hidden @ weight.T + bias) / temperature)`.

    hidden [..., H], weight [V, H], labels [...] (int), bias [V] or None. Returns `(logprobs, entropy)`
    shaped like `labels`, float32 whatever the input dtype; `entropy` is None unless `with_entropy`.
    Both are differentiable with respect to hidden, weight and bias. Positions whose label is
    `ignore_index` get log-prob 0 and entropy 0, receive no gradient and never reach the LM head.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    vocab, h = weight.shape
    if hidden.shape[-1] != h:
        raise ValueError(f"hidden size {hidden.shape[-1]} != weight's {h}")
    out_shape = labels.shape
    hidden, labels = hidden.reshape(-1, h), labels.reshape(-1)
    if weight.dtype != hidden.dtype:  # e.g. fp32 master weights with bf16 activations: compute in hidden's dtype
        weight = weight.to(hidden.dtype)
    n = labels.numel()

    valid = labels != ignore_index
    rows = valid.nonzero().squeeze(1)  # one host sync, also giving the count
    picked = labels[rows]
    if bool(((picked < 0) | (picked >= vocab)).any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    if rows.numel() == 0:
        zeros = _zeros_connected(n, hidden, weight).reshape(out_shape)
        return zeros, (zeros.clone() if with_entropy else None)
    all_valid = rows.numel() == n
    hidden_valid = hidden if all_valid else hidden[rows]

    impl = triton_linear_logprobs if resolve_backend(hidden.device, backend) == "triton" else chunked_linear_logprobs
    # The kernels choose their own dtypes; autocast must not recast their matmuls.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logprobs, entropy = impl(hidden_valid, weight, picked, bias, with_entropy=with_entropy,
                                 temperature=temperature)

    def scatter(values):
        if values is None or all_valid:
            return None if values is None else values.reshape(out_shape)
        full = values.new_zeros(n).index_put((rows,), values)  # differentiable w.r.t. values
        return full.reshape(out_shape)

    return scatter(logprobs), scatter(entropy)
