"""GPU check of the packed-row attention backends (issue 18): flash varlen vs FlexAttention vs the padded batch vs
dense SDPA (not a test).

    python benchmarks/varlen_check.py [--out DIR] [--lengths 1024,4096,16384] [--no-model] [--quick]

(--quick: a CPU smoke run of the script itself at tiny lengths; its numbers mean nothing.)

On one CUDA GPU, at the Qwen2.5-0.5B attention shape (14 query heads, 2 key/value heads, head dim 64, bf16):

1. Kernels on real packed rows (`data/packing.pack_sequences`): per completion length L, `pairs` pairs of prompt
   256 + chosen L + rejected L (4 pairs up to L=4096, 2 at 16384, as benchmarks/dpo_vs_trl.py's fixed-length
   rows), with and without prompt sharing. Every backend's output and q/k/v gradients (on the row's real tokens:
   the padded batch leaves the trailing padding at zero) against an fp32
   reference (dense SDPA with the `[T, T]` mask where the row is <= 40k tokens, else the per-segment varlen
   reference in fp32), as relative norm errors, with bf16 dense SDPA's own error beside them as the scale of
   bf16 rounding; and the median fwd and fwd+bwd milliseconds of one attention call (CUDA events). `trl_padded`
   is what TRL runs for the same pairs: SDPA is_causal on the padded [2 * pairs, 256 + L] batch.
2. Models (unless --no-model): a 2-layer Qwen2 of that attention shape (bf16, vocab 1024) over a packed row,
   align_varlen / align_flex / align_padded / align_packed against the dense-mask SDPA path (per-sequence log-prob sums and
   parameter gradients, relative errors), eager and with the decoder layers compiled (training.compile's
   regional compile, inductor), two row lengths each; and align_packed's decisions (attention_choice.py).

Prints one JSON object (also written to DIR/varlen_check.json). Needs the project installed (align_cli.losses
exists only in the installed package) and pydantic: on the device, `bash benchmarks/run_installed.sh
benchmarks/varlen_check.py [ARGS]` with .whl-fast/ carried.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from align_cli.data.packing import PADDING_SEGMENT, pack_sequences
from align_cli.packed_attention import block_mask, dense_mask, flex_attention_forward
from align_cli.padded_attention import padded_attention_forward, padded_layout
from align_cli.varlen_attention import (
    VARLEN_CAUSAL,
    VARLEN_TAKES_GQA,
    VARLEN_TAKES_SCALE,
    reference_varlen_attention,
    varlen_attention_forward,
    varlen_layout,
)

HEADS, KV_HEADS, HEAD_DIM, PROMPT = 14, 2, 64, 256
DENSE_LIMIT = 40_000  # dense [T, T] mask and SDPA beyond this: memory and minutes, not worth it
DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16  # --quick: float32 on CPU


def rows(pairs: int, length: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 1000, (n,), generator=generator).tolist()

    return [{"prompt_ids": ids(PROMPT), "chosen_ids": ids(length), "rejected_ids": ids(length), "row_index": i}
            for i in range(pairs)]


def timed(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if DEVICE.type != "cuda":
            started = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - started))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def kernel_case(length: int, pairs: int, share: bool, repeats: int) -> dict:
    batch = pack_sequences(rows(pairs, length), ["chosen", "rejected"], pad_id=0, share_prompt=share)
    segments, context = batch.segments.to(DEVICE), batch.context.to(DEVICE)
    tokens = segments.numel()
    scale = HEAD_DIM ** -0.5
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    base = [torch.randn(1, h, tokens, HEAD_DIM, generator=generator, device=DEVICE) for h in (HEADS, KV_HEADS, KV_HEADS)]
    grad = torch.randn(1, tokens, HEADS, HEAD_DIM, generator=generator, device=DEVICE)
    started = time.perf_counter()
    layout = varlen_layout(segments, context)
    sync()
    layout_ms = 1e3 * (time.perf_counter() - started)
    started = time.perf_counter()
    mask = block_mask(segments, context)
    sync()
    block_mask_ms = 1e3 * (time.perf_counter() - started)
    batch_layout = padded_layout(segments, layout)
    dense = dense_mask(segments, context) if tokens <= DENSE_LIMIT else None
    real = (segments != PADDING_SEGMENT).nonzero().squeeze(1)

    def on_real(output, grads):
        return output[:, real], [g[:, :, real] for g in grads]

    def repeat_kv(k, v):
        return k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)

    forwards = {
        "varlen": lambda q, k, v: varlen_attention_forward(q, k, v, layout, scale),
        "flex": lambda q, k, v: flex_attention_forward(q, k, v, mask, scale),
        "padded": lambda q, k, v: padded_attention_forward(q, k, v, batch_layout, scale),
    }
    if dense is not None:
        forwards["dense_sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            q, *repeat_kv(k, v), attn_mask=dense, scale=scale).transpose(1, 2)

    def run_fp32_reference():
        q, k, v = (t.clone().requires_grad_() for t in base)
        if dense is not None:
            out = F.scaled_dot_product_attention(q, *repeat_kv(k, v), attn_mask=dense, scale=scale).transpose(1, 2)
            kind = "dense fp32"
        else:
            keys = (k[0].transpose(0, 1), v[0].transpose(0, 1))
            if layout.k_index is not None:
                keys = tuple(t[layout.k_index] for t in keys)
            out = reference_varlen_attention(q[0].transpose(0, 1), *keys, layout, scale)[None]
            kind = "per-segment fp32"
        return *on_real(out, torch.autograd.grad(out, (q, k, v), grad)), kind

    reference, reference_grads, reference_kind = run_fp32_reference()
    case = {"L": length, "pairs": pairs, "shared_prompts": share, "row_tokens": tokens,
            "segments": len(layout.query_lengths), "attended_pairs": layout.attended_pairs,
            "padded_batch": list(batch_layout.shape), "padded_computed_pairs": batch_layout.computed_pairs,
            "layout_ms": round(layout_ms, 2), "block_mask_ms": round(block_mask_ms, 2), "reference": reference_kind,
            "backends": {}}
    bf16 = [t.to(DTYPE).requires_grad_() for t in base]
    grad16 = grad.to(DTYPE)
    for name, forward in forwards.items():
        try:
            out = forward(*bf16)
            out, grads = on_real(out, torch.autograd.grad(out, bf16, grad16))
            entry = {"output_error": relative(out, reference),
                     **{f"d{n}_error": relative(g, r) for n, g, r in zip("qkv", grads, reference_grads)}}
            del out, grads

            def fwd():
                with torch.no_grad():
                    forward(*bf16)

            def fwd_bwd():
                torch.autograd.grad(forward(*bf16), bf16, grad16)

            fwd_bwd()  # warm-up (FlexAttention compiles for this length)
            entry["fwd_ms"] = timed(fwd, repeats)
            entry["fwd_bwd_ms"] = timed(fwd_bwd, repeats)
        except Exception as error:  # noqa: BLE001 -- one failing backend must not hide the others
            traceback.print_exc()
            entry = {"error": f"{type(error).__name__}: {error}"[:400]}
        case["backends"][name] = entry
    # What TRL runs: each sequence padded to prompt + L, SDPA (flash) is_causal, GQA heads.
    sequences = 2 * pairs
    padded = [torch.randn(sequences, h, PROMPT + length, HEAD_DIM, generator=generator, device=DEVICE,
                          dtype=DTYPE).requires_grad_() for h in (HEADS, KV_HEADS, KV_HEADS)]
    padded_grad = torch.randn(sequences, HEADS, PROMPT + length, HEAD_DIM, generator=generator, device=DEVICE,
                              dtype=DTYPE)

    def padded_forward():
        q, k, v = padded
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    try:
        torch.autograd.grad(padded_forward(), padded, padded_grad)
        case["backends"]["trl_padded"] = {
            "fwd_ms": timed(lambda: padded_forward().detach(), repeats),
            "fwd_bwd_ms": timed(lambda: torch.autograd.grad(padded_forward(), padded, padded_grad), repeats)}
    except Exception as error:  # noqa: BLE001
        case["backends"]["trl_padded"] = {"error": f"{type(error).__name__}: {error}"[:400]}
    timings = {n: e["fwd_bwd_ms"] for n, e in case["backends"].items() if "fwd_bwd_ms" in e}
    case["fastest_fwd_bwd"] = min(timings, key=timings.get) if timings else None
    if "varlen" in timings and "flex" in timings:
        case["flex_over_varlen"] = round(timings["flex"] / timings["varlen"], 3)
    return case


def native_gqa_probe() -> str:
    """Whether this torch's varlen_attn takes fewer key/value heads without `enable_gqa` (informational: the code
    repeats them when the keyword is missing)."""
    from torch.nn.attention.varlen import varlen_attn

    q = torch.randn(256, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(256, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    cu = torch.tensor([0, 128, 256], device=DEVICE, dtype=torch.int32)
    try:
        varlen_attn(q, k, k, cu, cu, 128, 128, **VARLEN_CAUSAL)
        return "ok"
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {str(error)[:200]}"


def tiny_qwen(implementation: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1024, hidden_size=HEADS * HEAD_DIM, intermediate_size=4864, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32768,
                         attn_implementation=implementation)
    model = Qwen2ForCausalLM(config).to(DEVICE, DTYPE)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def model_checks(lengths=(1024, 512)) -> dict:
    from align_cli.attention_choice import attention_report
    from align_cli.compilation import compile_layers
    from align_cli.logprobs import sequence_logps
    from align_cli.packed_attention import register_backend

    register_backend()
    groups = ["chosen", "rejected"]
    cases = [(length, share) for length in lengths for share in (True, False)]

    def run(model):
        out = []
        for length, share in cases:
            model.zero_grad(set_to_none=True)
            batch = pack_sequences(rows(2, length, seed=length), groups, pad_id=0, share_prompt=share).to(DEVICE)
            logps = sequence_logps(model, batch, fused=False)
            logps.sums.sum().backward()
            out.append((logps.sums.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
        return out

    expected = run(tiny_qwen("sdpa"))  # the dense [T, T] mask through SDPA
    results = {}
    for implementation in ("align_varlen", "align_flex", "align_padded", "align_packed"):
        for compiled in (False, True):
            name = f"{implementation}{' compiled' if compiled else ''}"
            try:
                model = tiny_qwen(implementation)
                compilation = compile_layers(model) if compiled else None
                started = time.perf_counter()
                got = run(model)
                entry = {"seconds": round(time.perf_counter() - started, 1), "cases": []}
                for (length, share), (sums, grads), (want_sums, want_grads) in zip(cases, got, expected):
                    entry["cases"].append({"L": length, "shared": share, "sums_error": relative(sums, want_sums),
                                           "worst_grad_error": max(relative(grads[n], want_grads[n]) for n in grads)})
                if compilation is not None:
                    entry["compile"] = compilation.report()
                del model
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                entry = {"error": f"{type(error).__name__}: {error}"[:400]}
            results[name] = entry
            print(name, json.dumps(entry), file=sys.stderr, flush=True)
    results["align_packed_decisions"] = attention_report()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-model", action="store_true", help="skip the model checks (they compile)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run of this script (numbers meaningless)")
    args = parser.parse_args()
    global DEVICE, DTYPE, PROMPT, DENSE_LIMIT
    if args.quick:  # DENSE_LIMIT: the longer rows take the per-segment fp32 reference, as L=16384 does on the GPU
        DEVICE, DTYPE, PROMPT, DENSE_LIMIT = torch.device("cpu"), torch.float32, 16, 300
        args.lengths, args.repeats = "24,40", 1
        os.environ.setdefault("ALIGN_COMPILE_BACKEND", "aot_eager")
    elif not torch.cuda.is_available():
        sys.exit("varlen_check.py needs CUDA")
    import transformers

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    report = {"torch": torch.__version__, "transformers": transformers.__version__,
              "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (--quick)",
              "varlen_causal": {k: list(v) if isinstance(v, tuple) else v for k, v in VARLEN_CAUSAL.items()},
              "varlen_takes_enable_gqa": VARLEN_TAKES_GQA, "varlen_takes_scale": VARLEN_TAKES_SCALE,
              "native_gqa_without_flag": native_gqa_probe() if DEVICE.type == "cuda" else None, "kernels": []}
    started = time.time()
    for length in (int(n) for n in args.lengths.split(",")):
        for share in (True, False):
            pairs = 4 if length <= 4096 else 2  # as dpo_vs_trl.py's fixed-length rows
            try:
                case = kernel_case(length, pairs, share, args.repeats)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                case = {"L": length, "shared_prompts": share, "error": f"{type(error).__name__}: {error}"[:400]}
            report["kernels"].append(case)
            print(json.dumps(case), file=sys.stderr, flush=True)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    if not args.no_model:
        report["models"] = model_checks((40, 24) if args.quick else (1024, 512))
    report["seconds"] = round(time.time() - started, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "varlen_check.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
