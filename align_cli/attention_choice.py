"""Which attention kernel a packed row runs under `align_packed`: measured, once per shape bucket.

The faster of FlexAttention and flash varlen depends on the row's length, its sequences' lengths, prompt
sharing, the head shape and the GPU, so no constant decides it. The first time a bucket is seen, every
candidate runs one attention call forward and backward on random inputs of that batch's shapes and layout
(one warm-up, then `repeats` timed rounds, candidates interleaved, CUDA events on CUDA and the wall clock
elsewhere), and the bucket keeps the one with the lowest median. Buckets: the row length and the mean
tokens per sequence, each rounded up to a power of two, prompt sharing, heads, key/value heads, head dim,
dtype, device type. Each decision is printed once (process 0) and listed in summary.json's `attention`.

The trial leaves training untouched: its inputs come from a generator of its own (the global RNG streams
are not drawn from), its gradients are returned by `torch.autograd.grad` and dropped (no `.grad` is
written), and it runs under `enable_grad` whatever the caller's grad mode.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch


class Bucket(NamedTuple):
    device: str
    row_tokens: int           # the row's length, rounded up to a power of two
    tokens_per_sequence: int  # row length / sequences, rounded up to a power of two
    shares_prompts: bool
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str


def power_of_two_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_of(row_tokens: int, sequences: int, shares_prompts: bool, heads: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: torch.device) -> Bucket:
    return Bucket(device.type, power_of_two_at_least(row_tokens),
                  power_of_two_at_least(row_tokens // max(1, sequences)), bool(shares_prompts), heads, kv_heads,
                  head_dim, str(dtype).removeprefix("torch."))


@dataclass
class Decision:
    bucket: Bucket
    chosen: str
    milliseconds: dict  # candidate -> median fwd+bwd time of one attention call
    unavailable: dict   # candidate -> why it was not tried

    def as_dict(self) -> dict:
        return {"bucket": self.bucket._asdict(), **{k: v for k, v in asdict(self).items() if k != "bucket"}}

    def line(self) -> str:
        b = self.bucket
        timed = ", ".join(f"{name} {ms:.3f} ms" for name, ms in self.milliseconds.items()) or "not timed"
        skipped = "".join(f"; {name} not tried: {why}" for name, why in self.unavailable.items())
        return (f"Packed attention: rows <= {b.row_tokens} tokens, <= {b.tokens_per_sequence} per sequence, "
                f"{'shared' if b.shares_prompts else 'unshared'} prompts, {b.heads}/{b.kv_heads} heads x {b.head_dim} "
                f"{b.dtype}: {self.chosen} ({timed}{skipped})")


class BackendChooser:
    """Per bucket, the candidate with the lowest measured fwd+bwd time (module docstring)."""

    def __init__(self, repeats: int = 3):
        self.repeats = repeats
        self.decisions: dict[Bucket, Decision] = {}

    def known(self, bucket: Bucket) -> str | None:
        decision = self.decisions.get(bucket)
        return decision.chosen if decision is not None else None

    def choose(self, bucket: Bucket, trials: Callable[[], dict[str, Callable[[], None]]],
               unavailable: dict[str, str] | None = None) -> str:
        """The bucket's backend; the first time, `trials()` gives each candidate's one fwd+bwd run to time (one
        candidate is taken untimed)."""
        if (chosen := self.known(bucket)) is not None:
            return chosen
        candidates = trials()
        milliseconds = measure(candidates, torch.device(bucket.device), self.repeats) if len(candidates) > 1 else {}
        chosen = min(milliseconds, key=milliseconds.get) if milliseconds else next(iter(candidates))
        decision = Decision(bucket, chosen, milliseconds, dict(unavailable or {}))
        self.decisions[bucket] = decision
        if _main_process():
            print(decision.line(), file=sys.stderr, flush=True)
        return chosen

    def report(self) -> list[dict]:
        return [decision.as_dict() for decision in self.decisions.values()]

    def clear(self) -> None:
        self.decisions.clear()


CHOOSER = BackendChooser()


def attention_report() -> list[dict]:
    """summary.json's `attention`: every measured decision of this process."""
    return CHOOSER.report()


def measure(candidates: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median milliseconds of each candidate's call: one warm-up each (compilation, allocation), then `repeats`
    rounds with the candidates interleaved, so drift in clocks or load falls on all alike."""
    with torch.enable_grad():
        for run in candidates.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, run in candidates.items():
                times[name].append(_timed(run, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _timed(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    run()
    return 1e3 * (time.perf_counter() - started)


def attention_trials(forwards: dict[str, Callable], heads: int, kv_heads: int, head_dim: int, row_tokens: int,
                     dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[], None]]:
    """Per candidate, a closure running its `forward(query, key, value)` (`[1, H, T, D]` in, `[1, T, H, D]` out) and
    the backward to query, key and value, on random inputs from a private generator, shared by all candidates."""
    generator = torch.Generator(device=device).manual_seed(0)

    def draw(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_()

    query, key, value = draw(1, heads, row_tokens, head_dim), draw(1, kv_heads, row_tokens, head_dim), \
        draw(1, kv_heads, row_tokens, head_dim)
    grad_output = torch.randn((1, row_tokens, heads, head_dim), generator=generator, device=device, dtype=dtype)

    def trial(forward):
        def run():
            output = forward(query, key, value)
            torch.autograd.grad(output, (query, key, value), grad_output)
        return run

    return {name: trial(forward) for name, forward in forwards.items()}


def _main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0
