"""Triton path of linear -> log-prob (+ entropy) on CUDA: autograd, chunking, choice of strategy.

Two strategies compute the same function with the same fp32 statistics and the same memory bound:

- fused (`triton_fused.py`): Triton matmul tiles with the softmax statistics (forward) or the logit
  gradient (backward) computed in the matmul's epilogue; logits never reach memory.
- tiles (`triton_tiles.py`): cuBLAS writes a bounded fp32 block of logits, one Triton pass folds it.
  It wins where cuBLAS's matmul advantage over Triton's exceeds the cost of that pass (large H).

Forward: online log-sum-exp over vocabulary chunks, O(N) state. Backward: the gradient of the logits
depends on the upstream per-token gradients, so it is recomputed, one `[token_chunk, vocab_chunk]`
block at a time, into a reused buffer in the input dtype; cuBLAS then adds G @ W to dH (fp32
accumulator) and writes G^T @ h into dW (one matmul per vocabulary chunk, fp32 inside cuBLAS). That is
four matmuls of the LM head's size in all: the floor of three plus the recompute.

The strategy is timed once per shape on first use (as Triton autotunes) and the faster kept (the
forward also times the fused kernel in one launch against its token-chunked launches);
`ALIGN_KERNELS_STRATEGY=fused|tiles` forces one.
"""

from __future__ import annotations

import os

import torch

from . import triton_fused
from .triton_fused import AVAILABLE, fused_forward, fused_grad_logits, interpreting
from .triton_tiles import logits_fp32, tiles_fold, tiles_grad

STRATEGIES = ("fused", "tiles")
# Bounded working blocks, independent of V: the fused backward holds one gradient block in the input
# dtype (`grad_budget`); tiles hold an fp32 logits block (512 MiB) and, backward, a gradient block
# beside it.
GRAD_BUFFER_ELEMENTS = 1 << 29  # the most the fused backward's block may hold (1 GiB in bf16)
GRAD_BUFFER_FLOOR = 1 << 28
TILE_ELEMENTS = 1 << 27
MIN_VOCAB_CHUNK = 2048  # keeps the dH accumulation matmul compute-bound (K = vocabulary chunk)
MAX_VOCAB_CHUNK = 16384

_chosen: dict[tuple, str] = {}


