"""Which attention kernel a packed row runs under `align_packed`: measured, once per shape bucket.

The faster of FlexAttention and flash varlen depends on the row's length, its sequences' lengths, prompt
sharing, the head shape and the GPU, so no constant decides it. The first time a bucket is seen, every
candidate runs one attention call forward and backward on random inputs of that batch's shapes and layout
(one warm-up, then `repeats` timed rounds, candidates interleaved, CUDA events on CUDA and the wall clock
elsewhere), and the bucket keeps the one with the lowest median. Buckets: the row length and the mean
tokens per sequence, each rounded up to a power of two, prompt sharing, heads, key/value heads, head dim,
dtype, device type. Each decision is printed once (process 0) and listed in summary.json's `attention`.

A candidate whose warm-up output or input gradients differ from the first candidate's (FlexAttention on CUDA, the
dense mask elsewhere) by more than the dtype's rounding is not chosen (`disagreeing`): a kernel computing another attention
(say, a causal alignment changed in some torch version) would otherwise win on speed alone.

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

    def choose(self, bucket: Bucket, trials: Callable[[], dict[str, Callable]],
               unavailable: dict[str, str] | None = None) -> str:
        """The bucket's backend; the first time, `trials()` gives each candidate's one fwd+bwd run to time, which
        returns its output or None (one candidate is taken untimed; one whose output disagrees with the first's is
        not chosen)."""
        if (chosen := self.known(bucket)) is not None:
            return chosen
        candidates = trials()
        unavailable = dict(unavailable or {})
        milliseconds = {}
        if len(candidates) > 1:
            milliseconds, outputs = measure(candidates, torch.device(bucket.device), self.repeats)
            unavailable.update(disagreeing(outputs))
            milliseconds = {name: ms for name, ms in milliseconds.items() if name not in unavailable}
        chosen = min(milliseconds, key=milliseconds.get) if milliseconds else next(iter(candidates))
        decision = Decision(bucket, chosen, milliseconds, unavailable)
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


def measure(candidates: dict[str, Callable], device: torch.device, repeats: int) -> tuple[dict[str, float], dict]:
    """Median milliseconds of each candidate's call, and each warm-up's output (what the call returns, None for
    nothing): one warm-up each (compilation, allocation), then `repeats` rounds with the candidates interleaved,
    so drift in clocks or load falls on all alike."""
    with torch.enable_grad():
        outputs = {name: run() for name, run in candidates.items()}
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, run in candidates.items():
                times[name].append(_timed(run, device))
    return {name: statistics.median(values) for name, values in times.items()}, outputs


def disagreeing(outputs: dict[str, object]) -> dict[str, str]:
    """Candidates whose output differs from the first candidate's beyond the dtype's rounding, with why. An output
    is a tensor or a tuple of tensors (the attention trials: the output and the three input gradients), each
    compared on its own scale."""
    (reference_name, reference), *others = outputs.items()
    if reference is None:
        return {}
    found = {}
    for name, output in others:
        if output is None:
            continue
        for part, (want, got) in enumerate(zip(_parts(reference), _parts(output))):
            low_precision = want.dtype in (torch.float16, torch.bfloat16)
            tolerance = (2e-2 if low_precision else 1e-4) * max(1.0, want.abs().max().item())
            error = (got.float() - want.float()).abs().max().item()
            if not error <= tolerance:   # also a NaN
                what = ("its output", "its query gradient", "its key gradient", "its value gradient")[part] \
                    if isinstance(reference, tuple) else "its output"
                found[name] = f"{what} differs from {reference_name}'s by {error:.3g} (tolerance {tolerance:.3g})"
                break
    return found


def _parts(output) -> tuple:
    return output if isinstance(output, tuple) else (output,)


def _timed(run: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        from .kernels.triton_logprobs import elapsed_ms

        return elapsed_ms(run)
    started = time.perf_counter()
    run()
    return 1e3 * (time.perf_counter() - started)


def attention_trials(forwards: dict[str, Callable], heads: int, kv_heads: int, head_dim: int, row_tokens: int,
                     dtype: torch.dtype, device: torch.device,
                     compared: torch.Tensor | None = None) -> dict[str, Callable[[], tuple]]:
    """Per candidate, a closure running its `forward(query, key, value)` (`[1, H, T, D]` in, `[1, T, H, D]` out) and
    the backward to query, key and value, on random inputs from a private generator, shared by all candidates; it
    returns (output, query, key and value gradients) at the `compared` token positions (all by default; the row's
    padding, which no loss sees, may be left out), which `disagreeing` compares."""
    generator = torch.Generator(device=device).manual_seed(0)

    def draw(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_()

    query, key, value = draw(1, heads, row_tokens, head_dim), draw(1, kv_heads, row_tokens, head_dim), \
        draw(1, kv_heads, row_tokens, head_dim)
    grad_output = torch.randn((1, row_tokens, heads, head_dim), generator=generator, device=device, dtype=dtype)
    rows = compared if compared is not None else slice(None)

    def trial(forward):
        def run():
            output = forward(query, key, value)
            grads = torch.autograd.grad(output, (query, key, value), grad_output)
            return (output.detach()[:, rows], *(g[:, :, rows] for g in grads))
        return run

    return {name: trial(forward) for name, forward in forwards.items()}


def _main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0
