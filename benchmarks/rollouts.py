"""Rollout generation throughput on one GPU (not a test): generated tokens/s and peak memory of today's RL
path, plain `generate`, static cache + compile, transformers' continuous batching and ours
(`align_cli.fast_generation`), on random-init Qwen2.5 shapes; and one online GRPO step split into
generate / score / update.

    python3 benchmarks/rollouts.py --out $OUT --shapes 0.5b --sequences 32 128 512 --new-tokens 256 \
        --methods today plain static_compile hf_cb ours --spread 0 1 --grpo

Prompts are 128 random token ids, G = 8 samples each, sampling at T = 1, top-p 1. A random-init model
almost never samples EOS, so with `--spread 1` every sequence gets a length drawn from a realistic spread
(a Beta(1.5, 2.5) fraction of the maximum, 15% left to run to it) at which EOS is forced: through a logits
processor on the transformers paths, through `lengths` on ours. Generated tokens count each completion up
to and including its EOS. Each (method, case) runs once untimed (compilation, graph capture) when
`--warmup` says so, then `--repeats` times timed (the median is reported). `ours` is the uncompiled decode
step, `ours_compiled` the one compiled before capture (its warm-up's stats hold the compile seconds; q/k/v and gate/up
fused as on CUDA by default, `ours_compiled_unfused` without that, `ours_compiled_autotune` with inductor's
GEMM autotuning, `max-autotune-no-cudagraphs`, `ours_compiled_combo` with its combo kernels and aggressive
fusion, `fast_generation.COMBO`, `ours_compiled_model_layers` with the model's own decoder-layer code instead of
the fused decode kernels that steps of at most 64 sequences run by default, `align_cli/fused_decode.py`,
`ours_compiled_no_pdl` those kernels without programmatic dependent launch); `ours_hapo`
and `ours_apo` the compiled step with HAPO's adaptive temperature and with APO's extrapolated logits.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch

from align_cli.profiling import kernel_summary

SHAPES = {
    # Qwen2.5-0.5B / 1.5B (config.json of the hub models), random init
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
EOS = 151643
PROMPT = 128
GROUP = 8
TODAY_SEQUENCES = 32   # recipes/grpo.yaml: prompts_per_step 4 x num_generations 8 per generate call


def build_model(shape: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, eos_token_id=EOS,
                         bos_token_id=EOS, pad_token_id=EOS, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    return model.eval()


def workload(sequences: int, new_tokens: int, spread: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed + sequences + new_tokens)
    prompts = torch.randint(1000, 150000, (sequences // GROUP, PROMPT), generator=g).tolist()
    if not spread:
        return prompts, None
    fractions = torch.distributions.Beta(1.5, 2.5).sample((sequences,))
    lengths = (fractions * new_tokens).ceil().long().clamp(1, new_tokens)
    full = torch.rand(sequences, generator=g) < 0.15
    lengths[full] = new_tokens
    return prompts, lengths.tolist()


class ForceEOS:
    """Logits processor: row r (prompt-major, G samples per prompt) samples EOS as its `lengths[r]`-th token."""

    def __init__(self, lengths, prompt_width: int, row_offset: int = 0):
        self.lengths, self.width, self.offset = lengths, prompt_width, row_offset

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width
        rows = [r for r in range(scores.shape[0]) if self.lengths[self.offset + r] == step + 1]
        if rows:
            scores[rows] = -float("inf")
            scores[rows, EOS] = 0.0
        return scores


def count_generated(sequences: torch.Tensor) -> int:
    """Tokens up to and including the first EOS of each row (all of a row without one)."""
    is_eos = sequences == EOS
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], sequences.shape[1],
                                                                                        dtype=torch.long))
    return int(first.sum())


def hf_generate(model, prompts, lengths, new_tokens, per_call: int, static: bool = False) -> int:
    from transformers import LogitsProcessorList

    prompts_per_call = max(1, per_call // GROUP)
    generated = 0
    for start in range(0, len(prompts), prompts_per_call):
        ids = torch.tensor(prompts[start: start + prompts_per_call], device="cuda")
        processors = []
        if lengths is not None:
            processors.append(ForceEOS(lengths, ids.shape[1], start * GROUP))
        extra = {"cache_implementation": "static"} if static else {}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=True,
                             temperature=1.0, top_p=1.0, top_k=None, num_return_sequences=GROUP,
                             pad_token_id=EOS, logits_processor=LogitsProcessorList(processors), **extra)
        generated += count_generated(out[:, ids.shape[1]:])
    return generated


def hf_continuous(model, prompts, lengths, new_tokens) -> int:
    if lengths is not None:
        raise NotImplementedError("no per-request forced EOS in generate_batch")
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=None,
                              eos_token_id=EOS, pad_token_id=EOS, num_return_sequences=GROUP)
    inputs = prompts
    results = model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
    return sum(len(r.generated_tokens) for r in results.values())


def ours(model, prompts, lengths, new_tokens, compiled: bool | str = False, sampler: str = "plain",
         fuse: bool | None = None, fused_layers: bool | None = None) -> tuple[int, dict]:
    """`sampler`: plain T = 1; `hapo`: HAPO's adaptive temperature (tau 0.3, fixed made-up statistics, inside the
    step); `apo`: APO's extrapolated logits (alpha 0.5) against a second random-init model of the same shape
    decoded in step (its keys and values beside the first model's: half the slots per KV budget)."""
    from align_cli.losses.hapo import EntropyStats

    from align_cli.fast_generation import AdaptiveSampling, Sampling, fast_generate

    adaptive = AdaptiveSampling(0.3, "paper", EntropyStats(1.0, 0.5, 2.0, -2.0)) if sampler == "hapo" else None
    extrapolation = (partner_model(model), 0.5) if sampler == "apo" else None
    if compiled in ("max-autotune", "combo"):  # GEMMs autotuned (no CUDA graphs of inductor's own), or combo kernels
        from align_cli.fast_generation import AUTOTUNE, COMBO

        compiled = AUTOTUNE if compiled == "max-autotune" else COMBO
    out = fast_generate(model, prompts, GROUP, new_tokens, Sampling(1.0, 1.0, 0, adaptive), {EOS}, lengths=lengths,
                        compile_step=compiled, extrapolation=extrapolation, fuse=fuse, fused_layers=fused_layers)
    return sum(len(t) for t in out.tokens), out.stats


_PARTNERS: dict = {}


def partner_model(model):
    """A second random-init model of `model`'s shape (APO's previous checkpoint), built once per shape."""
    key = id(model)
    if key not in _PARTNERS:
        from transformers import Qwen2ForCausalLM

        torch.manual_seed(1)
        with torch.device("cuda"):
            _PARTNERS.clear()
            _PARTNERS[key] = Qwen2ForCausalLM(model.config).to(torch.bfloat16).eval()
    return _PARTNERS[key]


def greedy_agreement(model, prompts: int = 16, new_tokens: int = 64) -> dict:
    """Ours against `generate`, greedy, bf16: the fraction of sequences with identical tokens, and of
    positions before the first difference (bf16 kernels of different batch shapes may flip a near tie)."""
    from align_cli.fast_generation import Sampling, fast_generate

    ids, _ = workload(prompts * GROUP, new_tokens, False, seed=1)
    reference = model.generate(torch.tensor(ids, device="cuda"), max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=EOS, eos_token_id=None)[:, PROMPT:].tolist()
    ours_tokens = fast_generate(model, ids, 1, new_tokens, Sampling(0.0), set()).tokens
    half = model.generate(torch.tensor(ids[: len(ids) // 2], device="cuda"), max_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=EOS, eos_token_id=None)[:, PROMPT:].tolist()
    self_agreement = sum(a == b for a, b in zip(half, reference)) / len(half)
    prefix = []
    for a, b in zip(reference, ours_tokens):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        prefix.append(same / len(a))
    return {"identical": sum(p == 1.0 for p in prefix) / len(prefix), "mean_prefix": sum(prefix) / len(prefix),
            "generate_identical_at_half_the_batch": self_agreement}


def without_pdl(call):
    os.environ["ALIGN_DECODE_PDL"] = "0"   # read at every kernel launch (align_cli/decode_kernels.py: _pdl)
    try:
        return call()
    finally:
        os.environ.pop("ALIGN_DECODE_PDL")


def timed(fn):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start, (torch.cuda.max_memory_allocated() - before) / 2**30


def kernel_profile(call) -> dict:
    """One more run of `call` under torch.profiler (CUDA activity only), summarised per decode step
    (align_cli/profiling.py)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        (_, stats) = call()
        torch.cuda.synchronize()
    summary = kernel_summary(prof, time.perf_counter() - start, stats.get("decode_steps", 1))
    summary["decode_steps"] = summary.pop("steps")
    return summary


def run_case(model, method, sequences, new_tokens, spread, warmup, repeats: int = 1, profiled: bool = False):
    prompts, lengths = workload(sequences, new_tokens, spread)
    call = {
        "today": lambda: (hf_generate(model, prompts, lengths, new_tokens, TODAY_SEQUENCES), {}),
        "plain": lambda: (hf_generate(model, prompts, lengths, new_tokens, sequences), {}),
        "static_compile": lambda: (hf_generate(model, prompts, lengths, new_tokens, sequences, static=True), {}),
        "hf_cb": lambda: (hf_continuous(model, prompts, lengths, new_tokens), {}),
        "ours": lambda: ours(model, prompts, lengths, new_tokens),
        # the decode step compiled (inductor) before capture; the warm-up run pays the compilation
        "ours_compiled": lambda: ours(model, prompts, lengths, new_tokens, compiled=True),
        # the same without fusing q/k/v and gate/up into one GEMM each (align_cli/fused_projections.py)
        "ours_compiled_unfused": lambda: ours(model, prompts, lengths, new_tokens, compiled=True, fuse=False),
        # inductor's GEMM autotuning (Triton templates with fused epilogues where they win; minutes to compile)
        "ours_compiled_autotune": lambda: ours(model, prompts, lengths, new_tokens, compiled="max-autotune"),
        "ours_compiled_combo": lambda: ours(model, prompts, lengths, new_tokens, compiled="combo"),
        # the model's decoder-layer code in the decode step instead of the fused decode kernels (align_cli/fused_decode.py)
        "ours_compiled_model_layers": lambda: ours(model, prompts, lengths, new_tokens, compiled=True,
                                                   fused_layers=False),
        # the fused decode kernels without programmatic dependent launch (ALIGN_DECODE_PDL=0)
        "ours_compiled_no_pdl": lambda: without_pdl(lambda: ours(model, prompts, lengths, new_tokens, compiled=True)),
        # the two samplers with a fast-path equivalent of a logits processor, compiled
        "ours_hapo": lambda: ours(model, prompts, lengths, new_tokens, compiled=True, sampler="hapo"),
        "ours_apo": lambda: ours(model, prompts, lengths, new_tokens, compiled=True, sampler="apo"),
    }[method]
    case = {}
    if warmup:
        (_, warm_stats), warm_seconds, _ = timed(call)
        case["warmup_seconds"] = round(warm_seconds, 3)
        case["warmup_stats"] = warm_stats
    runs = [timed(call) for _ in range(repeats)]
    rates = sorted(tokens / seconds for (tokens, _), seconds, _ in runs)
    (tokens, stats), seconds, peak = runs[-1]
    case.update({"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(rates[len(rates) // 2], 1),
                 "tokens_per_s_runs": [round(tokens / s, 1) for (tokens, _), s, _ in runs],
                 "peak_extra_gib": round(peak, 2), "stats": stats})
    if profiled:
        try:
            case["profile"] = kernel_profile(call)
        except Exception as error:  # the timed numbers above stand without it
            case["profile"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return case


def grpo_step(model, sequences: int, new_tokens: int, micro_batch: int = 64) -> dict:
    """One online GRPO step at `sequences` rollouts: generate (ours), score the rollouts without grad (pi_old,
    the project's `score_in_chunks`), update (forward + backward of the clipped objective through `score`,
    micro-batches, one AdamW step). Forced-EOS spread as above. Returns seconds per phase."""
    from align_cli.fast_generation import Sampling, fast_generate
    from align_cli.rl.rollout import Rollouts, score, score_in_chunks

    prompts, lengths = workload(sequences, new_tokens, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    phases = {}
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fast_generate(model, prompts, GROUP, new_tokens, Sampling(1.0, 1.0, 1), {EOS}, lengths=lengths)
    torch.cuda.synchronize()
    phases["generate"] = time.perf_counter() - start
    rollouts = Rollouts([p for p in prompts for _ in range(GROUP)], out.tokens, [""] * sequences,
                        torch.tensor([not s for s in out.stopped]), torch.arange(len(prompts)).repeat_interleave(GROUP),
                        [{}] * sequences)
    start = time.perf_counter()
    old, _ = score_in_chunks(model, rollouts, EOS, micro_batch, fused=False, with_entropy=False, temperature=1.0)
    torch.cuda.synchronize()
    phases["score"] = time.perf_counter() - start
    sampler = torch.zeros_like(old)
    for row, values in enumerate(out.tempered_logps):
        sampler[row, : len(values)] = torch.tensor(values)
    mask = (torch.arange(old.shape[1], device=old.device)[None] < rollouts.lengths.to(old.device)[:, None]).float()
    advantages = torch.randn(sequences, device=old.device)
    model.train()
    start = time.perf_counter()
    for begin in range(0, sequences, micro_batch):
        part = rollouts.select(range(begin, min(begin + micro_batch, sequences)))
        logps, _ = score(model, part, EOS, fused=False, with_entropy=False, temperature=1.0)
        width = logps.shape[1]
        ratio = (logps - old[begin: begin + len(part), :width]).exp()
        adv = advantages[begin: begin + len(part), None]
        objective = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        m = mask[begin: begin + len(part), :width]
        (-(objective * m).sum() / mask.sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    phases["update"] = time.perf_counter() - start
    model.eval()
    total = sum(phases.values())
    del optimizer
    return {"seconds": {k: round(v, 3) for k, v in phases.items()},
            "fraction": {k: round(v / total, 3) for k, v in phases.items()},
            "generated_tokens": sum(len(t) for t in out.tokens),
            "sampler_vs_trainer_logp_abs_mean": float(((sampler - old).abs() * mask).sum() / mask.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", nargs="+", default=["0.5b"])
    parser.add_argument("--sequences", nargs="+", type=int, default=[32, 128, 512])
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[256])
    parser.add_argument("--methods", nargs="+", default=["today", "plain", "static_compile", "hf_cb", "ours", "ours_compiled"])
    parser.add_argument("--spread", nargs="+", type=int, default=[0])
    parser.add_argument("--only", nargs="*", default=[], help="method:sequences:new_tokens limits for slow methods")
    parser.add_argument("--grpo", action="store_true")
    parser.add_argument("--grpo-repeats", type=int, default=1, help="GRPO steps timed (median per phase reported)")
    parser.add_argument("--check", action="store_true", help="greedy agreement of ours with generate first")
    parser.add_argument("--warmup", nargs="*",
                        default=["static_compile", "hf_cb", "ours", "ours_compiled", "ours_compiled_unfused",
                                 "ours_compiled_autotune", "ours_compiled_combo", "ours_compiled_model_layers",
                                 "ours_compiled_no_pdl",
                                 "ours_hapo", "ours_apo"])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (tokens_per_s: their median)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip cases once this much time has passed")
    parser.add_argument("--profile", nargs="*", default=[], help="methods whose cases get one profiled run more")
    parser.add_argument("--name", default="rollouts-h200.json")
    args = parser.parse_args()
    import transformers

    began = time.perf_counter()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "command": " ".join(sys.argv), "cases": [], "grpo": None}
    limits = {}
    for item in args.only:  # e.g. static_compile:512:256 -> run that method only at those sizes
        method, seqs, new = item.split(":")
        limits.setdefault(method, set()).add((int(seqs), int(new)))
    path = os.path.join(args.out, args.name)
    for shape in args.shapes:
        model = build_model(shape)
        if args.check:
            report.setdefault("greedy_agreement", {})[shape] = greedy_agreement(model)
            print("greedy agreement", shape, report["greedy_agreement"][shape], flush=True)
        for new_tokens in args.new_tokens:
            for spread in args.spread:
                for sequences in args.sequences:
                    for method in args.methods:
                        if method in limits and (sequences, new_tokens) not in limits[method]:
                            continue
                        if time.perf_counter() - began > args.budget_s:
                            print("budget spent: skipping", shape, method, sequences, new_tokens, spread, flush=True)
                            continue
                        case = {"shape": shape, "method": method, "sequences": sequences, "new_tokens": new_tokens,
                                "spread": bool(spread)}
                        try:
                            case.update(run_case(model, method, sequences, new_tokens, bool(spread),
                                                 method in args.warmup, args.repeats, method in args.profile))
                        except Exception as error:  # record what failed and go on: one lease, many cases
                            case["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                        print(json.dumps(case), flush=True)
                        report["cases"].append(case)
                        with open(path, "w") as handle:
                            json.dump(report, handle, indent=1)
        if args.grpo and shape == "0.5b":
            try:
                steps = [grpo_step(model, 512, args.new_tokens[0]) for _ in range(args.grpo_repeats)]
                report["grpo"] = {"runs": steps, "median_seconds": {
                    phase: sorted(s["seconds"][phase] for s in steps)[len(steps) // 2] for phase in steps[0]["seconds"]}}
                total = sum(report["grpo"]["median_seconds"].values())
                report["grpo"]["median_fraction"] = {k: round(v / total, 3)
                                                     for k, v in report["grpo"]["median_seconds"].items()}
            except Exception as error:
                report["grpo"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print("grpo", json.dumps(report["grpo"]), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"\n{'shape':6} {'method':15} {'seqs':>5} {'new':>5} {'spread':>6} {'tok/s':>10} {'s':>7} {'GiB':>6}")
    for c in report["cases"]:
        print(f"{c['shape']:6} {c['method']:15} {c['sequences']:5} {c['new_tokens']:5} {int(c['spread']):6} "
              f"{c.get('tokens_per_s', float('nan')):10.0f} {c.get('seconds', float('nan')):7.2f} "
              f"{c.get('peak_extra_gib', float('nan')):6.2f} {c.get('error', '')[:60]}")


if __name__ == "__main__":
    main()
