"""Benchmark: LM head -> per-token log-probs, forward + backward, side by side (not a test).

    python benchmarks/fused_logprobs.py [--quick] [--out DIR]

For each shape (bf16, random inputs, every label valid) it times forward+backward with CUDA events, in
rounds where every method runs once (order rotating; the median over rounds, and ratios of two methods
taken within each round), and measures peak extra memory (max allocated minus what was allocated
before the call; it includes the bf16 dH and dW that every method returns) of:

  naive    logits = h @ W.T, log_softmax in fp32, gather
  trl      trl.kernels.ChunkedLogProbFunction (TRL 1.16, chunk 32768 as its trainers use it)
  liger    LigerFusedLinearCrossEntropyFunction, reduction="none" (loss = -log-prob)
  ours     align_cli.kernels.linear_logprobs (Triton), log-probs only, strategy timed and chosen on
           first use; `ours fused` / `ours tiles` force one strategy; ours+ent adds the entropy
  floor    the three bf16 cuBLAS matmuls of the same shapes (h W^T, G W, G^T h)

and `ours fwd` (`fwd fused`, `fwd tiles`), our forward alone without autograd (reference and rollout
scoring).
Writes kernels.json and kernels.md to --out (default: $OUT or the current directory), and each shape's
row to kernels.jsonl as soon as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import types

import torch
from gpu_timing import elapsed_ms

SHAPES_HV = [(896, 151936), (2048, 128256), (4096, 128256)]
TOKENS = [4096, 16384, 65536]
# Timed rounds per shape: as many as fit in ROUND_BUDGET_MS of GPU time, within [MIN_ROUNDS, MAX_ROUNDS].
ROUND_BUDGET_MS, MIN_ROUNDS, MAX_ROUNDS = 6000, 5, 21


def _import_trl():
    # Its backward imports trl.trainer.utils (for ZeRO-3 gathering), which needs `datasets`; where that
    # is missing, stand in the no-op it returns without ZeRO-3.
    try:
        import trl.trainer.utils  # noqa: F401
    except ImportError:
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction


def make_methods():
    from align_cli.kernels import linear_logprobs

    methods = {}

    def naive(h, w, labels, grad):
        logits = h @ w.t()
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
        (lp * grad).sum().backward()

    methods["naive"] = naive
    try:
        trl_fn = _import_trl()

        def trl(h, w, labels, grad):
            lp = trl_fn.apply(h, w, None, labels, 1.0, 32768, None, 1.0, ())[0]
            (lp * grad).sum().backward()

        methods["trl"] = trl
    except (ImportError, AttributeError) as exc:  # reported in the table as missing
        print(f"trl unavailable: {exc!r}")
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction as liger_fn,
        )

        def liger(h, w, labels, grad):
            nll = liger_fn.apply(h, w, labels, None, None, -100, 0.0, 0.0, "none")[0]
            (-nll * grad).sum().backward()

        methods["liger"] = liger
    except (ImportError, AttributeError) as exc:
        print(f"liger unavailable: {exc!r}")

    def ours(h, w, labels, grad):
        lp, _ = linear_logprobs(h, w, labels)
        (lp * grad).sum().backward()

    def ours_entropy(h, w, labels, grad):
        lp, ent = linear_logprobs(h, w, labels, with_entropy=True)
        (lp * grad + ent * grad).sum().backward()

    def ours_forward(h, w, labels, grad):
        with torch.no_grad():
            linear_logprobs(h, w, labels)

    def forced(strategy, fn):
        def run(h, w, labels, grad):
            os.environ["ALIGN_KERNELS_STRATEGY"] = strategy
            try:
                fn(h, w, labels, grad)
            finally:
                del os.environ["ALIGN_KERNELS_STRATEGY"]

        return run

    methods["ours"] = ours
    methods["ours fused"] = forced("fused", ours)
    methods["ours tiles"] = forced("tiles", ours)
    methods["ours+ent"] = ours_entropy
    methods["ours fwd"] = ours_forward
    methods["fwd fused"] = forced("fused", ours_forward)
    methods["fwd tiles"] = forced("tiles", ours_forward)
    return methods


def interleaved_times(fns: dict, reset) -> dict[str, list[float]]:
    """Milliseconds per method over rounds in which every method runs once, the order rotating each
    round. A drift of the GPU's clocks or temperature then touches every method alike, and the ratio
    of two methods can be taken within each round (paired)."""
    names = list(fns)
    for name in names:  # two warm-ups: compiling, autotuning and our strategy timing stay out
        for _ in range(2):
            reset()
            fns[name]()
    torch.cuda.synchronize()
    first = {}
    for name in names:
        reset()
        first[name] = elapsed_ms(fns[name])
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, ROUND_BUDGET_MS // max(sum(first.values()), 1e-3))))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            reset()
            times[name].append(elapsed_ms(fns[name]))
    return times


def peak_extra_bytes(fn, reset) -> int:
    reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def floor_fn(n, h, v, hidden, weight):
    # One [N, V] buffer serves as the logits output and as the gradient input (random, never zeros).
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    dh = torch.empty(n, h, device="cuda", dtype=torch.bfloat16)
    dw = torch.empty(v, h, device="cuda", dtype=torch.bfloat16)

    def run():
        torch.mm(hidden, weight.t(), out=logits)
        torch.mm(logits, weight, out=dh)
        torch.mm(logits.t(), hidden, out=dw)

    return run


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


PAIRS = [("trl", "ours"), ("liger", "ours"), ("ours", "floor")]


def bench_shape(methods, n, h, v):
    g = torch.Generator(device="cuda").manual_seed(n + h + v)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) * (3.0 / h**0.5)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    grad = torch.randn(n, device="cuda", generator=g)

    def reset():
        hidden.grad = weight.grad = None

    def cleanup():
        reset()
        gc.collect()
        torch.cuda.empty_cache()

    row = {"N": n, "H": h, "V": v}
    fns = {}
    for name, method in methods.items():  # peak memory alone, one method at a time; drop what runs out
        def fn(method=method):
            method(hidden, weight, labels, grad)

        try:
            fn()
            row[name] = {"peak_extra_gib": peak_extra_bytes(fn, reset) / 2**30}
            fns[name] = fn
        except torch.OutOfMemoryError:
            row[name] = "OOM"
        cleanup()
    try:
        fns["floor"] = floor_fn(n, h, v, hidden.detach(), weight.detach())
        row["floor"] = {}
    except torch.OutOfMemoryError:
        row["floor"] = "OOM"
    times = interleaved_times(fns, reset)
    for name, values in times.items():
        row[name].update({"ms": statistics.median(values), "runs": len(values), "spread_ms": summary(values)})
    row["paired"] = {f"{a}/{b}": summary([x / y for x, y in zip(times[a], times[b])])
                     for a, b in PAIRS if a in times and b in times}
    fns.clear()
    cleanup()
    return row


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    for dist in ("triton", "trl", "liger-kernel"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "missing"
    return out


def cell(entry, key="ms", fmt="{:.1f}"):
    return entry if isinstance(entry, str) else ("-" if entry is None else fmt.format(entry[key]))


def markdown(rows, info) -> str:
    names = ["naive", "trl", "liger", "ours", "ours fused", "ours tiles", "ours+ent", "floor"]
    lines = [
        (f"GPU: {info['gpu']}; torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, "
         f"trl {info['trl']}, liger-kernel {info['liger-kernel']}; {info['date']}; `{info['command']}`"),
        "",
        "Forward+backward, median ms. bf16 inputs, all labels valid.",
        "",
        "| N | H | V | " + " | ".join(names) + " | ours/floor | ours/(4/3 floor) | trl/ours | liger/ours |",
        "|" + "---|" * (len(names) + 7),
    ]
    for r in rows:
        ours = r.get("ours")

        def ratio(a, b, r=r):
            a, b = r.get(a), r.get(b)
            ok = isinstance(a, dict) and isinstance(b, dict)
            return f"{a['ms'] / b['ms']:.2f}" if ok else "-"

        bound = f"{ours['ms'] / (r['floor']['ms'] * 4 / 3):.2f}" if isinstance(ours, dict) and isinstance(
            r.get("floor"), dict) else "-"
        lines.append(f"| {r['N']} | {r['H']} | {r['V']} | " + " | ".join(cell(r.get(k)) for k in names)
                     + f" | {ratio('ours', 'floor')} | {bound} | {ratio('trl', 'ours')} | {ratio('liger', 'ours')} |")
    forward = ["ours fwd", "fwd fused", "fwd tiles"]
    lines += ["", ("Forward only (no autograd; reference and rollout scoring), median ms, against one bf16 "
                   "matmul (floor / 3):"), "", "| N | H | V | " + " | ".join(forward) + " | floor/3 | ours fwd/(floor/3) |",
              "|" + "---|" * (len(forward) + 5)]
    for r in rows:
        third = r["floor"]["ms"] / 3 if isinstance(r.get("floor"), dict) else None
        ratio = f"{r['ours fwd']['ms'] / third:.2f}" if third and isinstance(r.get("ours fwd"), dict) else "-"
        lines.append(f"| {r['N']} | {r['H']} | {r['V']} | " + " | ".join(cell(r.get(k)) for k in forward)
                     + f" | {'-' if third is None else f'{third:.1f}'} | {ratio} |")
    lines += ["", ("Paired ratios, taken within each round (both methods timed back to back, the same GPU "
                   "state): median [min, max] over the rounds:"), "",
              "| N | H | V | rounds | " + " | ".join(f"{a}/{b}" for a, b in PAIRS) + " |",
              "|" + "---|" * (len(PAIRS) + 4)]
    for r in rows:
        paired = r.get("paired", {})
        cells = [(lambda p: f"{p['median']:.2f} [{p['min']:.2f}, {p['max']:.2f}]")(paired[f"{a}/{b}"])
                 if f"{a}/{b}" in paired else "-" for a, b in PAIRS]
        rounds = r["ours"]["runs"] if isinstance(r.get("ours"), dict) else "-"
        lines.append(f"| {r['N']} | {r['H']} | {r['V']} | {rounds} | " + " | ".join(cells) + " |")
    memory = names[:-1] + ["ours fwd"]
    lines += ["", "Peak extra memory, GiB (includes the bf16 dH and dW every method returns):", "",
              "| N | H | V | " + " | ".join(memory) + " |", "|" + "---|" * (len(memory) + 3)]
    for r in rows:
        lines.append(f"| {r['N']} | {r['H']} | {r['V']} | "
                     + " | ".join(cell(r.get(k), "peak_extra_gib", "{:.2f}") for k in memory) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=4096 only")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    methods = make_methods()
    info = versions()
    print(json.dumps(info))
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for n in TOKENS[:1] if args.quick else TOKENS:
        for h, v in SHAPES_HV:
            row = bench_shape(methods, n, h, v)
            print(json.dumps(row), flush=True)
            with open(os.path.join(args.out, "kernels.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    try:  # which tile configuration the autotuner kept for each key
        from align_cli.kernels import triton_fused, triton_logprobs

        info["tuned"] = {name: {str(k): str(v) for k, v in fn.cache.items()} for name, fn in
                         (("forward", triton_fused._forward_tuned), ("grad_logits", triton_fused._grad_logits_tuned))}
        info["strategy"] = {str(k): v for k, v in triton_logprobs._chosen.items()}
        print(json.dumps(info["tuned"], indent=1))
    except (ImportError, AttributeError) as exc:
        print(f"no tuning record: {exc!r}")
    table = markdown(rows, info)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
