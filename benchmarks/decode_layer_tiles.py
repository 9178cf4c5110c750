"""The fused decode layer's kernels one at a time (not a test): microseconds a launch for each tile shape, against
cuBLAS (`F.linear`) and SDPA doing the same product, on random weights of a Qwen2.5 shape.

    python3 benchmarks/decode_layer_tiles.py --out $OUT --shapes 0.5b --batches 32
    (on the device: bash benchmarks/run_installed.sh benchmarks/decode_layer_tiles.py ARGS)

Each measurement is one CUDA graph of `layers` launches (one per layer, each on its own weights, so the weights
stream from memory as in a decode step, not from L2), replayed 10 times untimed and `--replays` times timed;
reported: the median over `--repeats` of the time per launch. The kernel's inputs are what a decode step gives
it (partials of the previous linear pending, a KV cache of 384 positions per slot, positions near the end).
Results: `--out`/decode-layer-tiles-<gpu>.json, and the fastest tiles per kernel printed.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from align_cli import decode_kernels
from align_cli.decode_kernels import Tiles

SHAPES = {  # Qwen2.5-0.5B / 1.5B: hidden, intermediate, layers, heads, kv heads, head_dim
    "0.5b": (896, 4864, 24, 14, 2, 64),
    "1.5b": (1536, 8960, 28, 12, 2, 128),
}
CACHE_LEN = 384
DEVICE = "cuda"   # the interpreter checks the launches on "cpu"


def graph_time(launches, replays: int, repeats: int) -> float:
    """Median microseconds per launch of a CUDA graph of `launches` (a list of callables)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for launch in launches:   # compiles the kernels, outside the capture
            launch()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for launch in launches:
            launch()
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays / len(launches))
    return statistics.median(times)


def tile_grid(kind: str) -> list[Tiles]:
    if kind == "attention":
        return [Tiles(block_n=n, warps=w, stages=s) for n, w, s in itertools.product((64, 128), (4, 8), (2, 3))]
    if kind == "norm":
        return [Tiles()]   # one program per row: nothing to tune
    if kind == "gate_up":
        return [Tiles(n, k, 1, w, 3) for n, k, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8))]
    splits = (4, 8, 16) if kind == "down" else (4, 7, 8)
    return [Tiles(n, k, s, 4, stages) for n, k, s, stages in itertools.product((16, 32, 64), (64, 128), splits, (3, 4))]