def plan(n: int, budget: int) -> tuple[int, int]:
    """(token_chunk, vocab_chunk) with token_chunk * vocab_chunk <= budget; all tokens in one chunk
    whenever that leaves a vocabulary chunk of at least MIN_VOCAB_CHUNK.

    Wide token chunks read and write the fp32 dH accumulator once per (narrower) vocabulary chunk.
    Square 16k x 16k blocks halve that traffic at 64k tokens, but measured no faster on the H100
    (benchmarks/RESULTS.md, run 5: cuBLAS overlaps the accumulator's reads with its matmul) and held
    an fp32 dW slice more, so the widest token chunk is kept."""
    token_chunk = n if n * MIN_VOCAB_CHUNK <= budget else budget // MIN_VOCAB_CHUNK
    vocab_chunk = max(MIN_VOCAB_CHUNK, min(MAX_VOCAB_CHUNK, budget // token_chunk // 256 * 256))
    return token_chunk, vocab_chunk


def grad_budget(n: int, h: int) -> int:
    """Elements of the fused backward's gradient block for n tokens of hidden size h.

    A wider block means fewer vocabulary chunks, so fewer passes over the fp32 dH accumulator: 2^29
    elements ran the 64k-token backward 1.7-2.2% faster than 2^28 for 0.5 GiB more (2^30: 0.6-1.1% more
    for another GiB; benchmarks/kernel_scaling.py). The block grows past 2^28 only where it stays within
    twice the bytes of that accumulator (4 n h elements), so it never dominates the backward's memory."""
    return min(GRAD_BUFFER_ELEMENTS, max(GRAD_BUFFER_FLOOR, 4 * n * h))


def _blocks(n: int, vocab: int, budget: int):
    """(n0, n1, v0, v1) blocks, vocabulary outer, so each dW slice is finished before the next."""
    token_chunk, vocab_chunk = plan(n, budget)
    for v0 in range(0, vocab, vocab_chunk):
        for n0 in range(0, n, token_chunk):
            yield n0, min(n0 + token_chunk, n), v0, min(v0 + vocab_chunk, vocab)


def _padded(cols: int) -> int:
    return -(-cols // 16) * 16  # rows start 16-byte aligned, as bulk (TMA) stores want


def _buffer(n: int, vocab: int, budget: int, dtype, device) -> torch.Tensor:
    """Flat storage for the largest block `_blocks` yields (rows padded as `_view(padded=True)` lays them)."""
    token_chunk, vocab_chunk = plan(n, budget)
    return torch.empty(min(token_chunk, n) * _padded(min(vocab_chunk, vocab)), dtype=dtype, device=device)


def _view(buffer: torch.Tensor, rows: int, cols: int, padded: bool = False) -> torch.Tensor:
    """A `[rows, cols]` block of `buffer`: contiguous (as cuBLAS `out=` wants) or with padded rows."""
    stride = _padded(cols) if padded else cols
    return buffer[: rows * stride].view(rows, stride)[:, :cols]


def _combine(run_max, sum_exp, sum_exp_z, target, with_entropy: bool):
    """Merge `[S, N]` partial statistics into (logprobs, entropy or None, lse)."""
    row_max = run_max.amax(dim=0)
    # A partial that saw no column holds max = -inf and sums = 0: its weight is exp(-inf) = 0.
    weight = torch.exp(run_max - row_max)
    total = (sum_exp * weight).sum(dim=0)
    lse = row_max + torch.log(total)
    logprobs = target.sum(dim=0) - lse
    # H = -sum p log p = lse - sum p z
    entropy = lse - (sum_exp_z * weight).sum(dim=0) / total if with_entropy else None
    return logprobs, entropy, lse


def _forward_fused(hidden, weight, bias, labels, with_entropy, inv_temp, token_chunk=None):
    partial = fused_forward(hidden, weight, bias, labels, with_entropy, inv_temp, token_chunk)
    return _combine(*partial, with_entropy)


def _forward_tiles(hidden, weight, bias, labels, with_entropy, inv_temp):
    n, vocab = hidden.shape[0], weight.shape[0]
    state = torch.zeros((4, n), dtype=torch.float32, device=hidden.device)
    state[0].fill_(float("-inf"))
    block = _buffer(n, vocab, TILE_ELEMENTS, torch.float32, hidden.device)
    for n0, n1, v0, v1 in _blocks(n, vocab, TILE_ELEMENTS):
        logits = logits_fp32(_view(block, n1 - n0, v1 - v0), hidden[n0:n1], weight[v0:v1])
        tiles_fold(state[:, n0:n1], logits, bias, labels[n0:n1], v0, with_entropy, inv_temp)
    return _combine(*state[:, None], with_entropy)


def _addmm_fp32(acc, a, b):
    """acc += a @ b with fp32 accumulation and no rounding of the product to a's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # the interpreter on CPU
        acc.addmm_(a.float(), b.float())


def _backward(strategy, hidden, weight, bias, labels, lse, entropy, grad_lp, grad_ent, inv_temp, needs,
              budget=None):
    need_h, need_w, need_b = needs
    n, h = hidden.shape
    vocab = weight.shape[0]
    if budget is None:
        budget = grad_budget(n, h) if strategy == "fused" else TILE_ELEMENTS
    token_chunk, vocab_chunk = plan(n, budget)
    one_token_chunk = token_chunk >= n
    grad_block = _buffer(n, vocab, budget, hidden.dtype, hidden.device)
    logits_block = _buffer(n, vocab, budget, torch.float32, hidden.device) if strategy == "tiles" else None
    dh = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_h else None
    # With all tokens in one chunk each dW slice is one matmul (fp32 accumulation inside cuBLAS),
    # written straight in the weight's dtype; otherwise a slice accumulates across token chunks in an
    # fp32 buffer (blocks come vocabulary-outer) and is written when its last token chunk is in.
    dw = torch.empty_like(weight) if need_w else None
    dw_slice = None
    if need_w and not one_token_chunk:
        dw_slice = torch.empty((min(vocab_chunk, vocab), h), dtype=torch.float32, device=weight.device)
    db = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None

    def rows(t, n0, n1):
        return None if t is None else t[n0:n1]

    for n0, n1, v0, v1 in _blocks(n, vocab, budget):
        g = _view(grad_block, n1 - n0, v1 - v0, padded=True)
        if strategy == "fused":
            fused_grad_logits(g, hidden, weight, bias, labels, lse, entropy, grad_lp, grad_ent,
                              n0, n1, v0, v1, inv_temp)
        else:
            logits = logits_fp32(_view(logits_block, n1 - n0, v1 - v0), hidden[n0:n1], weight[v0:v1])
            tiles_grad(g, logits, bias, labels[n0:n1], lse[n0:n1], rows(entropy, n0, n1),
                       rows(grad_lp, n0, n1), rows(grad_ent, n0, n1), v0, inv_temp)
        if need_h:
            _addmm_fp32(dh[n0:n1], g, weight[v0:v1])
        if need_w and one_token_chunk:
            if g.is_cuda or g.dtype == torch.float32:
                torch.mm(g.t(), hidden, out=dw[v0:v1])
            else:
                dw[v0:v1] = (g.t().float() @ hidden.float()).to(dw.dtype)
        elif need_w:
            acc = dw_slice[: v1 - v0]
            if n0 == 0:
                acc.zero_()
            _addmm_fp32(acc, g.t(), hidden[n0:n1])
            if n1 == n:
                dw[v0:v1] = acc
        if need_b:
            db[v0:v1] += g.sum(dim=0, dtype=torch.float32)
    return (
        None if dh is None else dh.to(hidden.dtype),
        dw,
        None if db is None else db.to(bias.dtype),
    )


def elapsed_ms(run) -> float:
    """GPU milliseconds of one `run()`, between CUDA events (also the benchmarks' timer)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _choose(key: tuple, runs: dict):
    """Run `runs[strategy]()` for the strategy kept for `key`; on first use time each and keep the faster."""
    forced = os.environ.get("ALIGN_KERNELS_STRATEGY")
    if forced:
        if forced not in runs:
            raise ValueError(f"ALIGN_KERNELS_STRATEGY={forced!r}; expected one of {STRATEGIES}")
        return runs[forced]()
    if key not in _chosen:
        if interpreting() or not torch.cuda.is_available():
            _chosen[key] = "fused"
        else:
            times = {}
            for name, run in runs.items():
                run()  # compiles and tunes outside the timing
                times[name] = min(elapsed_ms(run) for _ in range(2))
            _chosen[key] = min(times, key=times.get)
    return runs[_chosen[key]]()


def _shape_key(kind, hidden, weight, bias, *flags):
    n, h = hidden.shape
    return (kind, hidden.device.index, hidden.dtype, h, weight.shape[0], n.bit_length(), bias is not None, *flags)


class TritonLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, with_entropy, temperature):
        ctx.set_materialize_grads(False)
        hidden, weight = hidden.contiguous(), weight.contiguous()
        inv_temp = 1.0 / temperature
        args = (hidden, weight, bias, labels, with_entropy, inv_temp)
        runs = {"fused": lambda: _forward_fused(*args), "tiles": lambda: _forward_tiles(*args)}
        if hidden.shape[0] > triton_fused.FORWARD_TOKEN_CHUNK:  # see fused_forward: which is faster depends on H
            runs["fused-one-launch"] = lambda: _forward_fused(*args, token_chunk=hidden.shape[0])
        logprobs, entropy, lse = _choose(_shape_key("forward", hidden, weight, bias, with_entropy), runs)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.inv_temp = inv_temp
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        if entropy is None:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 6
        grad_lp = None if grad_logprobs is None else grad_logprobs.float().contiguous()
        grad_ent = None if grad_entropy is None else grad_entropy.float().contiguous()
        needs = tuple(ctx.needs_input_grad[:3])
        args = (hidden, weight, bias, labels, lse, entropy, grad_lp, grad_ent, ctx.inv_temp, needs)
        grads = _choose(
            _shape_key("backward", hidden, weight, bias, grad_lp is not None, grad_ent is not None, needs),
            {name: (lambda name=name: _backward(name, *args)) for name in STRATEGIES},
        )
        return (*grads, None, None, None)


def triton_linear_logprobs(hidden, weight, labels, bias=None, *, with_entropy=False, temperature=1.0):
    """Triton path for valid labels only; see `align_cli.kernels.linear_logprobs` for the contract."""
    if not AVAILABLE:
        raise RuntimeError("Triton is not installed; use the torch path (backend='torch').")
    return TritonLinearLogprobs.apply(hidden, weight, bias, labels.contiguous(), with_entropy, float(temperature))