def case(kind: str, shape: str, batch: int, tiles: Tiles, dtype=torch.bfloat16) -> tuple[list, list]:
    """The launches of one kernel kind over `layers` layers with these tiles, and its cuBLAS/SDPA/torch
    counterpart."""
    hidden, intermediate, layers, heads, kv_heads, head_dim = SHAPES[shape]
    cuda = dict(device=DEVICE)
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    if kind == "norm":   # the residual stream + 8 pending partials, then RMSNorm
        h = torch.randn(batch, hidden, dtype=dtype, **cuda)
        partials = [torch.randn(8, batch, hidden, **cuda) for _ in range(layers)]
        bias, weight = torch.randn(hidden, dtype=dtype, **cuda), torch.rand(hidden, dtype=dtype, **cuda)
        out_h, out_x = torch.empty_like(h), torch.empty_like(h)
        ours = [lambda p=p: decode_kernels.residual_norm(h, p, bias, weight, 1e-6, out_h, out_x) for p in partials]
        theirs = [lambda p=p: F.rms_norm(h + (p.sum(0) + bias).to(dtype), (hidden,), weight, 1e-6) for p in partials]
        return ours, theirs
    if kind in ("qkv", "o", "down", "gate_up"):
        inputs = {"qkv": hidden, "gate_up": hidden, "o": heads * head_dim, "down": intermediate}[kind]
        rows = {"qkv": qkv_rows, "gate_up": 2 * intermediate, "o": hidden, "down": hidden}[kind]
        x = torch.randn(batch, inputs, dtype=dtype, **cuda)
        weights = [torch.randn(rows, inputs, dtype=dtype, **cuda) * inputs ** -0.5 for _ in range(layers)]
        if kind == "gate_up":
            out = torch.empty(batch, intermediate, dtype=dtype, **cuda)
            ours = [lambda w=w: decode_kernels.gated_linear(x, w, None, out, tiles) for w in weights]
        else:
            out = torch.empty(decode_kernels.splits_of(inputs, tiles), batch, rows, dtype=torch.float32, **cuda)
            ours = [lambda w=w: decode_kernels.linear_partial(x, w, out, tiles) for w in weights]
        theirs = [lambda w=w: F.linear(x, w) for w in weights]
        return ours, theirs
    # attention: 8 partials of q/k/v in, a cache of CACHE_LEN per slot with positions near its end
    partials = torch.randn(8, batch, qkv_rows, dtype=torch.float32, **cuda) * 0.1
    bias = torch.randn(qkv_rows, dtype=dtype, **cuda) * 0.1
    angles = torch.arange(CACHE_LEN, **cuda)[:, None] * torch.rand(head_dim, **cuda)[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.randint(CACHE_LEN - 64, CACHE_LEN, (batch,), **cuda)
    keys = [torch.randn(batch, kv_heads, CACHE_LEN, head_dim, dtype=dtype, **cuda) for _ in range(layers)]
    values = [torch.randn_like(k) for k in keys]
    out = torch.empty(batch, heads * head_dim, dtype=dtype, **cuda)
    ours = [lambda k=k, v=v: decode_kernels.attention(partials, bias, None, None, 0.0, cos, sin, positions, k, v, out,
                                                      heads, head_dim ** -0.5, tiles) for k, v in zip(keys, values)]
    query = torch.randn(batch, kv_heads, heads // kv_heads, head_dim, dtype=dtype, **cuda)
    visible = (torch.arange(CACHE_LEN, **cuda)[None, :] <= positions[:, None])[:, None, None, :]
    theirs = [lambda k=k, v=v: F.scaled_dot_product_attention(query, k, v, attn_mask=visible)
              for k, v in zip(keys, values)]
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", nargs="+", default=["0.5b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[32])
    parser.add_argument("--kinds", nargs="+", default=["norm", "qkv", "attention", "o", "gate_up", "down"])
    parser.add_argument("--best-tiles", default=None, help="write the fastest tiles per kernel here (JSON for "
                        "ALIGN_DECODE_TILES)")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
              "cases": []}
    path = os.path.join(args.out, f"decode-layer-tiles-{torch.cuda.get_device_name().split()[-1].lower()}.json")
    for shape, batch, kind in itertools.product(args.shapes, args.batches, args.kinds):
        baseline, rows = None, []
        for tiles in tile_grid(kind):
            try:
                ours, theirs = case(kind, shape, batch, tiles)
                us = graph_time(ours, args.replays, args.repeats)
                if baseline is None:
                    baseline = graph_time(theirs, args.replays, args.repeats)
                rows.append({"tiles": tiles.__dict__, "us": round(us, 2)})
            except Exception as error:  # a tile shape that does not compile or fit: recorded, the sweep goes on
                rows.append({"tiles": tiles.__dict__, "error": f"{type(error).__name__}: {str(error)[:200]}"})
        timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        entry = {"shape": shape, "batch": batch, "kind": kind, "baseline_us": round(baseline or 0, 2),
                 "baseline": {"attention": "SDPA (masked)", "norm": "torch ops (eager)"}.get(kind, "F.linear (cuBLAS)"),
                 "rows": rows,
                 "best": timed[0] if timed else None}
        report["cases"].append(entry)
        print(f"{shape} B={batch} {kind:9} baseline {entry['baseline_us']:6.2f} us; best "
              f"{timed[0]['us'] if timed else float('nan'):6.2f} us {timed[0]['tiles'] if timed else ''}; "
              f"top5 {[(r['us'], tuple(r['tiles'].values())) for r in timed[1:5]]}", flush=True)
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1)
    if args.best_tiles:
        best = {c["kind"]: list(c["best"]["tiles"].values()) for c in report["cases"]
                if c["best"] and c["kind"] != "norm" and c["shape"] == args.shapes[0] and c["batch"] == args.batches[0]}
        with open(args.best_tiles, "w") as handle:
            json.dump(best, handle)
        print("best tiles:", json.dumps(best), flush=True)


if __name__ == "__main__":
    main()
